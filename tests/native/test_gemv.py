"""The native int8-weight linear kernel (kernels/gemv, vlv_engine.native.gemv) against
its plain-PyTorch reference: dequantize, then a float32 linear layer.

Bound: fp32 relative error < 1e-5 (only the summation order differs)."""

import pytest
import torch

from vlv_engine.native import gemv

pytestmark = pytest.mark.skipif(not gemv.available(), reason=f"int8 kernel unavailable: {gemv.unavailable_reason()}")


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# Odd shapes: K not a multiple of 8 or 64 (vector tails, prefetch steps), N below one task
# or not a multiple of the 3-output-row tiles, rows in every remainder of the 4-row tiles
# (3 rows and more take the tiled loop), decode-like shapes (beams, a prefill), and 1-2 rows
# wide enough to take the far-prefetch loop (more than 4 KB of input rows), with tails.
SHAPES = [(1, 4869, 96), (2, 1030, 33), (1, 8, 1), (1, 37, 11), (2, 100, 33), (3, 64, 17), (4, 896, 128), (5, 33, 200), (7, 257, 65),
          (1, 896, 4864), (9, 4864, 96), (13, 896, 64), (32, 130, 301), (70, 72, 7), (6, 7, 5)]


@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(rows, k, n, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    q, scale = gemv.quantize_rows(torch.randn(n, k, generator=g))
    x = torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    out = gemv.int8_weight_linear(x, q, scale, bias)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert rel_err(out, gemv.int8_weight_linear_reference(x, q, scale, bias)) < 1e-5


LEVELS = ("scalar", "avx2", "avx512")  # lowest first, as the kernel ranks them


def _runs(level: str) -> bool:
    best = gemv.simd_level()
    return LEVELS.index(level) <= LEVELS.index(best)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("rows,k,n", [(1, 4869, 96), (2, 1030, 33), (1, 37, 11), (1, 896, 4864), (2, 100, 33),
                                      (3, 64, 17)])
def test_every_instruction_set_matches_reference(level, rows, k, n):
    """Each loop the kernel has (16-lane AVX-512, 8-lane AVX2, scalar), each on the shapes
    that take its row loop, vector tails and far prefetching; the module picks the best."""
    if not _runs(level):
        pytest.skip(f"this CPU runs up to {gemv.simd_level()}, not {level}")
    module = gemv._load()[0]
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    q, scale = gemv.quantize_rows(torch.randn(n, k, generator=g))
    x, bias = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    y = torch.empty(rows, n)
    module.int8_linear(x.numpy(), q.numpy(), scale.numpy(), bias.numpy(), y.numpy(), 2, level)
    assert rel_err(y, gemv.int8_weight_linear_reference(x, q, scale, bias)) < 1e-5


def test_instruction_sets_are_named_and_capped_by_the_cpu():
    module = gemv._load()[0]
    assert gemv.simd_level() in LEVELS
    x, q, scale, y = torch.randn(1, 16), torch.ones(4, 16, dtype=torch.int8), torch.ones(4), torch.empty(1, 4)
    with pytest.raises(ValueError, match="choose best, avx512, avx2 or scalar"):
        module.int8_linear(x.numpy(), q.numpy(), scale.numpy(), None, y.numpy(), 1, "sse9")
    above = [lv for lv in LEVELS if not _runs(lv)]
    for level in above:
        with pytest.raises(ValueError, match="this CPU's best is"):
            module.int8_linear(x.numpy(), q.numpy(), scale.numpy(), None, y.numpy(), 1, level)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_and_leading_dims(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        q, scale = gemv.quantize_rows(torch.randn(300, 96, generator=g))
        x = torch.randn(2, 3, 96, generator=g)[:, :, :]  # [B, T, K]
        out = gemv.int8_weight_linear(x, q, scale, None)
        assert out.shape == (2, 3, 300)
        assert rel_err(out, gemv.int8_weight_linear_reference(x, q, scale, None)) < 1e-5
        # a non-contiguous x (a column slice) is read correctly
        wide = torch.randn(4, 200, generator=g)
        xs = wide[:, 50:146]
        assert rel_err(gemv.int8_weight_linear(xs, q, scale, None),
                       gemv.int8_weight_linear_reference(xs, q, scale, None)) < 1e-5
    finally:
        torch.set_num_threads(before)


def test_quantize_rows_is_symmetric_per_row():
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5], [0.0, 0.0, 0.0]])
    q, scale = gemv.quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.allclose(scale[:2], torch.tensor([1.0, 2.0]) / 127)
    assert torch.equal(q[0], torch.tensor([64, -127, 32], dtype=torch.int8))  # round(63.5) = 64
    assert torch.equal(q[2], torch.zeros(3, dtype=torch.int8))  # an all-zero row stays zero
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-7


def test_module_replaces_a_linear_and_compiles_through_the_op():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    mod = gemv.Int8Linear.from_linear(lin)
    x = torch.randn(3, 40)
    with torch.no_grad():
        want = gemv.int8_weight_linear_reference(x, mod.weight, mod.scale, mod.bias)
        assert rel_err(mod(x), want) < 1e-5
        assert rel_err(mod(x), lin(x)) < 2e-2  # what int8 weights cost
        # the fake implementation lets torch.compile trace the op as one opaque call
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            fake = gemv.int8_weight_linear(mode.from_tensor(x), mode.from_tensor(mod.weight),
                                           mode.from_tensor(mod.scale), mode.from_tensor(mod.bias))
        assert fake.shape == (3, 24)
    assert sum(p.numel() * p.element_size() for p in mod.parameters()) == 24 * 40 + 24 * 4 * 2


def test_wrong_dtypes_are_refused():
    q, scale = gemv.quantize_rows(torch.randn(4, 8))
    with pytest.raises(TypeError, match="float32 x"):
        gemv.int8_weight_linear(torch.randn(1, 8, dtype=torch.bfloat16), q, scale, None)
    with pytest.raises(ValueError, match="input features"):
        gemv.int8_weight_linear(torch.randn(1, 9), q, scale, None)


@pytest.mark.parametrize("call", ["op", "module"])
def test_a_gradient_is_refused_not_dropped(call):
    mod = gemv.Int8Linear.from_linear(torch.nn.Linear(8, 4))
    x = torch.randn(2, 8, requires_grad=True)
    fn = (lambda t: gemv.int8_weight_linear(t, mod.weight, mod.scale, mod.bias)) if call == "op" else mod
    with pytest.raises(RuntimeError, match="inference only"):
        fn(x)
    with torch.no_grad():
        assert rel_err(fn(x), gemv.int8_weight_linear_reference(x.detach(), mod.weight, mod.scale, mod.bias)) < 1e-5


def test_kernel_threads_hands_the_cores_to_the_pool():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with gemv.kernel_threads():
            assert torch.get_num_threads() == 1
            assert gemv._threads() == 2 or gemv._threads_override()
            with gemv.kernel_threads():  # nested: unchanged
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2 and gemv._held_threads is None
        with pytest.raises(KeyError):
            with gemv.kernel_threads():
                raise KeyError("x")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
