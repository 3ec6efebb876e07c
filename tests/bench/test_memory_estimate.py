"""The caption path's memory sized on the meta device (vlv_engine.bench.memory_estimate)."""

import pytest
import torch

from vlv_engine.bench.memory_estimate import estimate, int4_linear_bytes


def test_components_add_up_on_the_tiny_preset():
    est = estimate("tiny", batch=3, beams=2, new_tokens=5, dtype=torch.float32)
    assert est["encoder_batch_size"] == 3  # tiny images: the whole batch in one forward
    for key in ("encoder_weights_GiB", "llm_weights_GiB", "encoder_activations_GiB", "kv_caches_GiB",
                "prefill_activations_GiB"):
        assert est[key] > 0, key
    weights = est["encoder_weights_GiB"] + est["llm_weights_GiB"]
    assert est["peak_steady_GiB"] == pytest.approx(
        weights + est["kv_caches_GiB"] + max(est["encoder_activations_GiB"], est["prefill_activations_GiB"]))
    # kv: (bucket 4 rows x 2 beams + 4 prefill rows) x 2 x layers x kv heads x 64 positions x head dim x 4 bytes
    assert est["kv_caches_GiB"] > 0 and est["peak_first_call_GiB"] <= est["peak_steady_GiB"]


def test_int4_layout_bytes():
    linear = torch.nn.Linear(11008, 2048, bias=False, device="meta")
    # input padded to 11264, 4 bits per weight, a bf16 (scale, zero) per 128 inputs per output
    assert int4_linear_bytes(linear) == 2048 * 11264 // 2 + 88 * 2048 * 4


def test_paper_caption_path_fits_its_memory_targets():
    """The engine's defaults at batch 8, 4 beams, 300 tokens: <= 10 GB in bf16, <= 6 GB with
    an int4 LLM (the GPU measures the same with `vlv bench --suites memory`)."""
    bf16 = estimate("paper", batch=8)
    assert bf16["encoder_batch_size"] == 2
    assert bf16["peak_steady_GiB"] <= 10.0
    # Florence-2's and CLIP's vocabulary tables stay on the host (engine.unread_tables).
    assert bf16["host_tables_GiB"] == pytest.approx((51289 + 49408) * 1024 * 2 / 2**30)
    int4 = estimate("paper", batch=8, quantize="int4_weight_only")
    assert int4["peak_steady_GiB"] <= 6.0
    assert int4["llm_weights_GiB"] < bf16["llm_weights_GiB"] / 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int4_layout_bytes_match_torchao_on_cuda():
    from vlv_engine.engine.quantize import quantize_llm, tensor_bytes

    class Holder(torch.nn.Module):  # quantize_llm's interface: linears inside a model
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(11008, 2048, bias=False, device="cuda", dtype=torch.bfloat16)

        def get_input_embeddings(self):
            return None

    model = Holder()
    want = int4_linear_bytes(model.proj)
    quantize_llm(model, "int4_weight_only", device="cuda")
    assert tensor_bytes(model.proj.weight) == want
