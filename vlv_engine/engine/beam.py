"""Batched beam search over a model-agnostic step function.

A port of transformers' vectorized `GenerationMixin._beam_search` (5.x) for a
decoder-only model whose prompt is a prefix of embeddings (no prompt tokens, so
HF's `decoder_prompt_len` is 0 and `cur_len` counts new tokens). The same tensor
operations run in the same order, so on identical logits the selected tokens,
scores and stopping step are identical, including `early_stopping` (True, False,
"never") and `length_penalty`.

The model is reached only through two callbacks, so the search knows nothing of
caches or compilation:

* ``step(input_ids [B*K, 1], t) -> logits [B*K, V]``: feed the t-th new token of
  every beam (flattened as ``b * K + k``) and return next-token logits;
* ``reorder(beam_idx [B*K], length)``: make cache row ``i`` hold what row
  ``beam_idx[i]`` held, for the first ``length`` positions.

Differences from HF, both deliberate:

* ``num_real`` rows: rows past it are bucket padding. They are searched like any
  other row (rows never interact), but the stopping test and the output length
  look only at the real rows, so padding never prolongs the loop.
* Positions after a hypothesis' EOS hold ``pad_token_id``. HF fills them with
  ``pad_token_id or eos_token_id`` evaluated on a tensor, i.e. with EOS when the
  pad id is 0; `vlv_engine.engine.decode` documents the convention.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

StepFn = Callable[[torch.Tensor, int], torch.Tensor]
ReorderFn = Callable[[torch.Tensor, int], None]

_NEG = -1.0e9  # HF's "impossible" score


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    """[B, K, ...] gathered along dim 1 by [B, K'] indices -> [B, K', ...]."""
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


def _early_stop_heuristic(unsatisfied: torch.Tensor, running_beam_scores: torch.Tensor, beam_scores: torch.Tensor,
                          is_sent_finished: torch.Tensor, cur_len: int, max_length: int,
                          early_stopping: bool | str, length_penalty: float) -> torch.Tensor:
    """HF `_check_early_stop_heuristic` with decoder_prompt_len = 0: can a running beam still
    beat the worst finished one? [B, 1] bool, sticky once False."""
    if early_stopping == "never" and length_penalty > 0.0:
        best_hypothetical_length = max_length
    else:
        best_hypothetical_length = cur_len
    best_possible_running_score = running_beam_scores[:, :1] / (best_hypothetical_length**length_penalty)
    worst_finished_score = torch.where(is_sent_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], _NEG)
    return unsatisfied & torch.any(best_possible_running_score > worst_finished_score, dim=-1, keepdim=True)


@torch.no_grad()
def beam_search(step: StepFn, reorder: ReorderFn, first_logits: torch.Tensor, *, batch_size: int, num_beams: int,
                max_new_tokens: int, eos_token_id: int | None, pad_token_id: int, length_penalty: float = 1.0,
                early_stopping: bool | str = True, prefix_len: int = 0, num_real: int | None = None,
                check_every: int = 1) -> torch.Tensor:
    """Beam search from the prefill logits [B*K, V] (every beam of a row holds the same prefix).

    Returns the best hypothesis of each real row, [num_real, T] new tokens, T the longest
    of them (HF's output length), padded with `pad_token_id` after EOS. `prefix_len` is the
    number of cache positions filled before the first new token (the prefix length).
    check_every: steps between the stop checks (each one a host sync on a GPU). Steps
    past the point where a row is done change nothing of it: its finished hypotheses
    take no new entry once no improvement is possible, or once all K are in with
    early_stopping=True, so checking late gives the same result."""
    B, K = batch_size, num_beams
    n = B if num_real is None else num_real
    device = first_logits.device
    max_length = max_new_tokens
    n_eos_tokens = 0 if eos_token_id is None else 1
    beams_to_keep = max(2, 1 + n_eos_tokens) * K
    top_num_beam_mask = torch.cat((torch.ones(K, dtype=torch.bool), torch.zeros(beams_to_keep - K, dtype=torch.bool)))
    top_num_beam_mask = top_num_beam_mask.to(device)

    # 1. Running beams (the K best unfinished continuations) and finished hypotheses
    # (the K best completed ones), both as static-shaped [B, K, max_length] buffers.
    running_sequences = torch.full((B, K, max_length), pad_token_id, dtype=torch.int64, device=device)
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros((B, K), dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = _NEG  # only beam 0 counts at the first step: all beams are equal
    beam_scores = torch.full((B, K), _NEG, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros((B, K), dtype=torch.bool, device=device)
    unsatisfied = torch.ones((B, 1), dtype=torch.bool, device=device)  # improvement still possible
    running_beam_indices = torch.full((B, K, max_length), -1, dtype=torch.int32, device=device)
    beam_indices = running_beam_indices.clone()
    batch_offset = torch.arange(B, device=device).view(-1, 1) * K

    logits = first_logits
    cur_len = 0
    while True:
        # 2. Accumulated log-probabilities of every (beam, token) continuation.
        log_probs = nn.functional.log_softmax(logits.to(torch.float32), dim=-1)  # [B*K, V]
        vocab_size = log_probs.shape[-1]
        log_probs = log_probs.view(B, K, vocab_size) + running_beam_scores[:, :, None]
        log_probs = torch.reshape(log_probs, (B, -1))  # [B, K*V]

        # 3. Top 2K continuations (so K stay open even if K of them end with EOS).
        topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)
        topk_current_beam_indices = topk_indices // vocab_size
        topk_running_beam_indices = _gather_beams(running_beam_indices, topk_current_beam_indices)
        topk_running_sequences = _gather_beams(running_sequences, topk_current_beam_indices)
        topk_ids = topk_indices % vocab_size
        topk_running_sequences[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len] = topk_current_beam_indices + batch_offset

        # 4. Which continuations stop here (EOS, or the length limit).
        hits = torch.full_like(topk_ids, cur_len + 1 >= max_length, dtype=torch.bool)
        if eos_token_id is not None:
            hits = hits | (topk_ids == eos_token_id)

        # 5. The K best continuations that did not stop run on.
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * _NEG
        next_topk_indices = torch.topk(topk_running_log_probs, k=K)[1]
        running_sequences = _gather_beams(topk_running_sequences, next_topk_indices)
        running_beam_scores = _gather_beams(topk_running_log_probs, next_topk_indices)
        running_beam_indices = _gather_beams(topk_running_beam_indices, next_topk_indices)

        # 6. Stopped continuations among the top K join the finished hypotheses if they are good enough.
        did_top_num_beams_just_finish = hits & top_num_beam_mask[None, :]
        finished_log_probs = topk_log_probs / ((cur_len + 1) ** length_penalty)
        beams_in_batch_are_full = torch.all(is_sent_finished, dim=-1, keepdim=True) & (early_stopping is True)
        finished_log_probs += beams_in_batch_are_full.to(torch.float32) * _NEG
        finished_log_probs += (~unsatisfied).to(torch.float32) * _NEG
        finished_log_probs += (~did_top_num_beams_just_finish) * _NEG
        merged_sequences = torch.cat((sequences, topk_running_sequences), dim=1)
        merged_scores = torch.cat((beam_scores, finished_log_probs), dim=1)
        merged_beam_indices = torch.cat((beam_indices, topk_running_beam_indices), dim=1)
        merged_is_sent_finished = torch.cat((is_sent_finished, did_top_num_beams_just_finish), dim=1)
        topk_merged_indices = torch.topk(merged_scores, k=K)[1]
        sequences = _gather_beams(merged_sequences, topk_merged_indices)
        beam_scores = _gather_beams(merged_scores, topk_merged_indices)
        beam_indices = _gather_beams(merged_beam_indices, topk_merged_indices)
        is_sent_finished = _gather_beams(merged_is_sent_finished, topk_merged_indices)

        # 7. Stop? (HF `_beam_search_has_unfinished_sequences`, on the real rows only.)
        beam_idx = running_beam_indices[..., cur_len].reshape(-1)  # [B*K] source row of each beam
        cur_len += 1
        unsatisfied = _early_stop_heuristic(unsatisfied, running_beam_scores, beam_scores, is_sent_finished,
                                            cur_len, max_length, early_stopping, length_penalty)
        if cur_len >= max_length:
            break
        if cur_len % check_every == 0:
            improvement_possible = torch.any(unsatisfied[:n])
            exists_open_beam = ~(torch.all(is_sent_finished[:n]) & (early_stopping is True))
            valid_continuations = ~torch.all(hits[:n])
            if not bool(improvement_possible & exists_open_beam & valid_continuations):
                break

        # 8. Move each beam's cache to its new row, feed the chosen tokens.
        reorder(beam_idx, prefix_len + cur_len - 1)
        logits = step(running_sequences[:, :, cur_len - 1].reshape(B * K, 1), cur_len - 1)

    # 9. The best finished hypothesis of each real row, cut to the longest one.
    best = sequences[:n, 0, :]  # [n, max_length]
    lengths = (beam_indices[:n, 0, :] + 1).bool().sum(dim=1)
    return best[:, : int(lengths.max())] if n else best[:, :0]
