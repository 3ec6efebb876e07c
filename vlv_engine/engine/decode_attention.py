"""Attention of a decode step on grouped key/value heads, without repeating them.

Qwen2.5 reads 2 key/value heads per 16 query heads (3B; 2 per 14 in 0.5B). transformers'
SDPA attention handles one query token on such a model by regrouping the query onto the
key/value heads, but only when not compiling: under `torch.compile` it repeats every
layer's keys and values to all query heads first (`repeat_kv`), a copy of the whole
cache per layer and token. Our decode step is always compiled on a GPU: on the paper
model at batch 1 with a 384-position cache that is 72 more kernels and ~0.2 GB more
memory traffic per token (~4 % of the weights' 6.2 GB; 4 beams, ~15 %).

`decode_sdpa` is transformers' SDPA attention except that one query token with grouped
heads always runs regrouped: the query [B, H, 1, D] is viewed as [B, KV, H/KV, D] (each
key/value head's queries as a short sequence), SDPA runs over the unrepeated cache, and
the output is viewed back. Every query attends to the same keys with the same mask
([B, 1, 1, L] broadcast), so it computes what the repeated form computes. Anything else
(a prefill, a mask per head, a position bias) goes to transformers' function unchanged.

It is registered with transformers' attention and mask interfaces under `NAME` when this
module is imported (so a model that names it, unpickled in a Ray worker say, finds it),
and set on a model with `use_decode_attention`, for models running "sdpa" (an explicit
"eager" or flash attention is left as chosen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "vlv_decode_sdpa"


def decode_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, q, D], key/value [B, KV, L, D] -> ([B, q, H, D], None), as transformers'
    `sdpa_attention_forward`."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] == 1 and groups > 1 and kwargs.get("position_bias") is None
            and (attention_mask is None or attention_mask.shape[1] == 1) and not kwargs.get("output_attentions")):
        b, h, _, d = query.shape
        out = F.scaled_dot_product_attention(query.reshape(b, h // groups, groups, d), key, value,
                                             attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
        return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Make `NAME` known to transformers (idempotent): the attention function, and SDPA's
    mask format for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, decode_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_attention(llm) -> bool:
    """Switch an LLM that runs "sdpa" to `decode_sdpa`; returns whether it now runs it."""
    current = getattr(llm.config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    register()
    llm.set_attn_implementation(NAME)
    return llm.config._attn_implementation == NAME


register()
