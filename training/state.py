"""Training checkpoints: safetensors + JSON, written atomically, the last N kept.

A checkpoint holds what a resumed run needs to continue the same loss curve: the
trainable weights, the optimizer moments, the scheduler position, every RNG state
and the data position. Frozen weights are not repeated: they come from `init`.

    out_dir/checkpoints/step_000200/
        weights.safetensors    trainable parameters by name
        optimizer.safetensors  per-parameter optimizer tensors ("{i}.{key}")
        rng.safetensors        torch CPU (and CUDA) generator states
        state.json             step, scheduler, optimizer hyper-parameters, data position,
                               python/numpy RNG states, config
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for name, gen in generators.items():
        tensors[f"gen.{name}"] = gen.get_state()
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    for name, gen in generators.items():
        gen.set_state(tensors[f"gen.{name}"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_checkpoint(out_dir: str | Path, step: int, *, params: list[tuple[str, torch.nn.Parameter]],
                    optimizer: torch.optim.Optimizer, scheduler, data_state: dict[str, Any],
                    generators: dict[str, torch.Generator], config: dict[str, Any], keep_last: int,
                    ema=None) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_file({n: p.detach().cpu().contiguous() for n, p in params}, str(tmp / "weights.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state(generators)
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "data": data_state,
                 "rng": rng_meta, "param_names": [n for n, _ in params], "config": config}
        if ema is not None:
            ema_tensors, state["ema"] = ema.state()
            save_file(ema_tensors, str(tmp / "ema.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        for f in tmp.iterdir():  # durable before it becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in state.json")


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def load_checkpoint(path: Path, *, params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                    scheduler, generators: dict[str, torch.Generator], ema=None) -> dict[str, Any]:
    """Restore everything in place; returns state.json (step, data position, ...)."""
    state = json.loads((path / "state.json").read_text())
    names = [n for n, _ in params]
    if state["param_names"] != names:
        raise ValueError(f"{path}: trainable parameters differ from this run's "
                         f"(checkpoint {len(state['param_names'])}, run {len(names)}); same config needed to resume")
    weights = load_file(str(path / "weights.safetensors"))
    with torch.no_grad():
        for name, p in params:
            p.copy_(weights[name])
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                   state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(load_file(str(path / "rng.safetensors")), state["rng"], generators)
    if ema is not None:
        if "ema" not in state:
            raise ValueError(f"{path}: this run averages its weights (ema_decay) but the checkpoint has no "
                             f"average; resume with the checkpoint's own config")
        ema.load(load_file(str(path / "ema.safetensors")), state["ema"])
    return state
