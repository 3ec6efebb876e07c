"""ONNX export (dynamo exporter) + ONNX Runtime against the eager UNet and VAE decoder.

Tolerance: relative L2 error < 1e-4 in fp32 (measured ~1e-6: the graph is the same
computation, reordered by ONNX Runtime's fusions).
"""

import copy
import os

import pytest
import torch
from conftest import rel_err

from vlv_engine.engine.backends import cache
from vlv_engine.engine.backends import onnx_backend as ob
from vlv_engine.engine.backends.contract import ContractError, unet_exportable

TOL = 1e-4


def _inputs(b, nq=8, d=32, c=4, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, hw, hw, generator=g), torch.randn(b, nq, d, generator=g)


@pytest.mark.parametrize("batch", [1, 2, 4, 5])
def test_unet_matches_eager_at_every_batch(onnx_unet, tiny_decoder, batch):
    latents, context = _inputs(batch, seed=batch)
    with torch.no_grad():
        ref = tiny_decoder.predict_noise(latents, torch.tensor(731), context)
    out = onnx_unet(latents, torch.tensor(731), context)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL


def test_unet_takes_per_item_timesteps(onnx_unet, tiny_decoder):
    latents, context = _inputs(3)
    t = torch.tensor([1, 500, 999])
    with torch.no_grad():
        ref = torch.cat([tiny_decoder.predict_noise(latents[i:i + 1], t[i], context[i:i + 1]) for i in range(3)])
    assert rel_err(onnx_unet(latents, t, context), ref) < TOL


def test_unet_with_coordinate_channels_takes_the_plain_latent(coord_decoder, cache_dir):
    runner = ob.onnx_unet_runner(coord_decoder, num_queries=8, max_batch=2, cache_dir=cache_dir, threads=1)
    assert runner.contract.inputs[0].shape[1] == 4  # the UNet itself takes 6
    for b in (1, 4):
        latents, context = _inputs(b, seed=10 + b)
        with torch.no_grad():
            ref = coord_decoder.predict_noise(latents, torch.tensor(42), context)
        assert rel_err(runner(latents, torch.tensor(42), context), ref) < TOL


def test_vae_decoder_matches_eager(tiny_decoder, cache_dir):
    runner = ob.onnx_vae_decoder_runner(tiny_decoder, max_batch=4, cache_dir=cache_dir, threads=1)
    for b in (1, 3):
        z = torch.randn(b, 4, 8, 8)
        with torch.no_grad():
            ref = tiny_decoder.vae.decode(z).sample
        out = runner(z)
        assert out.shape == (b, 3, 32, 32)
        assert rel_err(out, ref) < TOL


def test_io_binding_uses_the_contracts_output_shapes(onnx_unet):
    """The binding-shape logic (IOContract.bind + output_shapes, what TensorRT uses) checked
    against ONNX Runtime: the shapes it allocates are the ones ONNX Runtime produces."""
    contract = onnx_unet.contract
    bound = ob.OnnxRunner(onnx_unet.runner.path, contract, threads=1, io_binding=True)
    assert bound.io_binding and not onnx_unet.runner.io_binding  # CPU default: plain run
    for b in (1, 3, 16):
        feeds = contract.sample_inputs({"batch": b}, seed=b)
        plain = onnx_unet.runner.run(feeds)
        assert {k: tuple(v.shape) for k, v in plain.items()} == contract.output_shapes(contract.bind_tensors(feeds))
        assert torch.equal(bound.run(feeds)["noise_pred"], plain["noise_pred"])


def test_wrong_inputs_raise_contract_errors(onnx_unet):
    latents, context = _inputs(2)
    with pytest.raises(ContractError, match=r"encoder_hidden_states.*axis 1 must be 8"):
        onnx_unet(latents, torch.tensor(1), torch.randn(2, 77, 32))
    with pytest.raises(ContractError, match=r"'sample'.*axis 1 must be 4"):
        onnx_unet(torch.randn(2, 6, 8, 8), torch.tensor(1), context)
    with pytest.raises(ContractError, match="'batch'=2"):
        onnx_unet(latents, torch.tensor(1), context[:1])


def test_second_load_reuses_the_cached_file(onnx_unet, tiny_decoder, cache_dir, monkeypatch):
    art = onnx_unet.artifact
    assert art.path.is_file() and (art.path.parent / cache.META_FILE).is_file()
    mtime = os.stat(art.path).st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(ob, "export_onnx", no_export)
    again = ob.onnx_unet_runner(tiny_decoder, num_queries=8, max_batch=8, cache_dir=cache_dir, threads=1)
    assert not again.artifact.exported and again.artifact.path == art.path
    assert os.stat(art.path).st_mtime_ns == mtime
    latents, context = _inputs(2)
    assert torch.equal(again(latents, 7, context), onnx_unet(latents, 7, context))


def test_cache_key_covers_weights_config_contract_opset_and_torch(tiny_decoder, monkeypatch):
    exp = unet_exportable(tiny_decoder, num_queries=8, max_batch=8)
    key = cache.key_of(ob.onnx_cache_parts(exp))
    assert cache.key_of(ob.onnx_cache_parts(unet_exportable(tiny_decoder, num_queries=8, max_batch=8))) == key

    changed = copy.deepcopy(tiny_decoder)
    with torch.no_grad():
        next(changed.unet.parameters()).view(-1)[0] += 1e-3
    assert cache.key_of(ob.onnx_cache_parts(unet_exportable(changed, num_queries=8, max_batch=8))) != key
    assert cache.key_of(ob.onnx_cache_parts(unet_exportable(tiny_decoder, num_queries=8, max_batch=4))) != key
    assert cache.key_of(ob.onnx_cache_parts(unet_exportable(tiny_decoder, num_queries=9, max_batch=8))) != key
    assert cache.key_of(ob.onnx_cache_parts(exp, opset=17)) != key
    assert cache.key_of(ob.onnx_cache_parts(exp, exporter="torchscript")) != key
    other_cfg = copy.deepcopy(exp)
    other_cfg.config["coord_channels"] = 2
    assert cache.key_of(ob.onnx_cache_parts(other_cfg)) != key
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert cache.key_of(ob.onnx_cache_parts(exp)) != key


def test_weights_digest_sees_dtype_and_buffers():
    lin = torch.nn.Linear(3, 2)
    d = cache.weights_digest(lin)
    assert cache.weights_digest(copy.deepcopy(lin)) == d
    assert cache.weights_digest(copy.deepcopy(lin).double()) != d
    bn = torch.nn.BatchNorm1d(2)
    d_bn = cache.weights_digest(bn)
    bn.running_mean += 1
    assert cache.weights_digest(bn) != d_bn


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "backends"
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == tmp_path / "xdg" / "vlv_engine" / "backends"


def test_torchscript_exporter_route(tiny_decoder, tmp_path):
    runner = ob.onnx_unet_runner(tiny_decoder, num_queries=8, max_batch=2, cache_dir=tmp_path, threads=1,
                                 exporter="torchscript")
    assert runner.artifact.parts["exporter"] == "torchscript"
    latents, context = _inputs(3)
    with torch.no_grad():
        ref = tiny_decoder.predict_noise(latents, torch.tensor(5), context)
    assert rel_err(runner(latents, torch.tensor(5), context), ref) < TOL


def test_session_thread_settings_are_explicit():
    so = ob.session_options(threads=3, allow_spinning=False)
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (3, 1)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert ob.session_options().intra_op_num_threads == torch.get_num_threads() == 1
    assert ob.default_providers("cpu") == ["CPUExecutionProvider"]


def test_a_failed_export_leaves_no_cache_entry(tiny_decoder, tmp_path, monkeypatch):
    def broken(exportable, path, **kwargs):
        path.write_bytes(b"half a file")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(ob, "export_onnx", broken)
    exp = unet_exportable(tiny_decoder, num_queries=8, max_batch=1)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        ob.ensure_onnx(exp, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
