"""The CUDA-only schemes (int4_weight_only, fp8) and quantized decoding under CUDA graphs.

Skipped without CUDA (fp8 also without compute capability 8.9). Same bounds as the CPU
schemes (test_quantize.py): tokens of a trained tiny LLM, logits SQNR, one linear layer
against the plain-PyTorch reference.
"""

import copy

import pytest
import torch
from quant_helpers import LENGTH, plain_quantized_linear, sqnr_db

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder, prepare_llm
from vlv_engine.engine.quantize import SCHEMES, _torchao_config, quantize_llm

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = needs_cuda
CUDA_TOKENS = {"int8_weight_only": 0.98, "int8_dynamic": 0.98, "int4_weight_only": 0.95, "fp8": 0.95}
CUDA_SQNR = {"int8_weight_only": 35.0, "int8_dynamic": 30.0, "int4_weight_only": 18.0, "fp8": 20.0}


@pytest.fixture(autouse=True)
def _fresh_cuda_graphs():
    """Each test starts with fresh compiled code and CUDA graph trees: a step that fails
    inside a graph's warm-up leaves the process-wide tree in a state the next test trips on."""
    yield
    torch._dynamo.reset()
    from torch._inductor.cudagraph_trees import reset_cudagraph_trees

    reset_cudagraph_trees()


def _supports(scheme: str) -> bool:
    need = SCHEMES[scheme].min_capability
    return need is None or torch.cuda.get_device_capability() >= need


def _params():
    return [pytest.param(s, marks=pytest.mark.skipif(torch.cuda.is_available() and not _supports(s),
                                                     reason=f"{s} needs compute capability {SCHEMES[s].min_capability}"))
            for s in CUDA_TOKENS]


@pytest.mark.parametrize("scheme", _params())
def test_cuda_trained_llm_tokens_agree(trained, scheme):
    llm, prefixes, _ = trained
    llm = copy.deepcopy(llm).cuda()
    prefixes = prefixes.cuda()
    gen = GenerationConfig(max_new_tokens=LENGTH, num_beams=1)
    ref = StaticDecoder(llm).generate(prefixes, gen, eos_token_id=None, pad_token_id=0)
    q = quantize_llm(copy.deepcopy(llm), scheme)
    out = StaticDecoder(q).generate(prefixes, gen, eos_token_id=None, pad_token_id=0)
    assert (out == ref).float().mean().item() >= CUDA_TOKENS[scheme]
    with torch.no_grad():
        exact = llm(inputs_embeds=prefixes).logits
        approx = q(inputs_embeds=prefixes.to(q.dtype)).logits.float()
    assert sqnr_db(exact, approx) >= CUDA_SQNR[scheme]


@pytest.mark.parametrize("scheme", [s for s in ("int4_weight_only",)])
def test_cuda_linear_matches_plain_reference(scheme):
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96).cuda()
    x = torch.randn(5, 256, device="cuda")
    model = copy.deepcopy(torch.nn.Sequential(lin)).to(torch.bfloat16)
    quantize_(model, _torchao_config(SCHEMES[scheme], 128))
    with torch.no_grad():
        exact, out = lin(x), model(x.bfloat16()).float()
        plain = plain_quantized_linear(scheme, lin, x)
    assert sqnr_db(exact, out) >= sqnr_db(exact, plain) - 6.02


@pytest.mark.parametrize("scheme", ["none", *_params()])
def test_cuda_graph_decode_matches_eager(trained, scheme):
    """The compiled, captured step on the bf16 or quantized model, prepared as the engine
    prepares it (fused projections, grouped-head attention), gives the eager model's tokens."""
    llm, prefixes, _ = trained
    q = prepare_llm(copy.deepcopy(llm).cuda())
    q = q.to(torch.bfloat16) if scheme == "none" else quantize_llm(q, scheme)
    prefixes = prefixes[:8].cuda()
    gen = GenerationConfig(max_new_tokens=LENGTH, num_beams=1)
    eager = StaticDecoder(q).generate(prefixes, gen, eos_token_id=None, pad_token_id=0)
    compiled = StaticDecoder(q, compile=True).generate(prefixes, gen, eos_token_id=None, pad_token_id=0)
    assert (compiled == eager).float().mean().item() >= 0.95  # fused kernels may round differently
