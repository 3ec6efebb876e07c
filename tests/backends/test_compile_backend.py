"""torch.compile of the UNet step (inductor C++ on the CPU): slow, compile takes tens of seconds."""

import copy

import pytest
import torch
from conftest import rel_err

from vlv_engine.engine.backends.compile_backend import CompiledUNetRunner


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_unet_matches_eager(coord_decoder, channels_last):
    decoder = copy.deepcopy(coord_decoder)  # channels_last changes the UNet's layout
    runner = CompiledUNetRunner(decoder, channels_last=channels_last)
    for b in (2, 2, 3):  # the second call reuses the graph
        latents, context = torch.randn(b, 4, 8, 8), torch.randn(b, 8, 32)
        with torch.no_grad():
            ref = coord_decoder.predict_noise(latents, torch.tensor(250), context)
        out = runner(latents, torch.tensor(250), context)
        assert out.shape == ref.shape and out.is_contiguous()
        assert rel_err(out, ref) < 1e-4
