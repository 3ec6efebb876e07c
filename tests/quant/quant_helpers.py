"""Helpers of the quantization tests: SQNR, plain fake-quant references, a trained tiny LLM."""

import copy

import torch
import torch.nn.functional as F

NQ, WIDTH, VOCAB, LENGTH = 8, 64, 64, 12


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `out` against `ref`, in dB."""
    ref, out = ref.double(), out.double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def fake_int8_rows(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output row, dequantized (the plain reference of int8 weights)."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return (w / scale).round().clamp(-128, 127) * scale


def fake_int8_tokens(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per token (last dim), dequantized (dynamic activation quantization)."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return (x / scale).round().clamp(-128, 127) * scale


def fake_uint7_tensor(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric 7-bit per tensor over [min(x, 0), max(x, 0)], dequantized (fbgemm's dynamic
    activations on x86, reduce_range)."""
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (hi - lo).clamp_min(1e-12) / 127
    zero = (-lo / scale).round()
    return ((x / scale).round() + zero).clamp(0, 127).sub(zero) * scale


def fake_int4_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """Asymmetric 4-bit per group of `group` inputs (min + q * scale, q in 0..15), dequantized."""
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-6) / 15
    return (lo + ((g - lo) / scale).round().clamp(0, 15) * scale).reshape(w.shape)


def plain_quantized_linear(scheme: str, lin: torch.nn.Linear, x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """What `scheme` computes for one linear layer, in fp32 PyTorch."""
    w, b = lin.weight.float(), lin.bias.float() if lin.bias is not None else None
    if scheme == "int8_weight_only":
        return F.linear(x, fake_int8_rows(w), b)
    if scheme == "int8_dynamic":
        return F.linear(fake_int8_tokens(x), fake_int8_rows(w), b)
    if scheme == "int8_dynamic_cpu":
        return F.linear(fake_uint7_tensor(x), fake_int8_rows(w), b)
    if scheme in ("int4_cpu", "int4_weight_only"):  # bf16 activations and weights, then 4 bits
        bf = lambda t: t.bfloat16().float()  # noqa: E731
        return F.linear(bf(x), fake_int4_groups(bf(w), group), None if b is None else bf(b))
    raise ValueError(scheme)


def trained_llm(steps: int = 120, seed: int = 0):
    """A Qwen2 (2 layers, width 64, tied lm_head) trained to decode 32 fixed random prefixes
    [32, 8, 64] into 32 fixed 12-token sequences: confident logits, so a flipped token means
    the quantization moved the model, not a near-tie of a random network. ~3 s on a CPU.
    Returns (llm, prefixes, sequences)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=True)
    llm = Qwen2ForCausalLM(config)
    g = torch.Generator().manual_seed(seed + 1)
    prefixes = torch.randn(32, NQ, WIDTH, generator=g)
    sequences = torch.randint(4, VOCAB, (32, LENGTH), generator=g)  # no specials (EOS = 3)
    opt = torch.optim.AdamW(llm.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.cat([prefixes, llm.get_input_embeddings()(sequences[:, :-1])], dim=1)  # [32, Nq + T - 1, W]
        logits = llm(inputs_embeds=x).logits[:, NQ - 1:]  # [32, T, V]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), sequences.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return llm.eval().requires_grad_(False), prefixes, sequences


def copy_of(llm):
    return copy.deepcopy(llm)
