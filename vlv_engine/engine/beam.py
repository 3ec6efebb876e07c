"""Batched beam search as a state machine on the device.

A port of transformers' vectorized `GenerationMixin._beam_search` (5.x) for a
decoder-only model whose prompt is a prefix of embeddings (no prompt tokens, so
HF's `decoder_prompt_len` is 0 and `cur_len` counts new tokens). The same tensor
operations run in the same order, so on identical logits the selected tokens,
scores and stopping step are identical, including `early_stopping` (True, False,
"never") and `length_penalty`.

Where HF keeps `cur_len` on the host, here it is a device tensor, and every buffer of
the search is allocated once (`BeamState`) and updated in place by `beam_update`. So a
decode step, the cache reordering and the search's bookkeeping form one function of
fixed shapes and addresses: compiled, one graph per token; on CUDA, one graph replay.
The search knows nothing of models or caches: after `beam_update`, `ids` holds the
tokens to feed and `beam_idx` the cache row each beam continues from. Length penalties
are a table of `c ** length_penalty` computed on the host in double precision, as HF's
Python scalars are, so the divisions see the same divisors.

Differences from HF, both deliberate:

* ``real`` rows: rows past them are bucket padding. They are searched like any
  other row (rows never interact), but the stopping test and the output length
  look only at the real rows, so padding never prolongs the loop.
* Positions after a hypothesis' EOS hold ``pad_token_id``. HF fills them with
  ``pad_token_id or eos_token_id`` evaluated on a tensor, i.e. with EOS when the
  pad id is 0; `vlv_engine.engine.decode` documents the convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlv_engine.engine.cuda_graph import mark_static_buffers

_NEG = -1.0e9  # HF's "impossible" score


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    """[B, K, ...] gathered along dim 1 by [B, K'] indices -> [B, K', ...]."""
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


@dataclass(eq=False)  # buffers: identity, not elementwise equality
class BeamState:
    """Buffers of a beam search over B rows x K beams and up to `capacity` new tokens.
    Running beams (the K best unfinished continuations) and finished hypotheses (the K best
    completed ones) are [B, K, capacity] buffers. Every tensor is updated in place;
    the fields after `top_mask` are constants of the search."""

    running_sequences: torch.Tensor  # [B, K, C] long
    sequences: torch.Tensor  # [B, K, C] long
    running_beam_scores: torch.Tensor  # [B, K] float
    beam_scores: torch.Tensor  # [B, K] float
    is_sent_finished: torch.Tensor  # [B, K] bool
    unsatisfied: torch.Tensor  # [B, 1] bool: improvement still possible (HF's early-stop heuristic)
    running_beam_indices: torch.Tensor  # [B, K, C] int32
    beam_indices: torch.Tensor  # [B, K, C] int32
    cur_len: torch.Tensor  # [] long: tokens chosen so far
    max_length: torch.Tensor  # [] long: max_new_tokens of this search
    ids: torch.Tensor  # [B*K, 1] long: the tokens to feed next (beam b*K + k)
    beam_idx: torch.Tensor  # [B*K] long: the cache row each beam continues from
    go: torch.Tensor  # [] bool: HF's "has unfinished sequences", over the real rows
    real: torch.Tensor  # [B, 1] bool
    denom: torch.Tensor  # [C + 1] float: c ** length_penalty (the divisor at length c)
    max_denom: torch.Tensor  # [] float: max_length ** length_penalty
    batch_offset: torch.Tensor  # [B, 1] long: b * K
    top_mask: torch.Tensor  # [beams_to_keep] bool: the first K of the top candidates
    num_beams: int
    eos: int | None
    pad: int
    length_penalty: float
    early_stopping: bool | str
    prefix_len: int

    @classmethod
    def allocate(cls, batch: int, num_beams: int, capacity: int, *, eos: int | None, pad: int,
                 length_penalty: float, early_stopping: bool | str, prefix_len: int,
                 device: torch.device) -> BeamState:
        B, K, C = batch, num_beams, capacity
        beams_to_keep = max(2, 1 + (eos is not None)) * K
        kw = dict(device=device)
        # Python floats (double), as HF divides by; index 0 is never read (lengths start at 1).
        denom = [float(c) ** length_penalty if c else 1.0 for c in range(C + 1)]
        state = cls(
            running_sequences=torch.empty(B, K, C, dtype=torch.long, **kw),
            sequences=torch.empty(B, K, C, dtype=torch.long, **kw),
            running_beam_scores=torch.empty(B, K, dtype=torch.float, **kw),
            beam_scores=torch.empty(B, K, dtype=torch.float, **kw),
            is_sent_finished=torch.empty(B, K, dtype=torch.bool, **kw),
            unsatisfied=torch.empty(B, 1, dtype=torch.bool, **kw),
            running_beam_indices=torch.empty(B, K, C, dtype=torch.int32, **kw),
            beam_indices=torch.empty(B, K, C, dtype=torch.int32, **kw),
            cur_len=torch.empty((), dtype=torch.long, **kw), max_length=torch.empty((), dtype=torch.long, **kw),
            ids=torch.empty(B * K, 1, dtype=torch.long, **kw), beam_idx=torch.empty(B * K, dtype=torch.long, **kw),
            go=torch.empty((), dtype=torch.bool, **kw), real=torch.empty(B, 1, dtype=torch.bool, **kw),
            denom=torch.tensor(denom, dtype=torch.float, **kw), max_denom=torch.empty((), dtype=torch.float, **kw),
            batch_offset=torch.arange(B, **kw).view(-1, 1) * K,
            top_mask=(torch.arange(beams_to_keep, **kw) < K),
            num_beams=K, eos=eos, pad=pad, length_penalty=length_penalty, early_stopping=early_stopping,
            prefix_len=prefix_len)
        mark_static_buffers(state)
        return state

    @property
    def capacity(self) -> int:
        return self.sequences.shape[2]

    def reset(self, num_real: int, max_new_tokens: int) -> None:
        """A fresh search of at most max_new_tokens (<= capacity) whose first num_real rows are real."""
        if not 1 <= max_new_tokens <= self.capacity:
            raise ValueError(f"max_new_tokens={max_new_tokens} outside 1..{self.capacity}")
        self.running_sequences.fill_(self.pad)
        self.sequences.fill_(self.pad)
        self.running_beam_scores.zero_()
        self.running_beam_scores[:, 1:].fill_(_NEG)  # only beam 0 counts at the first step: all beams are equal
        self.beam_scores.fill_(_NEG)
        self.is_sent_finished.fill_(False)
        self.unsatisfied.fill_(True)
        self.running_beam_indices.fill_(-1)
        self.beam_indices.fill_(-1)
        self.cur_len.zero_()
        self.max_length.fill_(max_new_tokens)
        self.max_denom.fill_(float(max_new_tokens) ** self.length_penalty)
        self.ids.fill_(self.pad)
        torch.arange(self.beam_idx.shape[0], out=self.beam_idx)
        self.go.fill_(num_real > 0)
        self.real.fill_(False)
        self.real[:num_real].fill_(True)

    def position(self) -> torch.Tensor:
        """[1]: the cache position of `ids` (prefix_len + cur_len - 1)."""
        return (self.cur_len + (self.prefix_len - 1)).view(1)

    def result(self, num_real: int) -> torch.Tensor:
        """The best finished hypothesis of each real row, [num_real, T] new tokens, T the
        longest of them (HF's output length), padded with the pad id after EOS (a copy: the
        buffers serve the next call)."""
        n = num_real
        best = self.sequences[:n, 0, :]
        lengths = (self.beam_indices[:n, 0, :] + 1).bool().sum(dim=1)
        return (best[:, : int(lengths.max())] if n else best[:, :0]).clone()


def _early_stop_heuristic(s: BeamState) -> torch.Tensor:
    """HF `_check_early_stop_heuristic` with decoder_prompt_len = 0, after cur_len was
    advanced: can a running beam still beat the worst finished one? [B, 1], sticky once False."""
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        divisor = s.max_denom  # best_hypothetical_length = max_length
    else:
        divisor = s.denom.index_select(0, s.cur_len.view(1))  # best_hypothetical_length = cur_len
    best_possible_running_score = s.running_beam_scores[:, :1] / divisor
    worst_finished_score = torch.where(s.is_sent_finished, torch.min(s.beam_scores, dim=1, keepdim=True)[0], _NEG)
    return s.unsatisfied & torch.any(best_possible_running_score > worst_finished_score, dim=-1, keepdim=True)


def beam_update(s: BeamState, logits: torch.Tensor) -> None:
    """One step of the search from next-token logits [B*K, V] (beam b*K + k), in place:
    choose the running beams and finished hypotheses, then `ids`, `beam_idx`, `go`."""
    B, K = s.beam_scores.shape
    cur = s.cur_len.view(1)
    # 1. Accumulated log-probabilities of every (beam, token) continuation.
    log_probs = nn.functional.log_softmax(logits.to(torch.float32), dim=-1)  # [B*K, V]
    vocab_size = log_probs.shape[-1]
    log_probs = log_probs.view(B, K, vocab_size) + s.running_beam_scores[:, :, None]
    log_probs = torch.reshape(log_probs, (B, -1))  # [B, K*V]

    # 2. Top 2K continuations (so K stay open even if K of them end with EOS).
    topk_log_probs, topk_indices = torch.topk(log_probs, k=s.top_mask.shape[0])
    topk_current_beam_indices = topk_indices // vocab_size
    topk_running_beam_indices = _gather_beams(s.running_beam_indices, topk_current_beam_indices)
    topk_running_sequences = _gather_beams(s.running_sequences, topk_current_beam_indices)
    topk_ids = topk_indices % vocab_size
    topk_running_sequences.index_copy_(2, cur, topk_ids.unsqueeze(2))
    topk_running_beam_indices.index_copy_(
        2, cur, (topk_current_beam_indices + s.batch_offset).to(torch.int32).unsqueeze(2))

    # 3. Which continuations stop here (EOS, or the length limit).
    hits = (s.cur_len + 1 >= s.max_length).expand(topk_ids.shape)
    if s.eos is not None:
        hits = hits | (topk_ids == s.eos)

    # 4. The K best continuations that did not stop run on.
    topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * _NEG
    next_topk_indices = torch.topk(topk_running_log_probs, k=K)[1]
    running_sequences = _gather_beams(topk_running_sequences, next_topk_indices)
    running_beam_indices = _gather_beams(topk_running_beam_indices, next_topk_indices)
    s.running_beam_scores.copy_(_gather_beams(topk_running_log_probs, next_topk_indices))

    # 5. Stopped continuations among the top K join the finished hypotheses if they are good enough.
    did_top_num_beams_just_finish = hits & s.top_mask[None, :]
    finished_log_probs = topk_log_probs / s.denom.index_select(0, cur + 1)  # [1]: a tensor index, no host read
    beams_in_batch_are_full = torch.all(s.is_sent_finished, dim=-1, keepdim=True) & (s.early_stopping is True)
    finished_log_probs += beams_in_batch_are_full.to(torch.float32) * _NEG
    finished_log_probs += (~s.unsatisfied).to(torch.float32) * _NEG
    finished_log_probs += (~did_top_num_beams_just_finish) * _NEG
    merged_sequences = torch.cat((s.sequences, topk_running_sequences), dim=1)
    merged_scores = torch.cat((s.beam_scores, finished_log_probs), dim=1)
    merged_beam_indices = torch.cat((s.beam_indices, topk_running_beam_indices), dim=1)
    merged_is_sent_finished = torch.cat((s.is_sent_finished, did_top_num_beams_just_finish), dim=1)
    topk_merged_indices = torch.topk(merged_scores, k=K)[1]
    s.sequences.copy_(_gather_beams(merged_sequences, topk_merged_indices))
    s.beam_scores.copy_(_gather_beams(merged_scores, topk_merged_indices))
    s.beam_indices.copy_(_gather_beams(merged_beam_indices, topk_merged_indices))
    s.is_sent_finished.copy_(_gather_beams(merged_is_sent_finished, topk_merged_indices))

    # 6. What the next step feeds, and where each beam's cache comes from.
    s.ids.copy_(running_sequences.index_select(2, cur).reshape(B * K, 1))
    s.beam_idx.copy_(running_beam_indices.index_select(2, cur).reshape(B * K))
    s.running_sequences.copy_(running_sequences)
    s.running_beam_indices.copy_(running_beam_indices)
    s.cur_len.add_(1)

    # 7. Go on? (HF `_beam_search_has_unfinished_sequences`, on the real rows only.)
    s.unsatisfied.copy_(_early_stop_heuristic(s))
    improvement_possible = torch.any(s.unsatisfied & s.real)
    exists_open_beam = ~(torch.all(s.is_sent_finished | ~s.real) & (s.early_stopping is True))
    valid_continuations = ~torch.all(hits | ~s.real)
    s.go.copy_(improvement_possible & exists_open_beam & valid_continuations)
