"""UNet suite: the diffusion decoder's step on a backend against eager PyTorch in the
same dtype, and a whole reconstruction from a caption embedding.

* ``nano`` (and ``tiny``, for tests): the bundled model's UNet in float32 at batch 1 and
  2 (one image without / with classifier-free guidance) on the "auto" backend (ONNX
  Runtime on a CPU), and a reconstruction at the model's own steps.
* ``paper`` (GPU only): an SD-2.1-base UNet and VAE at 512 px (64x64 latents), random
  weights (a step's time does not depend on their values), fp16 on CUDA, on the "auto"
  backend (TensorRT when it imports, else torch.compile): the UNet call at batch 2 (one
  image with CFG) and a 50-step reconstruction (UNet steps + VAE decode, from a caption
  embedding) at batch 1, the issue's H100 targets (<= 6 ms, <= 0.4 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlv_engine.bench.measure import PeakMemory, time_calls
from vlv_engine.bench.report import Row


@dataclass
class UNetBenchModel:
    diffusion: object  # DiffusionDecoder, on its device and dtype
    num_queries: int
    context_dim: int
    steps: int  # a reconstruction's sampler steps
    guidance_scale: float


def unet_bench_model(preset: str, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> UNetBenchModel:
    from vlv_engine.bench.pipelines import load_model
    from vlv_engine.config import preset as get_preset

    if preset == "paper":
        if device.type != "cuda":
            raise ValueError("the paper preset's UNet (SD-2.1-base at 512 px) is GPU only: use --device cuda")
        from vlv_engine.models.diffusion import DiffusionDecoder

        config = get_preset("paper")
        torch.manual_seed(seed)
        # Built on the CPU like a loaded model (the scheduler's tables stay there), then moved.
        diffusion = DiffusionDecoder.from_config(config.diffusion)
        diffusion = diffusion.to(device=device, dtype=dtype).eval().requires_grad_(False)
        diffusion.vae_dtype = dtype
        return UNetBenchModel(diffusion, config.encoder.num_queries, config.bottleneck.hidden_size,
                              steps=50, guidance_scale=7.5)
    if preset in ("nano", "tiny"):
        model, _ = load_model(preset, seed=seed, with_diffusion=True)
        if model.diffusion is None:
            raise ValueError(f"the {preset} model has no diffusion decoder")
        diffusion = model.diffusion.to(device=device, dtype=dtype)
        cfg = model.config.diffusion
        return UNetBenchModel(diffusion, model.config.encoder.num_queries, model.config.bottleneck.hidden_size,
                              steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale)
    raise ValueError(f"the {preset} preset is built caption-only (no diffusion decoder)")


def run_unet(bench: UNetBenchModel, *, device: torch.device, batches: list[int], repeats: int,
             backend: str = "auto", reconstruct: bool = True, max_batch: int | None = None) -> list[Row]:
    """UNet calls at each of `batches` and (with `reconstruct`) a whole draw at batch 1,
    each on the `backend` runner (built for up to `max_batch`, default the largest
    batch) and on eager PyTorch."""
    from vlv_engine.engine.backends.select import EagerUNetRunner, build_unet_runner, select_backend

    diffusion = bench.diffusion
    dtype = diffusion.unet.dtype
    choice = select_backend(backend, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    max_batch = max_batch or max(batches)
    fast = build_unet_runner(choice, diffusion, num_queries=bench.num_queries, max_batch=max_batch,
                             device=device, dtype=dtype, cuda_graph=cuda and choice.name == "tensorrt")
    ref = EagerUNetRunner(diffusion)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        latents = torch.randn(batch, *diffusion.latent_shape(1)[1:], generator=g).to(device, dtype)
        context = torch.randn(batch, bench.num_queries, bench.context_dim, generator=g).to(device, dtype)
        t = torch.tensor(500, device=device)
        out = {}
        with PeakMemory(device) as mem_fast:
            tf = time_calls(lambda: out.__setitem__("f", fast(latents, t, context)), repeats=repeats, warmup=2,
                            device=device)
        with PeakMemory(device) as mem_ref:
            tr = time_calls(lambda: out.__setitem__("r", ref(latents, t, context)), repeats=repeats, warmup=2,
                            device=device)
        rel = float((out["f"].float() - out["r"].float()).norm() / out["r"].float().norm())
        rows.append(Row("unet", "UNet call p50", "ms", batch, tf.median * 1e3, tr.median * 1e3, "lower",
                        {"backend": choice.name, "dtype": str(dtype).removeprefix("torch."), "rel_err": f"{rel:.1e}",
                         **_memory(mem_fast, mem_ref, device)}))
    if reconstruct:
        rows.append(_reconstruction_row(bench, choice, fast, device=device, repeats=repeats, max_batch=max_batch))
    return rows


def _reconstruction_row(bench: UNetBenchModel, choice, fast_runner, *, device: torch.device, repeats: int,
                        max_batch: int) -> Row:
    """Caption embedding -> image at batch 1: every UNet step (CFG batched) and the VAE decode."""
    from vlv_engine.engine.backends.select import build_vae_decoder_runner

    diffusion = bench.diffusion
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, bench.num_queries, bench.context_dim, generator=g).to(device)
    uncond = torch.randn(1, bench.num_queries, bench.context_dim, generator=g).to(device)
    vae_runner = build_vae_decoder_runner(choice, diffusion, max_batch=max_batch, device=device)

    def draw(unet_runner, vae):
        diffusion.set_unet_backend(unet_runner)
        diffusion.set_vae_decoder_backend(vae)
        try:
            return diffusion.sample(cond, uncond, steps=bench.steps, guidance_scale=bench.guidance_scale,
                                    generators=[torch.Generator(device=device).manual_seed(0)])
        finally:
            diffusion.set_unet_backend(None)
            diffusion.set_vae_decoder_backend(None)

    out = {}
    with PeakMemory(device) as mem_fast:
        tf = time_calls(lambda: out.__setitem__("f", draw(fast_runner, vae_runner)), repeats=repeats, warmup=1,
                        device=device)
    with PeakMemory(device) as mem_ref:
        tr = time_calls(lambda: out.__setitem__("r", draw(None, None)), repeats=repeats, warmup=1, device=device)
    diff = float((out["f"] - out["r"]).abs().max()) * 255  # images in [0, 1]
    return Row("unet", f"reconstruction, {bench.steps} steps", "s", 1, tf.median, tr.median, "lower",
               {"backend": choice.name, "cfg": bench.guidance_scale != 1.0, "max_diff_uint8": f"{diff:.1f}",
                **_memory(mem_fast, mem_ref, device)})


def _memory(fast: PeakMemory, ref: PeakMemory, device: torch.device) -> dict:
    if device.type == "cuda":
        return {"max_alloc_GB": round(fast.peak_cuda / 2**30, 2), "ref_max_alloc_GB": round(ref.peak_cuda / 2**30, 2)}
    return {"rss_GB": round(fast.peak_rss / 2**30, 2), "ref_rss_GB": round(ref.peak_rss / 2**30, 2)}
