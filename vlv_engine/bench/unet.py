"""UNet suite: one UNet call (the diffusion decoder's step; batch 2 = one image with
classifier-free guidance) on the engine's "auto" backend against eager PyTorch
(`vlv_engine.engine.backends`). Only for models with a diffusion decoder."""

from __future__ import annotations

import torch

from vlv_engine.bench.measure import time_calls
from vlv_engine.bench.report import Row


def run_unet(model, *, device: torch.device, batches: list[int], repeats: int) -> list[Row]:
    from vlv_engine.engine.backends.select import EagerUNetRunner, build_unet_runner, select_backend

    diffusion = model.diffusion.to(device)
    nq, dim = model.config.encoder.num_queries, model.config.bottleneck.text_encoder["hidden_size"]
    choice = select_backend("auto", device=device, dtype=torch.float32)
    fast = build_unet_runner(choice, diffusion, num_queries=nq, max_batch=max(batches), device=device)
    ref = EagerUNetRunner(diffusion)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        latents = torch.randn(batch, *diffusion.latent_shape(1)[1:], generator=g).to(device)
        context = torch.randn(batch, nq, dim, generator=g).to(device)
        t = torch.tensor(500, device=device)
        out = {}
        tf = time_calls(lambda: out.__setitem__("f", fast(latents, t, context)), repeats=repeats, warmup=2,
                        device=device)
        tr = time_calls(lambda: out.__setitem__("r", ref(latents, t, context)), repeats=repeats, warmup=2,
                        device=device)
        rel = float((out["f"].float() - out["r"].float()).norm() / out["r"].float().norm())
        rows.append(Row("unet", "UNet call p50", "ms", batch, tf.median * 1e3, tr.median * 1e3, "lower",
                        {"backend": choice.name, "rel_err": f"{rel:.1e}"}))
    return rows
