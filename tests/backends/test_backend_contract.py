"""The I/O contracts: shapes, profile, sample inputs and the binding-shape checks."""

import pytest
import torch

from vlv_engine.config import preset
from vlv_engine.engine.backends.contract import (ContractError, DimRange, IOContract, TensorSpec, unet_contract,
                                                 unet_inputs, vae_decoder_contract)


@pytest.fixture
def tiny_unet():
    return unet_contract(preset("tiny").diffusion.unet, coord_channels=0, num_queries=8, max_batch=4)


def test_unet_contract_shapes_and_profile(tiny_unet):
    c = tiny_unet
    assert c.input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert c.output_names == ["noise_pred"]
    assert c.dims["batch"] == DimRange(1, 2, 8)  # 2 * max_batch for guidance; opt = one guided image
    assert c.profile() == {"sample": ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8)),
                           "timestep": ((1,), (2,), (8,)),
                           "encoder_hidden_states": ((1, 8, 32), (2, 8, 32), (8, 8, 32))}
    assert c.dynamic_axes() == {"sample": {0: "batch"}, "timestep": {0: "batch"},
                                "encoder_hidden_states": {0: "batch"}, "noise_pred": {0: "batch"}}
    assert "batch in [1, 8] (opt 2)" in c.describe()


def test_coordinate_channels_are_inside_the_module_not_in_the_contract():
    nano = preset("nano")
    coords = nano.diffusion.coord_channels
    c = unet_contract(nano.diffusion.unet, coord_channels=coords, num_queries=nano.encoder.num_queries, max_batch=8)
    assert nano.diffusion.unet["in_channels"] == 4 + coords
    assert c.inputs[0].shape == ("batch", 4, 16, 16)  # the plain latent
    assert c.inputs[2].shape == ("batch", 16, 64)
    assert c.outputs[0].shape == ("batch", 4, 16, 16)


def test_vae_decoder_contract():
    c = vae_decoder_contract(preset("tiny").diffusion.vae, latent_size=8, max_batch=3)
    assert c.profile() == {"latent": ((1, 4, 8, 8), (1, 4, 8, 8), (3, 4, 8, 8))}
    assert c.output_shapes({"batch": 3}) == {"image": (3, 3, 32, 32)}
    assert c.export_sizes() == {"batch": 2}  # never trace a dynamic axis at size 1


def test_sample_inputs_follow_the_contract(tiny_unet):
    for point, b in (("min", 1), ("opt", 2), ("max", 8)):
        x = tiny_unet.sample_inputs(point, seed=3)
        assert {k: tuple(v.shape) for k, v in x.items()} == tiny_unet.shapes_at(point)
        assert all(v.dtype == torch.float32 for v in x.values())
        assert x["sample"].shape[0] == b
        assert torch.equal(x["timestep"], x["timestep"].round()) and 0 <= x["timestep"].min()
        assert tiny_unet.bind_tensors(x) == {"batch": b}
    assert torch.equal(tiny_unet.sample_inputs(seed=3)["sample"], tiny_unet.sample_inputs(seed=3)["sample"])


def test_bind_resolves_axes_and_output_shapes(tiny_unet):
    sizes = tiny_unet.bind({"sample": (5, 4, 8, 8), "timestep": (5,), "encoder_hidden_states": (5, 8, 32)})
    assert sizes == {"batch": 5}
    assert tiny_unet.output_shapes(sizes) == {"noise_pred": (5, 4, 8, 8)}


@pytest.mark.parametrize("shapes, message", [
    ({"sample": (2, 6, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 8, 32)}, "axis 1 must be 4"),
    ({"sample": (2, 4, 8), "timestep": (2,), "encoder_hidden_states": (2, 8, 32)}, "rank 3 != 4"),
    ({"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}, "axis 1 must be 8"),
    ({"sample": (2, 4, 8, 8), "timestep": (3,), "encoder_hidden_states": (2, 8, 32)}, "another input set 'batch'=2"),
    ({"sample": (2, 4, 8, 8), "encoder_hidden_states": (2, 8, 32)}, "missing ['timestep']"),
    ({"sample": (9, 4, 8, 8), "timestep": (9,), "encoder_hidden_states": (9, 8, 32)}, "outside the range [1, 8]"),
])
def test_wrong_shapes_raise_a_clear_error(tiny_unet, shapes, message):
    with pytest.raises(ContractError) as err:
        tiny_unet.bind(shapes)
    assert message in str(err.value)
    assert "unet" in str(err.value)


def test_range_check_is_optional_and_dtype_is_checked(tiny_unet):
    big = {"sample": (9, 4, 8, 8), "timestep": (9,), "encoder_hidden_states": (9, 8, 32)}
    assert tiny_unet.bind(big, check_range=False) == {"batch": 9}  # ONNX Runtime runs any batch
    x = tiny_unet.sample_inputs()
    x["sample"] = x["sample"].half()
    with pytest.raises(ContractError, match="dtype torch.float16, expected float32"):
        tiny_unet.bind_tensors(x)


def test_unet_inputs_expand_a_scalar_timestep(tiny_unet):
    lat, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 8, 32)
    for t in (torch.tensor(981), 981, torch.full((3,), 981)):
        feeds = unet_inputs(tiny_unet, lat, t, ctx)
        assert feeds["timestep"].tolist() == [981.0] * 3 and feeds["timestep"].dtype == torch.float32
    with pytest.raises(ContractError, match="timestep must be a scalar or"):
        unet_inputs(tiny_unet, lat, torch.ones(2), ctx)


def test_malformed_contracts_are_refused():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        DimRange(2, 1, 4)
    with pytest.raises(ValueError, match="declared"):
        IOContract("m", (TensorSpec("x", ("n", 3)),), (TensorSpec("y", ("n",)),), {})
    with pytest.raises(ValueError, match="unknown dtype"):
        TensorSpec("x", (1,), "float64")
    with pytest.raises(ValueError, match="max_batch"):
        unet_contract(preset("tiny").diffusion.unet, coord_channels=0, num_queries=8, max_batch=0)
