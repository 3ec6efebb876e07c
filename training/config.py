"""Training configuration: a dataclass tree, read from YAML or TOML, every field
overridable from the command line as `section.field=value`."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Parameter groups that a stage may train (names used by `trainable`).
PARAM_GROUPS = ("florence_vision", "florence_language", "queries", "language_proj", "text_encoder",
                "caption_proj", "llm", "unet", "vae")
STAGE_DEFAULT_TRAINABLE = {
    # The stand-in for a pretrained text-to-image model (the nano recipe): its VAE,
    # then its text encoder + UNet on (image, caption) pairs.
    "vae": ["vae"],
    "teacher": ["text_encoder", "unet"],
    # The paper: stage 1 trains Florence's language model, the queries and phi.
    "stage1": ["florence_language", "queries", "language_proj"],
    # Stage 2 trains psi and the LLM (+ optionally the encoder's language model).
    "stage2": ["caption_proj", "llm"],
}


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    # Warm restarts: the schedule first runs as if the run ended at cycle_ends[0], then at
    # the next end, ..., then at `steps`; at each end the lr jumps to the next curve's value
    # there (what extending a finished run by resuming it under more steps does).
    cycle_ends: list[int] = field(default_factory=list)
    # The general form, [[until, horizon], ...]: steps before `until` follow the schedule
    # of a run of `horizon` steps (the first pair that applies), later ones `steps`'s.
    # cycle_ends=[e] is [[e, e]]; [[1298, 20000]] is a run begun under steps=20000 and
    # resumed at step 1,298 under the final step count (the lr stays near its peak first).
    horizons: list[list[int]] = field(default_factory=list)


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes | folder | webdataset
    path: str | None = None  # folder root, or tar shards (a brace pattern)
    captions: str | None = None  # JSONL / parquet captions for a folder source
    num_samples: int = 100_000  # Shapes World: samples per epoch
    seed: int = 0
    jitter: int = 2
    num_workers: int = 0
    max_pixels: int | None = None
    max_caption_tokens: int = 64


@dataclass
class TrainConfig:
    stage: str = "stage1"
    # A preset name (random init) or a model folder to start from.
    init: str = "tiny"
    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights)
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = 0
    trainable: list[str] | None = None  # None: the stage's default groups
    cache_latents: bool = True  # stage 1 / teacher: VAE moments computed once per image
    # "sample" draws from the VAE posterior (as SD training does); "mode" uses its mean. A
    # small VAE trained briefly keeps a wide posterior (std above the means' own spread), and
    # sampling from it buries the layout under per-step latent noise the UNet must model.
    latent_sampling: str = "sample"
    # Noise-prediction loss weighting: "none", or "min_snr" (min(SNR, gamma) / SNR), which
    # stops easy low-noise steps from dominating and speeds up conditioning.
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1  # teacher: captions replaced by "" (classifier-free guidance)
    kl_weight: float = 1e-6  # vae
    # Average of the trainable weights (training/ema.py); the saved model is the average.
    # 0 turns it off.
    ema_decay: float = 0.0
    # Stop (with a checkpoint) after this many minutes; rerun to continue. None: no limit.
    max_minutes: float | None = None
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 3
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_DEFAULT_TRAINABLE:
            raise ValueError(f"stage must be one of {sorted(STAGE_DEFAULT_TRAINABLE)}, got {self.stage!r}")
        if self.loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"loss_weighting must be none or min_snr, got {self.loss_weighting!r}")
        if self.latent_sampling not in ("sample", "mode"):
            raise ValueError(f"latent_sampling must be sample or mode, got {self.latent_sampling!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        groups = self.trainable_groups
        unknown = set(groups) - set(PARAM_GROUPS)
        if unknown:
            raise ValueError(f"unknown trainable group(s) {sorted(unknown)}; choose from {PARAM_GROUPS}")

    @property
    def trainable_groups(self) -> list[str]:
        return list(self.trainable) if self.trainable is not None else STAGE_DEFAULT_TRAINABLE[self.stage]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown config field(s) in {where or 'top level'}: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        sub = {"optim": OptimConfig, "data": DataConfig}.get(name) if cls is TrainConfig else None
        if sub is not None:
            value = _build(sub, value or {}, name)
        elif name == "betas":
            value = tuple(float(v) for v in value)
        elif name == "cycle_ends":
            value = [int(v) for v in ([value] if isinstance(value, (int, str)) else value)]
        elif name == "horizons":
            value = [[int(v) for v in pair] for pair in value]
            if any(len(pair) != 2 for pair in value):
                raise ValueError(f"optim.horizons takes [until, horizon] pairs, got {value}")
        else:
            value = _coerce(value, str(known[name].type), f"{where + '.' if where else ''}{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, type_name: str, name: str) -> Any:
    # YAML 1.1 reads `1e-3` (no dot) as a string; numbers are numbers whatever their spelling.
    if isinstance(value, str) and type_name.split(" |")[0] in ("float", "int"):
        try:
            return float(value) if type_name.startswith("float") else int(value)
        except ValueError:
            raise ValueError(f"config field {name}: {value!r} is not a number") from None
    return value


def apply_override(data: dict[str, Any], override: str) -> None:
    """`optim.lr=3e-4` -> data["optim"]["lr"] = 3e-4 (the value parsed as YAML)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"{path}: config files are .yaml, .yml, .toml or .json")
    for override in overrides or []:
        apply_override(data, override)
    return _build(TrainConfig, data, "")
