"""The Engine's decoder choice: "static" (default) captions equal "reference" ones."""

import pytest

from vlv_engine.testing import tiny_engine


@pytest.fixture(scope="module")
def reference_engine():
    return tiny_engine(seed=0, with_diffusion=False, decoder="reference")


def test_default_decoder_is_static(tiny):
    assert tiny.decoder == "static"


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="unknown decoder"):
        tiny_engine(seed=0, with_diffusion=False, decoder="fast")


@pytest.mark.parametrize("options", [dict(num_beams=1, max_new_tokens=12), dict(num_beams=3, max_new_tokens=10),
                                     dict(num_beams=4, max_new_tokens=10, early_stopping=False)],
                         ids=["greedy", "beams3", "beams4-no-early-stop"])
def test_static_captions_equal_reference_captions(options, tiny, reference_engine, rgb_images):
    static = tiny.caption(rgb_images, batch_size=4, **options)  # 9 images: buckets 4, 4, 1
    ref = reference_engine.caption(rgb_images, batch_size=4, **options)
    assert static == ref
    assert len(set(static)) >= 3
