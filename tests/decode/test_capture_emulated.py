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
from vlv_engine.testing.host_probe import HostTensorProbe


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


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_token_steps_read_no_host_tensor_and_never_sync(search):
    """On a GPU a host tensor inside the step is a copy (or a kernel argument) frozen at
    capture, and makes inductor skip its own CUDA graphs; a host read (`.item()`,
    `nonzero`) is a sync, illegal while capturing. Checked on the "meta" device (shapes
    only, no CPU fallback): a model, cache and search state off the CPU, one token step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache

    from vlv_engine.engine.beam import BeamState
    from vlv_engine.engine.greedy import GreedyState

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    meta = torch.device("meta")
    with meta:
        llm = Qwen2ForCausalLM(config).eval()
    cache = StaticCache(config=config, max_cache_len=128)
    cache.early_initialization(4, 2, 16, torch.float32, meta)
    if search == "greedy":
        state = GreedyState.allocate(4, 64, eos=EOS, pad=PAD, prefix_len=8, device=meta)
        state.reset(3, 20)
        step = decode.greedy_token_step
    else:
        state = BeamState.allocate(2, 2, 64, eos=EOS, pad=PAD, length_penalty=1.0, early_stopping=True,
                                   prefix_len=8, device=meta)
        state.reset(2, 20)
        step = decode.beam_token_step
    probe = HostTensorProbe()
    with torch.no_grad(), probe:
        step(llm, cache, state)
    assert len(probe.ops) > 100  # the whole forward ran under the probe
    assert probe.host_args == []
    assert not probe.syncs


def test_a_failed_capture_falls_back_to_the_uncaptured_step(eos_llm, monkeypatch, caplog):
    """A step CUDA refuses to capture still decodes (uncaptured), says why in the log and
    in `capture_failures`, and is not retried on every call."""
    attempts = []

    def refuse(fn, *, pool=None, warmup: int = 2):
        attempts.append(fn)
        fn()  # the warm-up runs (and compiles) before the capture fails
        refused = RuntimeError("operation not permitted when stream is capturing\nmore detail")
        raise decode.CaptureError(str(refused)) from refused  # as CapturedStep raises it

    monkeypatch.setattr(decode, "CapturedStep", refuse)
    monkeypatch.setattr(decode, "graph_pool", lambda: None)
    eager, fallback = StaticDecoder(eos_llm), StaticDecoder(eos_llm)
    fallback.capture = True
    for gen in (GenerationConfig(max_new_tokens=16, num_beams=1), GenerationConfig(max_new_tokens=16, num_beams=2)):
        for seed in (4, 5):
            prefix = prefixes(3, seed=seed)
            with caplog.at_level("WARNING", logger="vlv_engine.engine.decode"):
                got = fallback.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
            assert torch.equal(got, eager.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD))
    assert len(attempts) == 2  # once per (cache, search), not per call
    assert list(fallback.capture_failures.values()) == ["RuntimeError: operation not permitted when stream is "
                                                       "capturing"] * 2
    assert sum("CUDA graph capture of the decode step failed" in r.message for r in caplog.records) == 2


def test_an_error_of_the_step_itself_is_not_taken_for_a_capture_failure(eos_llm, monkeypatch):
    """An error in a warm-up call is the step's, and the uncaptured step would raise it again:
    it reaches the caller as it is, and nothing is recorded as a capture failure."""

    def broken(fn, *, pool=None, warmup: int = 2):
        raise RuntimeError("the compiled step failed")

    monkeypatch.setattr(decode, "CapturedStep", broken)
    monkeypatch.setattr(decode, "graph_pool", lambda: None)
    dec = StaticDecoder(eos_llm)
    dec.capture = True
    with pytest.raises(RuntimeError, match="the compiled step failed"):
        dec.generate(prefixes(2, seed=1), GenerationConfig(max_new_tokens=8), eos_token_id=EOS, pad_token_id=PAD)
    assert dec.capture_failures == {}


@pytest.mark.parametrize("beams", [1, 2])
def test_a_cache_with_room_for_one_token_is_never_captured(eos_llm, monkeypatch, beams):
    """Nq + 1 new token filling the cache exactly leaves the search one column: the prefill
    chooses that token and no token step runs, while a capture's warm-up steps would write
    past the column (on a GPU, a device-side assert that poisons the process)."""
    monkeypatch.setattr(decode, "CapturedStep", TracedOnce)
    monkeypatch.setattr(decode, "graph_pool", lambda: None)
    monkeypatch.setattr(TracedOnce, "traced", 0)
    prefix = prefixes(3, seed=7)
    nq = prefix.shape[1]
    eager, replayed = StaticDecoder(eos_llm, length_multiple=nq + 1), StaticDecoder(eos_llm, length_multiple=nq + 1)
    replayed.capture = True
    gen = GenerationConfig(max_new_tokens=1, num_beams=beams)
    got = replayed.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(got, eager.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)) and got.shape == (3, 1)
    assert TracedOnce.traced == 0
    # Two tokens: two columns, captured as usual.
    gen2 = GenerationConfig(max_new_tokens=2, num_beams=beams)
    assert torch.equal(replayed.generate(prefix, gen2, eos_token_id=EOS, pad_token_id=PAD),
                       eager.generate(prefix, gen2, eos_token_id=EOS, pad_token_id=PAD))
    assert TracedOnce.traced == 1
