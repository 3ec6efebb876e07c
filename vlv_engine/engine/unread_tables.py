"""Embedding tables the caption path never reads, kept in host memory on a GPU.

Once the task prompt's embeddings are frozen (`VLVEncoder.freeze_prompt`), two
vocabulary tables are dead weight on the caption path:
* Florence-2's token embedding (BART's `shared`, tied to its encoder's and decoder's
  `embed_tokens`): the path feeds it image tokens, the frozen prompt and the learned
  queries, never token ids;
* the CLIP text encoder's token embedding: the bottleneck runs on the queries'
  embeddings; only `reconstruct`'s unconditional prompt reads ids, and that needs the
  diffusion parts.
On the paper model that is 51,289 + 49,408 rows of 1,024: 0.19 GiB in bf16, about a
third of what the bf16 caption path at batch 8 has left under 10 GiB. So an engine
without diffusion parts keeps them on the host (`Engine`), where the weights stay whole
(saving, hashing and the batch manifest's revision see the same tensors).
"""

from __future__ import annotations

import torch
from torch import nn


def unread_tables(model: nn.Module) -> list[nn.Module]:
    """The caption path's unread embedding modules of a VLVModel, each once: BART's
    `shared` and the `embed_tokens` of its encoder and decoder (one tied table in
    Florence-2), and CLIP's token embedding. Parts the model lacks are left out."""
    tables: list[nn.Module] = []
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        lm = encoder.florence.language_model
        tables += [encoder.florence.get_input_embeddings(), getattr(lm.encoder, "embed_tokens", None),
                   getattr(lm.decoder, "embed_tokens", None)]
    bottleneck = getattr(model, "bottleneck", None)
    if bottleneck is not None:
        tables.append(bottleneck.text_encoder.embeddings.token_embedding)
    unique: dict[int, nn.Module] = {}
    for table in tables:
        if table is not None:
            unique.setdefault(id(table), table)
    return list(unique.values())


def move_unread_tables(model: nn.Module, device: torch.device | str) -> int:
    """Move those tables to `device`, each tied weight once and still tied (the encoder's
    prompt must be frozen first); returns the bytes moved."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and encoder.frozen_prompt is None:
        raise RuntimeError("freeze the encoder's prompt (VLVEncoder.freeze_prompt) before moving Florence-2's "
                           "vocabulary table off its device: the path would still read it")
    holders: dict[int, list[nn.Module]] = {}
    weights: dict[int, nn.Parameter] = {}
    for table in unread_tables(model):
        holders.setdefault(id(table.weight), []).append(table)
        weights[id(table.weight)] = table.weight
    moved = 0
    for key, weight in weights.items():
        # A new parameter set on every module that held the old one: ties survive moves
        # that cannot be made in place (to "meta", say).
        new = nn.Parameter(weight.detach().to(device), requires_grad=weight.requires_grad)
        for table in holders[key]:
            table.weight = new
        moved += weight.numel() * weight.element_size()
    return moved
