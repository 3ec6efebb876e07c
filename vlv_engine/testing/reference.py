"""Plain references of the caption path, written from the library modules directly.

`reference_caption_embedding` spells out the VLV encoder path step by step from
transformers' Florence-2 and CLIP modules (no code shared with `vlv_engine.models`),
so the model composition and every fast path can be checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def reference_caption_embedding(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, Nq, D] without using VLVEncoder/Bottleneck forward methods."""
    florence = model.encoder.florence
    batch = pixel_values.shape[0]
    # Florence-2 image tokens: DaViT features -> positional/temporal embeddings -> projection.
    feats = florence.vision_tower(pixel_values).last_hidden_state
    image = florence.multi_modal_projector(feats)  # [B, T_img, d]
    prompt = florence.language_model.shared(model.encoder.prompt_ids).unsqueeze(0).expand(batch, -1, -1)
    tokens = torch.cat([image, prompt], dim=1)
    enc = florence.language_model.encoder(inputs_embeds=tokens, attention_mask=torch.ones(tokens.shape[:2]))
    queries = model.encoder.query_embed.expand(batch, -1, -1)
    dec = florence.language_model.decoder(
        inputs_embeds=queries,
        attention_mask=torch.ones(queries.shape[:2]),
        encoder_hidden_states=enc.last_hidden_state,
        encoder_attention_mask=torch.ones(tokens.shape[:2]),
        use_cache=False,
    ).last_hidden_state
    lp = model.encoder.language_proj
    x = F.linear(F.gelu(F.linear(dec, lp[0].weight, lp[0].bias)), lp[2].weight, lp[2].bias)
    # CLIP text encoder on embeddings: positions, an explicit causal additive mask
    # (eager attention, written out here), final LayerNorm.
    te = model.bottleneck.text_encoder
    n = x.shape[1]
    h = x + te.embeddings.position_embedding.weight[:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for layer in te.encoder.layers:
        a = layer.self_attn
        r = h
        h = layer.layer_norm1(h)
        heads = a.num_heads
        q = a.q_proj(h).view(batch, n, heads, -1).transpose(1, 2)
        k = a.k_proj(h).view(batch, n, heads, -1).transpose(1, 2)
        v = a.v_proj(h).view(batch, n, heads, -1).transpose(1, 2)
        w = (q @ k.transpose(-1, -2)) * a.scale + causal
        o = (w.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, -1)
        h = r + a.out_proj(o)
        h = h + layer.mlp(layer.layer_norm2(h))
    return te.final_layer_norm(h)


@torch.no_grad()
def reference_greedy_tokens(llm, prefix: torch.Tensor, max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
    """Greedy decoding by full recomputation (no KV cache), one sequence at a time."""
    out: list[list[int]] = []
    emb = llm.get_input_embeddings()
    for row in prefix:
        seq = row.unsqueeze(0)  # [1, Nq, H]
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            logits = llm(inputs_embeds=seq, use_cache=False).logits[0, -1]
            nxt = int(logits.argmax())
            tokens.append(nxt)
            if nxt == eos_token_id:
                break
            seq = torch.cat([seq, emb(torch.tensor([[nxt]]))], dim=1)
        out.append(tokens)
    return out
