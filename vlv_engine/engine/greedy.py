"""Greedy search as a state machine on the device.

The search's state lives in fixed buffers (`GreedyState`), and `greedy_update` advances
it by one token from a step's logits, in place, with the token index as a device tensor.
So the decode step and the search's bookkeeping form one function of fixed shapes and
fixed addresses: compiled, it is one graph per token, and on CUDA one graph replay
(`vlv_engine.engine.cuda_graph`). The host only counts tokens and, every few tokens,
reads `alive` to stop early.

Output convention (that of `generation.generate_reference`): new tokens only, T the
longest caption (EOS included), positions after a row's EOS hold `pad_token_id`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlv_engine.engine.cuda_graph import mark_static_buffers


@dataclass(eq=False)  # buffers: identity, not elementwise equality
class GreedyState:
    """Buffers of a greedy search over `rows` rows and up to `capacity` new tokens. Every
    field is updated in place (addresses never change); `eos`/`pad`/`prefix_len` are constants."""

    out: torch.Tensor  # [R, capacity] long: token t of each row (pad after its EOS)
    unfinished: torch.Tensor  # [R] bool
    ended: torch.Tensor  # [R] long: the index of each row's EOS (capacity: none yet)
    real: torch.Tensor  # [R] bool: rows past the real ones are bucket padding
    alive: torch.Tensor  # [] bool: does a real row still run?
    t: torch.Tensor  # [] long: the index of the next token to choose
    ids: torch.Tensor  # [R, 1] long: the last chosen token, the next step's input
    eos: int | None
    pad: int
    prefix_len: int

    @classmethod
    def allocate(cls, rows: int, capacity: int, *, eos: int | None, pad: int, prefix_len: int,
                 device: torch.device) -> GreedyState:
        long = dict(dtype=torch.long, device=device)
        flag = dict(dtype=torch.bool, device=device)
        state = cls(out=torch.empty(rows, capacity, **long), unfinished=torch.empty(rows, **flag),
                    ended=torch.empty(rows, **long), real=torch.empty(rows, **flag), alive=torch.empty((), **flag),
                    t=torch.empty((), **long), ids=torch.empty(rows, 1, **long), eos=eos, pad=pad,
                    prefix_len=prefix_len)
        mark_static_buffers(state)
        return state

    @property
    def capacity(self) -> int:
        return self.out.shape[1]

    def reset(self, num_real: int, max_new_tokens: int) -> None:
        """A fresh search of at most max_new_tokens (<= capacity; the host stops there) whose
        first `num_real` rows are real."""
        if not 1 <= max_new_tokens <= self.capacity:
            raise ValueError(f"max_new_tokens={max_new_tokens} outside 1..{self.capacity}")
        self.out.fill_(self.pad)
        self.unfinished.fill_(True)
        self.ended.fill_(self.capacity)
        self.real.fill_(False)
        self.real[:num_real].fill_(True)
        self.alive.fill_(num_real > 0)
        self.t.zero_()
        self.ids.fill_(self.pad)

    def position(self) -> torch.Tensor:
        """[1]: the cache position of `ids` (token t-1 follows the prefix at prefix_len + t - 1)."""
        return (self.t + (self.prefix_len - 1)).view(1)

    def result(self, num_real: int, steps: int) -> torch.Tensor:
        """[num_real, T] after `steps` tokens (a copy: the buffers serve the next call): cut at
        the last real row's EOS (the loop may have run past it, as it checks for the end only
        every few steps)."""
        n = num_real
        if self.eos is None or n == 0:
            return self.out[:n, :steps].clone()
        length = min(int(self.ended[:n].max()) + 1, steps)
        return self.out[:n, :length].clone()


def greedy_update(s: GreedyState, logits: torch.Tensor) -> None:
    """Choose token t of every row from next-token logits [R, V], in place; t += 1."""
    nxt = torch.where(s.unfinished, logits.argmax(dim=-1), s.pad)  # [R]
    s.out.index_copy_(1, s.t.view(1), nxt.unsqueeze(1))
    if s.eos is not None:
        just = s.unfinished & (nxt == s.eos)
        s.ended.copy_(torch.where(just, s.t, s.ended))
        s.unfinished.copy_(s.unfinished & ~just)
        s.alive.copy_((s.unfinished & s.real).any())
    s.ids.copy_(nxt.unsqueeze(1))
    s.t.add_(1)
