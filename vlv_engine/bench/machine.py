"""The machine a benchmark ran on, and its memory bandwidth measured by a large copy."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: str | torch.device = "cpu") -> dict:
    """CPU model, cores, threads, GPU, library versions and load: what a figure depends on."""
    device = torch.device(device)
    info = {
        "cpu": cpu_name(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: _version(name) for name in ("transformers", "diffusers", "torchao", "triton", "onnxruntime")},
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # the CPU allocator's huge pages (set by `vlv`): both pipelines of a run share it
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: str | torch.device = "cpu", nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a large device-memory copy (read + write counted), best of `repeats`.

    The bound a decode step is judged against: a step reads each weight once, so
    weight bytes / this bandwidth is the fastest a bandwidth-bound step can be."""
    import time

    device = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best
