"""The Triton backend's model: the encoder path on the vlv ops, against the eager model.

On a CPU the ops take their plain-PyTorch references (`reference_path`) or run the
Triton kernels in Triton's interpreter (`interpreter`); both must give the eager
caption embedding (fp32: rel. err < 1e-5).
"""

import copy

import pytest
import torch
from encoder_path_helpers import rel_err, same_state, snapshot

from vlv_engine import ops
from vlv_engine.config import preset
from vlv_engine.engine.encoder_path import FusedEncoderPath, TritonEncoderPath
from vlv_engine.engine.segment_graph import eager_recorder
from vlv_engine.models import VLVModel
from vlv_engine.ops.fused_blocks import FusedMLP


def test_reference_ops_match_eager(reference_path, model, pixels):
    before = snapshot(model)
    fused = FusedEncoderPath(model).eval()
    with torch.no_grad():
        expected = model.caption_embedding(pixels)  # [B, Nq, D]
        got = fused(pixels)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5
    assert same_state(model, before)  # nothing in the model changed
    assert type(model.encoder.language_proj[1]).__name__ == "GELU"  # the model keeps its own modules


def test_fused_modules_share_the_parameters(model):
    fused = FusedEncoderPath(model)
    lm = model.encoder.florence.language_model
    assert fused.phi[0].weight is model.encoder.language_proj[0].weight
    assert fused.query_decoder.layers[0]["mlp"].fc1 is lm.decoder.layers[0].fc1
    te = model.bottleneck.text_encoder
    assert fused.text_encoder.final_layer_norm.weight is te.final_layer_norm.weight
    attn = fused.text_encoder.layers[0]["attn"]
    src = te.encoder.layers[0].self_attn
    assert torch.equal(attn.w_in, torch.cat([src.q_proj.weight, src.k_proj.weight, src.v_proj.weight]))


def test_triton_kernels_in_the_interpreter_match_eager(interpreter, model, pixels):
    runner = TritonEncoderPath(model, max_batch=2, recorder=eager_recorder)
    launches = []
    hook = runner.fused.phi[0].register_forward_hook(lambda m, a, o: launches.append(ops.backend_for(a[0])))
    try:
        got = runner(pixels[:2])
    finally:
        hook.remove()
    with torch.no_grad():
        expected = model.caption_embedding(pixels[:2])
    assert launches and set(launches) == {"triton"}  # the twin's record and replay both run the kernels
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_the_interpreter(interpreter, model, pixels, dtype):
    """Reduced precision: the fused path's error against fp32 eager is at most twice the
    error of the eager model run in the same dtype (plus one ulp of slack)."""
    half = copy.deepcopy(model).to(dtype)
    x = pixels[:1]
    with torch.no_grad():
        oracle = model.caption_embedding(x)
        eager_half = half.caption_embedding(x.to(dtype))
    got = TritonEncoderPath(half, max_batch=1, recorder=eager_recorder)(x.to(dtype))
    assert got.dtype == dtype
    ulp = 2**-10 if dtype == torch.float16 else 2**-7
    scale = oracle.abs().max().item()
    err = (got.double() - oracle.double()).abs().max().item()
    assert err <= 2 * (eager_half.double() - oracle.double()).abs().max().item() + ulp * scale


def test_quick_gelu_text_encoder(reference_path, pixels):
    """CLIP-L's text encoder uses quick_gelu: the fused MLP takes the kernel's 'quick' form."""
    cfg = preset("tiny")
    cfg.bottleneck.text_encoder["hidden_act"] = "quick_gelu"
    torch.manual_seed(0)
    m = VLVModel.from_config(cfg, with_caption_decoder=False, with_diffusion=False).eval()
    fused = FusedEncoderPath(m).eval()
    mlp = fused.text_encoder.layers[0]["mlp"]
    assert isinstance(mlp, FusedMLP) and mlp.kind == "quick"
    with torch.no_grad():
        assert rel_err(fused(pixels), m.caption_embedding(pixels)) < 1e-5


def test_unfusable_activation_runs_unfused(reference_path, pixels):
    cfg = preset("tiny")
    cfg.bottleneck.text_encoder["hidden_act"] = "relu"
    torch.manual_seed(0)
    m = VLVModel.from_config(cfg, with_caption_decoder=False, with_diffusion=False).eval()
    fused = FusedEncoderPath(m).eval()
    assert fused.text_encoder.layers[0]["mlp"].kind is None
    with torch.no_grad():
        assert rel_err(fused(pixels), m.caption_embedding(pixels)) < 1e-5


@pytest.mark.parametrize("scope", ["segment", "full"])
def test_batch_invariance(reference_path, model, pixels, scope):
    """An image's embedding does not depend on its batch (bucket padding included), and
    equals the eager model's, whichever part of the path a graph holds."""
    runner = TritonEncoderPath(model, max_batch=4, graph_scope=scope, recorder=eager_recorder)
    together = runner(pixels)  # [3, Nq, D]: bucket 4, one zero row of padding
    for i in range(pixels.shape[0]):
        alone = runner(pixels[i:i + 1])  # bucket 1
        torch.testing.assert_close(alone[0], together[i], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert rel_err(together, model.caption_embedding(pixels)) < 1e-5
    assert sorted(runner._segments.recordings) == [1, 4]
    with pytest.raises(ValueError, match="unknown graph_scope 'vision'"):
        TritonEncoderPath(model, graph_scope="vision")


def test_the_full_path_reads_no_host_tensor_and_never_syncs(model):
    """What capturing the whole path (`graph_scope="full"`, the CUDA default) assumes of it:
    no operation reads a CPU tensor (it would be copied, or frozen at capture) and none
    syncs with the host (`.item()`, `nonzero`: illegal while capturing). Checked on the
    "meta" device (shapes only) under a dispatch probe, vision tower included."""
    from vlv_engine.testing.host_probe import HostTensorProbe

    fused = FusedEncoderPath(copy.deepcopy(model)).eval().to("meta")
    size = model.config.encoder.image_size
    probe = HostTensorProbe()
    with torch.no_grad(), probe:
        out = fused(torch.empty(2, 3, size, size, device="meta"))
    assert out.shape == (2, model.config.encoder.num_queries, model.config.bottleneck.hidden_size)
    assert len(probe.ops) > 100 and any("conv" in op for op in probe.ops)  # the vision tower ran too
    assert probe.host_args == []
    assert not probe.syncs
