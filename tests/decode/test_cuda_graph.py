"""Token steps captured into CUDA graphs (`vlv_engine.engine.cuda_graph`).

The capture itself needs a GPU (these run in `benchmarks/gpu_check.sh`); on the CPU the
refusal is checked, and the state machines the graphs replay are the ones every CPU test
runs (eager and compiled)."""

import pytest
import torch
from decode_helpers import EOS, PAD, prefixes

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.cuda_graph import CapturedStep, CaptureError
from vlv_engine.engine.decode import StaticDecoder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_capture_without_cuda_is_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CapturedStep(lambda: None)


@needs_cuda
def test_captured_step_replays_in_place():
    x = torch.zeros(4, device="cuda")
    step = CapturedStep(lambda: x.add_(1.0), warmup=2)  # warm-up runs twice; capture runs nothing
    torch.cuda.synchronize()
    assert x.tolist() == [2.0] * 4
    x.zero_()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    assert x.tolist() == [3.0] * 4


@needs_cuda
def test_a_failed_cuda_capture_says_so_and_leaves_the_stream_as_it_was():
    """A host read while capturing is refused by CUDA: `CaptureError`, and the calling
    thread is back on its own stream (torch.cuda.graph alone would leave it on the
    capture stream), so what runs next is ordered as before."""
    x = torch.ones(4, device="cuda")
    before = torch.cuda.current_stream()
    with pytest.raises(CaptureError):
        CapturedStep(lambda: x.add_(x.sum().item()), warmup=1)  # .item() syncs: fine in warm-up only
    assert torch.cuda.current_stream() == before
    torch.cuda.synchronize()
    assert x.add_(1.0).sum().item() > 0  # the device still works after the refused capture


@needs_cuda
@pytest.mark.parametrize("gen", [GenerationConfig(max_new_tokens=20, num_beams=1),
                                 GenerationConfig(max_new_tokens=20, num_beams=3),
                                 GenerationConfig(max_new_tokens=20, num_beams=2, early_stopping="never",
                                                  length_penalty=2.0)], ids=["greedy", "beam3", "beam2-never"])
def test_captured_decoding_equals_eager_on_cuda(eos_llm, gen):
    """fp32 tiny model with EOS at different steps: the captured token steps give the eager
    decoder's tokens, call after call (one graph per cache and search, replayed)."""
    import copy

    llm = copy.deepcopy(eos_llm).cuda()
    eager, captured = StaticDecoder(llm), StaticDecoder(llm, compile=True)
    inductor = StaticDecoder(llm, compile=True, cuda_graphs=False)  # inductor's own CUDA graphs
    assert captured.capture and not inductor.capture
    for seed, batch in ((1, 6), (2, 5), (3, 8)):  # one 8-row bucket
        prefix = prefixes(batch, seed=seed).cuda()
        want = eager.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        for dec in (captured, inductor):
            got = dec.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
            assert got.shape == want.shape
            assert (got == want).float().mean().item() >= 0.98  # fused kernels may round differently
    assert sum(len(p) for p in captured._programs.values()) == 1


def test_search_state_buffers_are_tagged_static():
    """Inductor's own CUDA graphs (cuda_graphs=False) skip a step that writes its inputs
    unless they are tagged as fixed addresses, like transformers' static cache."""
    import dataclasses

    from vlv_engine.engine.beam import BeamState
    from vlv_engine.engine.greedy import GreedyState

    cpu = torch.device("cpu")
    states = (GreedyState.allocate(4, 16, eos=EOS, pad=PAD, prefix_len=8, device=cpu),
              BeamState.allocate(2, 3, 16, eos=EOS, pad=PAD, length_penalty=1.0, early_stopping=True,
                                 prefix_len=8, device=cpu))
    for state in states:
        tensors = [getattr(state, f.name) for f in dataclasses.fields(state)
                   if isinstance(getattr(state, f.name), torch.Tensor)]
        assert len(tensors) >= 7
        assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in tensors)
