"""`vlv::fbgemm_int8_linear` and `FbgemmLinear` (vlv_engine.engine.fbgemm_int8): PyTorch's
dynamic int8 linear with its product as a registered op, so that torch.compile traces
models holding it. Same results as PyTorch's layer, eager and traced; a copy is a layer
of its own; a freed layer fails by name."""

import copy
import gc

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from vlv_engine.engine.fbgemm_int8 import FbgemmLinear, fbgemm_int8_linear, swap_linears


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.GELU(), torch.nn.Linear(40, 24, bias=False))
    plain = copy.deepcopy(model)
    assert swap_linears([model]) == 2
    return model, plain


def test_layer_equals_pytorchs_dynamic_linear():
    from torch.ao.quantization import per_channel_dynamic_qconfig

    model, plain = _model()
    assert isinstance(model[0], FbgemmLinear) and isinstance(model[0], DynamicLinear)
    plain[0].qconfig = per_channel_dynamic_qconfig
    theirs = DynamicLinear.from_float(plain[0])  # PyTorch's own layer, the same weights
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        ours = model[0](x)
        assert ours.shape == (2, 5, 40) and ours.dtype == torch.float32
        assert torch.equal(ours, theirs(x))
        assert torch.equal(fbgemm_int8_linear(x, model[0].layer, 40), ours)
        assert not torch.equal(ours, plain[0](x))  # it did quantize


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_traced_whole_and_equal(backend):
    model, _ = _model(1)
    x = torch.randn(7, 48)
    torch._dynamo.reset()
    with torch.no_grad():
        traced = torch.compile(model, backend=backend, fullgraph=True)  # fails on a graph break
        assert torch.equal(traced(x), model(x))


def test_a_copy_is_a_layer_of_its_own_and_a_freed_layer_fails_by_name():
    model, _ = _model(2)
    copied = copy.deepcopy(model)
    assert copied[0].layer != model[0].layer
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(fbgemm_int8_linear(x, copied[0].layer, 40), model[0](x))
    number = model[0].layer
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match=f"int8 layer {number} no longer exists"):
        fbgemm_int8_linear(x, number, 40)


def test_the_op_reads_weights_loaded_after_it_was_made():
    model, _ = _model(3)
    other, _ = _model(4)
    x = torch.randn(3, 48)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(fbgemm_int8_linear(x, model[0].layer, 40), other[0](x))
