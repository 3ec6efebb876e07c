"""The encoder-to-bottleneck transformers rewritten on the vlv ops.

Florence-2's BART encoder (over image + prompt tokens), its BART decoder on the
learnable queries and the CLIP text encoder of the bottleneck, each built from the
transformers module it replaces:

    enc = FusedBartEncoder(florence.language_model.encoder)
    dec = FusedBartDecoder(florence.language_model.decoder)
    clip = FusedCLIPTextEncoder(bottleneck.text_encoder)

Per layer: one [3D, D] matmul for q, k, v (one [2D, D] for the cross-attention's k, v),
vlv::attention (causal where the original is), every residual add fused into the
LayerNorm after it (BART is post-LN: LN(h + sublayer); CLIP is pre-LN: the add before
each block's LN and the final LN), and fc1 + activation in vlv::linear_gelu when the
activation is a GELU the kernel has (erf, tanh, quick).

Parameters are shared with the original modules, never copied, except the stacked
q/k/v weights: those are new tensors (buffers, not in any state dict) made at
construction, so a fused module reflects the weights the model had when it was built.
Inference only (the ops have no backward). No attention masks: this path has no
padding (every image has the same number of tokens). BART's fp16 overflow clamp (inf
hidden states clamped to the fp16 range) is not reproduced: finite inputs only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from vlv_engine.ops.attention import attention
from vlv_engine.ops.fused_modules import FusedLayerNorm
from vlv_engine.ops.linear_gelu import linear_gelu

# transformers activation names -> vlv::linear_gelu's `approximate`.
GELU_KINDS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "quick_gelu": "quick"}


class FusedMLP(nn.Module):
    """fc2(act(fc1(x))), fc1 + act in one kernel when act is a GELU the kernel has."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, activation: str):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.kind = GELU_KINDS.get(activation)
        self.act = None if self.kind is not None else ACT2FN[activation]

    def forward(self, x: Tensor) -> Tensor:
        if self.kind is not None:
            return self.fc2(linear_gelu(x, self.fc1.weight, self.fc1.bias, self.kind))
        return self.fc2(self.act(self.fc1(x)))


class FusedAttention(nn.Module):
    """Multi-head attention over q_proj/k_proj/v_proj/out_proj (BART's and CLIP's layout).

    Self-attention stacks q, k, v into one matmul; cross-attention stacks k, v.
    """

    def __init__(self, attn: nn.Module, num_heads: int, *, causal: bool, cross: bool):
        super().__init__()
        self.num_heads, self.causal, self.cross = num_heads, causal, cross
        self.out_proj = attn.out_proj
        scale = getattr(attn, "scaling", getattr(attn, "scale", None))
        head_dim = attn.q_proj.weight.shape[0] // num_heads
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        projs = (attn.k_proj, attn.v_proj) if cross else (attn.q_proj, attn.k_proj, attn.v_proj)
        if cross:
            self.q_proj = attn.q_proj
        with torch.no_grad():
            self.register_buffer("w_in", torch.cat([p.weight for p in projs]), persistent=False)
            self.register_buffer("b_in", torch.cat([_bias(p) for p in projs]), persistent=False)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, -1).transpose(1, 2)  # [B, H, L, Dh] view

    def forward(self, h: Tensor, kv: Tensor | None = None) -> Tensor:
        b, n, d = h.shape
        if self.cross:
            q = self._heads(self.q_proj(h))  # [B, H, Lq, Dh]
            k, v = nn.functional.linear(kv, self.w_in, self.b_in).chunk(2, dim=-1)  # [B, Lk, D] x 2
        else:
            q, k, v = nn.functional.linear(h, self.w_in, self.b_in).chunk(3, dim=-1)  # [B, L, D] x 3
            q = self._heads(q)
        o = attention(q, self._heads(k), self._heads(v), is_causal=self.causal, scale=self.scale)  # [B, H, Lq, Dh]
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


def _bias(linear: nn.Linear) -> Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.weight.shape[0])


class FusedBartEncoder(nn.Module):
    """BART encoder on inputs_embeds [B, T, d] -> [B, T, d] (post-LN layers, no mask)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        cfg = encoder.config
        self.embed_positions = encoder.embed_positions
        self.ln_embedding = FusedLayerNorm.from_module(encoder.layernorm_embedding)
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "attn": FusedAttention(layer.self_attn, cfg.encoder_attention_heads, causal=False, cross=False),
                "ln_attn": FusedLayerNorm.from_module(layer.self_attn_layer_norm),
                "mlp": FusedMLP(layer.fc1, layer.fc2, cfg.activation_function),
                "ln_mlp": FusedLayerNorm.from_module(layer.final_layer_norm),
            }) for layer in encoder.layers)

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        t = inputs_embeds.shape[1]
        pos = self.embed_positions(None, 0, position_ids=torch.arange(t, device=inputs_embeds.device))  # [1, T, d]
        h = self.ln_embedding(inputs_embeds, pos.to(inputs_embeds.dtype).expand_as(inputs_embeds))[0]
        for layer in self.layers:
            h = layer["ln_attn"](layer["attn"](h), h)[0]  # LN(h + attn(h))
            h = layer["ln_mlp"](layer["mlp"](h), h)[0]
        return h  # [B, T, d]


class FusedBartDecoder(nn.Module):
    """BART decoder on query embeddings [B, Nq, d] over encoder states [B, T, d] (no cache)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        cfg = decoder.config
        self.embed_positions = decoder.embed_positions
        self.ln_embedding = FusedLayerNorm.from_module(decoder.layernorm_embedding)
        heads = cfg.decoder_attention_heads
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "self_attn": FusedAttention(layer.self_attn, heads, causal=True, cross=False),
                "ln_self": FusedLayerNorm.from_module(layer.self_attn_layer_norm),
                "cross_attn": FusedAttention(layer.encoder_attn, heads, causal=False, cross=True),
                "ln_cross": FusedLayerNorm.from_module(layer.encoder_attn_layer_norm),
                "mlp": FusedMLP(layer.fc1, layer.fc2, cfg.activation_function),
                "ln_mlp": FusedLayerNorm.from_module(layer.final_layer_norm),
            }) for layer in decoder.layers)

    def forward(self, queries: Tensor, encoder_states: Tensor) -> Tensor:
        nq = queries.shape[1]
        pos = self.embed_positions(None, 0, position_ids=torch.arange(nq, device=queries.device))  # [1, Nq, d]
        h = self.ln_embedding(queries, pos.to(queries.dtype).expand_as(queries))[0]
        for layer in self.layers:
            h = layer["ln_self"](layer["self_attn"](h), h)[0]
            h = layer["ln_cross"](layer["cross_attn"](h, encoder_states), h)[0]
            h = layer["ln_mlp"](layer["mlp"](h), h)[0]
        return h  # [B, Nq, d]


class FusedCLIPTextEncoder(nn.Module):
    """CLIP text encoder on continuous inputs [B, N, D] -> final-LN hidden states [B, N, D]:
    what `vlv_engine.models.Bottleneck` computes (positions, causal pre-LN layers, final LN)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        cfg = text_encoder.config
        self.position_embedding = text_encoder.embeddings.position_embedding
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "ln1": FusedLayerNorm.from_module(layer.layer_norm1),
                "attn": FusedAttention(layer.self_attn, cfg.num_attention_heads, causal=True, cross=False),
                "ln2": FusedLayerNorm.from_module(layer.layer_norm2),
                "mlp": FusedMLP(layer.mlp.fc1, layer.mlp.fc2, cfg.hidden_act),
            }) for layer in text_encoder.encoder.layers)
        self.final_layer_norm = FusedLayerNorm.from_module(text_encoder.final_layer_norm)

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        n = inputs_embeds.shape[1]
        max_n = self.position_embedding.weight.shape[0]
        if n > max_n:
            raise ValueError(f"the text encoder takes at most {max_n} positions, got {n} inputs")
        h = inputs_embeds + self.position_embedding.weight[:n].to(inputs_embeds.dtype)  # [B, N, D]
        if not self.layers:
            return self.final_layer_norm(h)
        normed = self.layers[0]["ln1"](h)
        for i, layer in enumerate(self.layers):
            # pre-LN: h += attn(LN1 h); h += mlp(LN2 h); each add fused into the LN after it
            normed, h = layer["ln2"](layer["attn"](normed), h)
            nxt = self.layers[i + 1]["ln1"] if i + 1 < len(self.layers) else self.final_layer_norm
            normed, h = nxt(layer["mlp"](normed), h)
        return normed
