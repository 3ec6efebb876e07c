"""What a captured CUDA graph assumes of a token step, checked on the CPU.

Capture freezes a step: its kernels, their arguments, and every value the host computed
while capturing. Replays then see only what lives in the step's buffers. Emulated here by
tracing the token step once into an aten graph (`make_fx`, real tensors; the cache, the
search state and the weights become the graph's constants, the same objects) and running
that graph for every token, through the decoder's own capture path. A step that read a
host value changing from token to token (a Python int, an `.item()`, a branch on a tensor)
would replay it frozen and decode other tokens than the eager loop."""

import pytest
import torch
from decode_helpers import EOS, PAD, prefixes
from torch.fx.experimental.proxy_tensor import make_fx

import vlv_engine.engine.decode as decode
from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder


class TracedOnce:
    """Stands in for `CapturedStep`: warm-up calls, then one trace, then replays of it."""

    traced = 0

    def __init__(self, fn, *, pool=None, warmup: int = 2):
        for _ in range(warmup):
            fn()
        self.graph = make_fx(fn)()  # runs the step once more (capture does not; the caller resets)
        TracedOnce.traced += 1

    def __call__(self) -> None:
        self.graph()


@pytest.mark.parametrize("gen", [GenerationConfig(max_new_tokens=20, num_beams=1),
                                 GenerationConfig(max_new_tokens=20, num_beams=3),
                                 GenerationConfig(max_new_tokens=18, num_beams=2, early_stopping=False,
                                                  length_penalty=-1.0),
                                 GenerationConfig(max_new_tokens=18, num_beams=2, early_stopping="never",
                                                  length_penalty=2.0)],
                         ids=["greedy", "beam3", "beam2-false-lp-1", "beam2-never-lp2"])
def test_token_steps_replayed_from_one_trace_equal_the_eager_loop(gen, eos_llm, monkeypatch):
    monkeypatch.setattr(decode, "CapturedStep", TracedOnce)
    monkeypatch.setattr(decode, "graph_pool", lambda: None)
    monkeypatch.setattr(TracedOnce, "traced", 0)
    eager, replayed = StaticDecoder(eos_llm), StaticDecoder(eos_llm)
    replayed.capture = True  # the decoder's CUDA path, with the trace standing in for capture
    for seed, batch in ((1, 6), (2, 5), (3, 7)):  # one 8-row bucket, other real rows each call
        prefix = prefixes(batch, seed=seed)
        want = eager.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        got = replayed.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        assert got.shape == want.shape and torch.equal(got, want)
    assert TracedOnce.traced == 1  # one trace, replayed for every token of every call
