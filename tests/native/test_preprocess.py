"""vlv_engine.native.preprocess_batch against its Pillow + torch specification.

The native resize reproduces Pillow's arithmetic, so the comparisons are exact
(torch.equal), stricter than the 1-uint8-level budget the op is allowed.
"""

import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from vlv_engine import images as image_io
from vlv_engine import native
from vlv_engine.images import ImageInputError
from vlv_engine.native import _loader

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def photo(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients + hard edges + noise: a resize sees every kind of content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 128 + 100 * np.sin(x / max(w, 1) * 7 + seed) * np.cos(y / max(h, 1) * 5)
    edges = np.where((x // 9 + y // 13) % 2 == 0, 60.0, -60.0)
    planes = [base + edges * (c - 1) + rng.normal(0, 20, (h, w)) for c in range(channels)]
    return np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)


def big_photo(h: int, w: int, seed: int) -> np.ndarray:
    """A cheap camera-sized image: gradients, a checkerboard and noise, all in uint8."""
    rng = np.random.default_rng(seed)
    y = np.arange(h, dtype=np.int64)[:, None]
    x = np.arange(w, dtype=np.int64)[None, :]
    base = (y * 120 // h + x * 100 // w + ((y // 37 + x // 53) % 2) * 30).astype(np.uint8)  # [H, W]
    return base[..., None] + rng.integers(0, 6, (h, w, 3), dtype=np.uint8) * np.uint8(5)


@pytest.fixture(autouse=True)
def _fresh_loader():
    _loader._load.cache_clear()
    _loader._noticed = False
    yield
    _loader._load.cache_clear()
    _loader._noticed = False


def test_extension_is_built_and_reproduces_installed_pillow():
    assert native.available(), _loader._load().reason
    assert native.simd_level() in ("avx2", "sse4.1", "scalar")
    major = int(Image.__version__.split(".")[0])
    assert _loader._load().order == (1 if major >= 13 else 0)


SIZES = [
    ((1, 1), 5), ((7, 300), 33), ((1000, 13), 64), ((13, 1000), 64), ((5, 5), 96),  # odd shapes, upscaling
    ((480, 640), 64), ((300, 200), (48, 80)), ((64, 64), 64), ((64, 90), 64), ((90, 64), 64),  # identity axes
    ((333, 251), 224), ((31, 500), 17), ((1200, 800), 128), ((257, 1023), 96),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_on_odd_and_random_sizes(dtype):
    images = [photo(h, w, seed=i) for i, ((h, w), _) in enumerate(SIZES)]
    for image, (_, size) in zip(images, SIZES):
        got = native.preprocess_batch([image], size, MEAN, STD, dtype)
        want = native.preprocess_batch_reference([image], size, MEAN, STD, dtype)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want), (image.shape, size)


def test_matches_reference_in_one_mixed_batch_and_random_sizes():
    rng = np.random.default_rng(7)
    shapes = [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(12)]
    images = [photo(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    for size in (1, 37, (20, 300), 160):
        got = native.preprocess_batch(images, size, MEAN, STD)
        assert torch.equal(got, native.preprocess_batch_reference(images, size, MEAN, STD)), size


def test_grey_and_rgba_inputs_match_load_image():
    grey = photo(90, 70, 1, channels=1)
    rgba = photo(80, 120, 2, channels=4)
    rgba[..., 3] = np.linspace(0, 255, 120, dtype=np.float32).astype(np.uint8)[None, :]  # every alpha level
    inputs = [grey, grey[..., 0], rgba]
    got = native.preprocess_batch(inputs, 48, MEAN, STD)
    assert torch.equal(got, native.preprocess_batch_reference(inputs, 48, MEAN, STD))
    assert torch.equal(got[0], got[1])
    # and the reference is the project's image path
    want = image_io.preprocess([image_io.load_image(a) for a in inputs], 48, MEAN, STD, native=False)
    assert torch.equal(got, want)


def test_scalar_and_simd_paths_and_both_pass_orders_agree():
    module = _loader._load().module
    for i, (h, w, oh, ow) in enumerate([(301, 77, 40, 60), (77, 301, 60, 40), (500, 20, 30, 25), (9, 9, 31, 17)]):
        for channels in (1, 3, 4):
            image = photo(h, w, seed=i, channels=channels)
            for order in (0, 1):
                simd = np.empty((1, oh, ow, 3), np.uint8)
                scalar = np.empty((1, oh, ow, 3), np.uint8)
                module.resize_u8([image], simd, order, 2, True)
                module.resize_u8([image], scalar, order, 1, False)
                assert np.array_equal(simd, scalar), (h, w, channels, order)


def test_resize_batch_equals_pillow():
    images = [photo(123, 457, 0), photo(640, 480, 1), photo(3, 2, 2)]
    out = native.resize_batch(images, (50, 70))
    assert out.shape == (3, 50, 70, 3) and out.dtype == np.uint8
    for a, got in zip(images, out):
        want = np.asarray(Image.fromarray(a).resize((70, 50), Image.Resampling.BICUBIC, reducing_gap=None))
        assert np.array_equal(got, want)


def test_threads_do_not_change_the_result_and_batches_are_invariant():
    images = [photo(h, w, seed=s) for s, (h, w) in enumerate([(400, 300), (50, 900), (640, 480), (7, 7), (300, 301)])]
    first = native.preprocess_batch(images, 96, MEAN, STD, num_threads=1)
    for threads in (2, 3, 8):
        assert torch.equal(native.preprocess_batch(images, 96, MEAN, STD, num_threads=threads), first)
    for i, image in enumerate(images):  # alone, one thread per stripe of rows
        assert torch.equal(native.preprocess_batch([image], 96, MEAN, STD, num_threads=4)[0], first[i])
    assert torch.equal(native.preprocess_batch(images[2:4], 96, MEAN, STD)[1], first[3])


def test_concurrent_callers_get_their_own_results():
    images = [photo(300, 200 + 10 * i, seed=i) for i in range(6)]
    want = [native.preprocess_batch_reference([a], 64, MEAN, STD) for a in images]
    got: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        got[i] = native.preprocess_batch([images[i]], 64, MEAN, STD, num_threads=2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], want[i]) for i in range(len(images)))


def test_non_contiguous_inputs_are_handled():
    base = photo(200, 300, 3, channels=4)
    views = [base[::2, ::3, :3], base[:, :, :3].transpose(1, 0, 2), base[10:50, 20:90, 2:3], base[..., :3][::-1]]
    got = native.preprocess_batch(views, 40, MEAN, STD)
    want = native.preprocess_batch_reference([np.ascontiguousarray(v) for v in views], 40, MEAN, STD)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("item", "match"),
    [
        (np.zeros((8, 8, 3), np.float32), r"image 1 \(<ndarray float32 \(8, 8, 3\)>\): dtype float32, expected uint8"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"image 1 .*4 dimensions"),
        (np.zeros((8, 8, 2), np.uint8), r"image 1 .*1, 3 or 4 channels.*got 2"),
        (np.zeros((0, 8, 3), np.uint8), r"image 1 .*zero-size"),
        (Image.new("RGB", (4, 4)), r"image 1 .*expected a uint8 numpy array, got Image"),
    ],
)
def test_bad_items_are_refused_naming_the_item(item, match):
    good = photo(8, 8, 0)
    for fn in (native.preprocess_batch, native.preprocess_batch_reference):
        with pytest.raises(ImageInputError, match=match) as info:
            fn([good, item], 16, MEAN, STD)
        assert info.value.index == 1


def test_bad_arguments_are_refused():
    good = [photo(8, 8, 0)]
    with pytest.raises(ValueError, match="list of arrays"):
        native.preprocess_batch(photo(8, 8, 0), 16, MEAN, STD)
    with pytest.raises(ValueError, match="size must be positive"):
        native.preprocess_batch(good, 0, MEAN, STD)
    with pytest.raises(ValueError, match="size must be an int or"):
        native.preprocess_batch(good, "big", MEAN, STD)
    with pytest.raises(ValueError, match="3 values"):
        native.preprocess_batch(good, 16, (0.5,), STD)
    with pytest.raises(ValueError, match="non-zero"):
        native.preprocess_batch(good, 16, MEAN, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="dtype must be"):
        native.preprocess_batch(good, 16, MEAN, STD, torch.int32)
    with pytest.raises(ValueError, match="num_threads"):
        native.preprocess_batch(good, 16, MEAN, STD, num_threads=0)
    assert native.preprocess_batch([], 16, MEAN, STD).shape == (0, 3, 16, 16)


def test_missing_extension_falls_back_with_a_notice(monkeypatch, caplog):
    images = [photo(100, 80, 0), photo(33, 200, 1)]
    want = native.preprocess_batch(images, 32, MEAN, STD, torch.bfloat16)
    monkeypatch.setitem(__import__("sys").modules, "vlv_engine.native._preprocess", None)  # import fails
    _loader._load.cache_clear()
    with caplog.at_level(logging.INFO, logger="vlv_engine.native"):
        assert not native.available()
        got = native.preprocess_batch(images, 32, MEAN, STD, torch.bfloat16)
        native.preprocess_batch(images, 32, MEAN, STD)
    notices = [r for r in caplog.records if "Pillow + torch image path" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.WARNING  # once, and visible
    assert "not built" in notices[0].getMessage()
    assert torch.equal(got, want)
    assert np.array_equal(native.resize_batch(images, 16)[1],
                          np.asarray(Image.fromarray(images[1]).resize((16, 16), Image.Resampling.BICUBIC,
                                                                       reducing_gap=None)))


def test_switched_off_by_environment(monkeypatch, caplog):
    monkeypatch.setenv("VLV_NATIVE", "0")
    images = [photo(60, 50, 0)]
    with caplog.at_level(logging.INFO, logger="vlv_engine.native"):
        assert not native.available()
        got = native.preprocess_batch(images, 24, MEAN, STD)
    assert any("VLV_NATIVE=0" in r.getMessage() for r in caplog.records)
    assert torch.equal(got, native.preprocess_batch_reference(images, 24, MEAN, STD))
    with pytest.raises(RuntimeError, match="not available"):
        image_io.preprocess([Image.fromarray(images[0])], 24, MEAN, STD, native=True)


def test_images_preprocess_uses_the_native_path_with_the_same_result(monkeypatch):
    pil = [Image.fromarray(photo(h, w, s)) for s, (h, w) in enumerate([(120, 90), (90, 300), (32, 32)])]
    calls = []
    real = native.preprocess_batch
    monkeypatch.setattr(native, "preprocess_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    for dtype in (None, torch.bfloat16):
        got = image_io.preprocess(pil, (32, 48), MEAN, STD, dtype=dtype)
        assert torch.equal(got, image_io.preprocess(pil, (32, 48), MEAN, STD, dtype=dtype, native=False))
    assert len(calls) == 2


def test_threads_env_and_default(monkeypatch):
    monkeypatch.setenv("VLV_NATIVE_THREADS", "3")
    assert _loader.num_threads() == 3
    monkeypatch.setenv("VLV_NATIVE_THREADS", "many")
    with pytest.raises(ValueError, match="VLV_NATIVE_THREADS"):
        _loader.num_threads()
    monkeypatch.delenv("VLV_NATIVE_THREADS")
    assert _loader.num_threads() >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_match_reference():
    from vlv_engine.native import cuda

    if cuda.module() is None:
        pytest.fail("CUDA is available but the CUDA kernels are not built: reinstall with VLV_NATIVE_CUDA=1")
    images = [photo(h, w, s, channels=c) for s, (h, w, c) in enumerate([(480, 640, 3), (1000, 13, 1), (5, 7, 4),
                                                                        (1200, 800, 3)])]
    for dtype in DTYPES:
        got = native.preprocess_batch(images, 96, MEAN, STD, dtype, device="cuda")
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), native.preprocess_batch_reference(images, 96, MEAN, STD, dtype))


def test_photo_sized_inputs_match_reference():
    image = big_photo(2000, 3000, 11)  # the size a camera produces, to Florence-2's 768
    for size in (768, 64):
        assert torch.equal(native.preprocess_batch([image], size, MEAN, STD, torch.bfloat16),
                           native.preprocess_batch_reference([image], size, MEAN, STD, torch.bfloat16))


def test_the_gil_is_released_while_resizing():
    import time

    module = _loader._load().module
    images = [big_photo(1500, 2000, s) for s in range(3)]
    out = np.empty((len(images), 768, 768, 3), np.uint8)
    done = threading.Event()
    span = {}

    def work() -> None:
        span["start"] = time.perf_counter()
        module.resize_u8(images, out, 1, 1)  # one C call, one thread
        span["end"] = time.perf_counter()
        done.set()

    ticks = []
    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    worker.join()
    inside = [t for t in ticks if span["start"] <= t <= span["end"]]
    duration = span["end"] - span["start"]
    # Holding the GIL for the call would freeze this loop for all of it.
    assert len(inside) > 100, (len(inside), duration)
    gaps = np.diff([span["start"], *inside, span["end"]])
    assert gaps.max() < 0.5 * duration, (gaps.max(), duration)


def test_resizing_does_not_import_torch():
    # The batch decode workers resize through vlv_engine.native and must start fast.
    import subprocess
    import sys

    code = ("import sys, numpy as np, vlv_engine.native as n; "
            "out = n.resize_batch([np.zeros((9, 7, 3), np.uint8)], 4); "
            "print(out.shape, n.available(), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "(1, 4, 4, 3) True False"
