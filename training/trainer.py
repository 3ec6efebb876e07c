"""The training loop shared by every stage (vae, teacher, stage1, stage2).

One script for one process or many: under `torchrun` it wraps the model in DDP
(gloo on CPU, NCCL on CUDA) and each rank reads its own slice of the data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from vlv_engine.checkpoint.folder import save_folder
from vlv_training.config import TrainConfig
from vlv_training.ema import EMA
from vlv_training.losses import (Stage1Objective, Stage2Objective, TeacherObjective, VAEObjective, draw_noise,
                                 sample_latents)
from vlv_training.modeling import build_model, set_train_mode, set_trainable
from vlv_training.state import list_checkpoints, load_checkpoint, save_checkpoint

log = logging.getLogger("vlv.training")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def lr_lambda(cfg: TrainConfig):
    warmup, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio
    # (until, horizon): a step before `until` follows the schedule of a `horizon`-step run.
    pairs = sorted([(e, e) for e in cfg.optim.cycle_ends] + [tuple(p) for p in cfg.optim.horizons])
    pairs = [(until, horizon) for until, horizon in pairs if 0 < until < cfg.steps] + [(max(cfg.steps, 1),) * 2]

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        total = next((h for until, h in pairs if step < until), pairs[-1][1])  # this step's horizon
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.optim.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.optim.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0

    return factor


class LatentCache:
    """VAE moments (mean, logvar) per sample key, computed once: the VAE is frozen, so
    re-encoding an image every step (as the official code does) is wasted work."""

    def __init__(self, vae, enabled: bool):
        self.vae, self.enabled = vae, enabled
        self.store: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def moments(self, keys: list[str], vae_pixels: torch.Tensor) -> torch.Tensor:
        missing = [i for i, k in enumerate(keys) if k not in self.store] if self.enabled else list(range(len(keys)))
        if missing:
            params = self.vae.encode(vae_pixels[missing].to(self.vae.dtype)).latent_dist.parameters.float()
            for j, i in enumerate(missing):
                if self.enabled:
                    self.store[keys[i]] = params[j].cpu()
            fresh = dict(zip(missing, params))
        else:
            fresh = {}
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        rows = [fresh[i] if i in fresh else self.store[k] for i, k in enumerate(keys)]
        return torch.stack([r.to(vae_pixels.device) for r in rows])


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: TrainConfig, *, device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary (final loss, steps, wall time)."""
    from vlv_training import data as data_lib

    device = torch.device(device)
    ddp = init_distributed(device)
    out_dir = Path(cfg.out_dir)
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    torch.manual_seed(cfg.seed + ddp.rank)
    built = build_model(cfg.init)
    model = built.model.to(device)
    if cfg.stage != "stage2" and model.diffusion is None:
        raise ValueError(f"{cfg.stage} needs the diffusion decoder (UNet + VAE) in the init model")
    if cfg.stage == "stage2" and (model.caption_decoder is None or built.llm_tokenizer is None):
        raise ValueError("stage 2 needs a caption decoder and its tokenizer in the init model")
    if cfg.stage == "teacher" and built.text_tokenizer is None:
        raise ValueError("the teacher stage needs the text encoder's tokenizer (tokenizer/) in the init model")
    params = set_trainable(model, cfg.trainable_groups)
    set_train_mode(model, cfg.trainable_groups)
    if cfg.grad_checkpointing:
        for m in (model.encoder.florence.language_model, getattr(model.caption_decoder, "llm", None)):
            if m is not None and hasattr(m, "gradient_checkpointing_enable"):
                m.gradient_checkpointing_enable()

    optimizer = torch.optim.AdamW([p for _, p in params], lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + ddp.rank)
    generators = {"noise": noise_gen}

    enc = model.config.encoder
    source = data_lib.build_source(cfg.data)
    sampler = data_lib.ShardedSampler(len(source), seed=cfg.data.seed, rank=ddp.rank, world_size=ddp.world_size)
    tokenizer = built.llm_tokenizer if cfg.stage == "stage2" else None
    vae_size = model.diffusion.vae.config.sample_size if model.diffusion is not None else None
    collate = data_lib.make_collate(enc.image_size, enc.image_mean, enc.image_std, tokenizer=tokenizer,
                                    max_caption_tokens=cfg.data.max_caption_tokens,
                                    vae_size=vae_size if cfg.stage != "stage2" else None,
                                    max_pixels=cfg.data.max_pixels)

    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    step = 0
    latest = list_checkpoints(out_dir)
    if latest:
        state = load_checkpoint(latest[-1], params=params, optimizer=optimizer, scheduler=scheduler,
                                generators=generators, ema=ema)
        step = state["step"]
        sampler.load_state_dict(state["data"])
        if ddp.is_main:
            log.info("resumed from %s at step %d", latest[-1], step)

    objective = {
        "vae": lambda: VAEObjective(model, cfg.kl_weight),
        "teacher": lambda: TeacherObjective(model, cfg.loss_weighting, cfg.min_snr_gamma),
        "stage1": lambda: Stage1Objective(model, cfg.loss_weighting, cfg.min_snr_gamma),
        "stage2": lambda: Stage2Objective(model),
    }[cfg.stage]()
    if cfg.compile:
        objective = torch.compile(objective)
    train_obj = DDP(objective) if ddp.world_size > 1 else objective
    uses_latents = cfg.stage in ("teacher", "stage1")
    cache = LatentCache(model.diffusion.vae, cfg.cache_latents) if uses_latents else None
    inputs_fn = _Inputs(cfg, model, built.text_tokenizer, cache, noise_gen, device)

    loader = data_lib.make_loader(source, sampler, collate, batch_size=cfg.batch_size,
                                  num_workers=cfg.data.num_workers)
    batches = _forever(loader, sampler)
    metrics_path = out_dir / "metrics.jsonl"
    bar = None
    if progress and ddp.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=cfg.stage, dynamic_ncols=True)
    t0, samples, last_loss = time.perf_counter(), 0, float("nan")
    deadline = None if cfg.max_minutes is None else time.monotonic() + 60 * cfg.max_minutes
    stopped_early = False
    while step < cfg.steps:
        if deadline is not None and time.monotonic() > deadline:
            stopped_early = True
            break
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            sync = micro == cfg.grad_accum - 1 or ddp.world_size == 1
            ctx = contextlib.nullcontext() if sync else train_obj.no_sync()
            inputs = inputs_fn(batch)
            with ctx, _autocast(cfg, device):
                loss = train_obj(*inputs) / cfg.grad_accum
            loss.backward()
            total += loss.item()
            samples += len(batch["keys"]) * ddp.world_size
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update()
        step += 1
        last_loss = total
        if ddp.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            elapsed = time.perf_counter() - t0
            record = {"step": step, "loss": total, "lr": scheduler.get_last_lr()[0],
                      "samples_per_s": samples / max(elapsed, 1e-9), "time": time.time()}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            sps=f"{samples / max(time.perf_counter() - t0, 1e-9):.1f}")
        out_of_time = deadline is not None and time.monotonic() > deadline
        if ddp.is_main and (step % cfg.save_every == 0 or step == cfg.steps or out_of_time):
            save_checkpoint(out_dir, step, params=params, optimizer=optimizer, scheduler=scheduler,
                            data_state=sampler.state_dict(), generators=generators, config=cfg.to_dict(),
                            keep_last=cfg.keep_last, ema=ema)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    if ddp.is_main and not stopped_early:
        model.eval()
        if ema is not None:
            ema.copy_to_params()  # the model is the average; the last checkpoint keeps the raw weights
        save_folder(out_dir / "model", model, llm_tokenizer=built.llm_tokenizer, text_tokenizer=built.text_tokenizer)
        try:
            from vlv_training.plot import plot_metrics

            plot_metrics(metrics_path, out_dir / "loss.png")
        except ImportError as err:  # matplotlib is an optional extra
            log.warning("no loss plot: %s", err)
    if ddp.world_size > 1:
        dist.barrier()
    return {"step": step, "loss": last_loss, "wall_s": wall, "complete": step >= cfg.steps,
            "latent_cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses}}


def _forever(loader, sampler) -> Iterator[dict[str, Any]]:
    while True:
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise RuntimeError("the training data produced no batch (all items failed, or fewer items than "
                               "one batch per rank)")
        sampler.set_epoch(sampler.epoch + 1)


class _Inputs:
    """The objective's tensor inputs for a batch; every random draw (latent samples,
    timesteps, noise, caption dropout) comes from the run's own generator, so a resumed
    run draws exactly what the uninterrupted one would have."""

    def __init__(self, cfg: TrainConfig, model, text_tokenizer, cache: LatentCache | None,
                 gen: torch.Generator, device: torch.device):
        self.cfg, self.model, self.tok, self.cache, self.gen, self.device = cfg, model, text_tokenizer, cache, gen, device

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        moments = self.cache.moments(batch["keys"], batch["vae_pixel_values"].to(self.device))
        return sample_latents(moments, self.gen, self.model.diffusion.scaling_factor,
                              mode=self.cfg.latent_sampling == "mode")

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        cfg, model, dev = self.cfg, self.model, self.device
        if cfg.stage == "vae":
            pixels = batch["vae_pixel_values"].to(dev)
            f = 2 ** (len(model.diffusion.vae.config.block_out_channels) - 1)
            shape = (pixels.shape[0], model.diffusion.vae.config.latent_channels, pixels.shape[2] // f,
                     pixels.shape[3] // f)
            return pixels, torch.randn(shape, generator=self.gen, device=dev)
        if cfg.stage == "teacher":
            latents = self._latents(batch)
            t, noise = draw_noise(latents, model.diffusion.scheduler.config.num_train_timesteps, self.gen)
            drop = torch.rand(len(batch["captions"]), generator=self.gen, device=dev) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(batch["captions"], drop.tolist())]
            # Padded to Nq: the length every caption embedding has (and the empty prompt's).
            ids = self.tok(captions, padding="max_length", max_length=model.config.encoder.num_queries,
                           truncation=True, return_tensors="pt").input_ids.to(dev)
            return ids, latents, noise, t
        pixels = batch["pixel_values"].to(dev)
        if cfg.stage == "stage1":
            latents = self._latents(batch)
            t, noise = draw_noise(latents, model.diffusion.scheduler.config.num_train_timesteps, self.gen)
            return pixels, latents, noise, t
        return pixels, *(batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
