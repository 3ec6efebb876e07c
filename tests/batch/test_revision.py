"""Model revisions (vlv_engine.batch.revision) cover what the engine holds."""

import torch

from vlv_engine.batch.revision import engine_revision
from vlv_engine.testing import tiny_engine


def test_same_weights_same_revision_and_quantized_weights_their_own():
    plain = engine_revision(tiny_engine(with_diffusion=False))
    assert engine_revision(tiny_engine(with_diffusion=False)) == plain
    schemes = ["int8_dynamic"]  # torchao: weights are tensor subclasses, hashed through their parts
    from vlv_engine.native import gemv

    if gemv.available():
        schemes.append("int8_cpu")
    seen = {plain.model}
    for scheme in schemes:
        rev = engine_revision(tiny_engine(with_diffusion=False, quantize=scheme))
        assert rev.encoder == plain.encoder  # only the LLM is quantized: cached embeddings stay valid
        assert rev.decoder != plain.decoder and rev.model not in seen
        seen.add(rev.model)
    assert len(seen) == len(schemes) + 1


def test_dtype_is_part_of_the_revision():
    a = engine_revision(tiny_engine(with_diffusion=False))
    b = engine_revision(tiny_engine(with_diffusion=False, dtype=torch.bfloat16))
    assert a.model != b.model
