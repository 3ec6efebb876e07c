"""Run the chosen suites for a preset and write the report (table, JSON, PNG)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlv_engine.bench.machine import machine_info, memory_bandwidth
from vlv_engine.bench.report import Row, format_table, plot_throughput, write_json

SUITES = ("encoder", "decode", "e2e", "memory", "unet", "preprocess")


@dataclass
class BenchOptions:
    preset: str = "nano"
    suites: tuple[str, ...] = ("encoder", "decode", "e2e")
    batch_sizes: tuple[int, ...] = (1, 8)
    e2e_batch_sizes: tuple[int, ...] | None = None  # default: batch_sizes
    out: Path | None = None
    device: str = "cpu"
    fast_dtype: str | None = None  # default: float32 on a CPU, bfloat16 on CUDA
    quantize: str | None = None  # the fast path's LLM scheme
    encoder_quantize: str | None = None  # the fast path's encoder scheme (vlv_engine.engine.encoder_quant)
    decode_schemes: tuple[str, ...] = ()  # more decode rows: "none" (unquantized in the fast dtype) or schemes
    compile_decoder: bool = True
    encoder_backend: str = "auto"
    encoder_batch_size: int | None = None  # the fast engine's images per encoder forward (None: its default)
    unet_backend: str = "auto"
    new_tokens: int | None = None
    num_beams: int | None = None
    repeats: int = 3
    latency_repeats: int | None = None
    threads: int | None = None
    memory_batch: int = 8
    time_limit_s: float | None = None  # stop starting new suites past this
    seed: int = 0
    extra_setup: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class BenchResult:
    rows: list[Row]
    skipped: dict[str, str]
    machine: dict
    setup: dict
    table: str
    json_path: Path | None
    plot_path: Path | None


def run_bench(opts: BenchOptions, log=lambda msg: None) -> BenchResult:
    """Run `opts.suites`; `log` receives progress lines (the CLI prints them)."""
    unknown = set(opts.suites) - set(SUITES)
    if unknown:
        raise ValueError(f"unknown suite(s) {sorted(unknown)}; choose from {SUITES}")
    if not opts.batch_sizes or min(opts.batch_sizes) < 1 or min(opts.e2e_batch_sizes or (1,)) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {opts.batch_sizes}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    start = time.perf_counter()
    machine = machine_info(device)
    bandwidth = memory_bandwidth(device)
    machine["memory_bandwidth_GBps"] = round(bandwidth / 1e9, 2)
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} threads, "
        f"gpu {machine['gpu']}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"THP_MEM_ALLOC_ENABLE={machine['thp_alloc']}")
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    setup_info: dict = {}
    batches = sorted(set(opts.batch_sizes))
    fast_dtype = getattr(torch, opts.fast_dtype) if opts.fast_dtype else None
    setup = None

    def over_time() -> bool:
        return opts.time_limit_s is not None and time.perf_counter() - start > opts.time_limit_s

    needs_setup = {"encoder", "decode", "e2e"} & set(opts.suites)
    if needs_setup:
        from vlv_engine.bench.pipelines import build_setup

        log(f"building the {opts.preset} pipelines (fast and reference)...")
        setup = build_setup(opts.preset, device=device, fast_dtype=fast_dtype, quantize=opts.quantize,
                            encoder_quantize=opts.encoder_quantize,
                            compile_decoder=opts.compile_decoder, new_tokens=opts.new_tokens,
                            num_beams=opts.num_beams, encoder_backend=opts.encoder_backend, seed=opts.seed,
                            encoder_batch_size=opts.encoder_batch_size)
        setup_info = setup.describe()

    def save(partial: list[Row] = (), running: str | None = None) -> Path | None:
        """The JSON so far; while a suite runs (`running`), with the rows it has measured
        (`partial`) and a note that it has not ended, so a run stopped from outside keeps
        them too."""
        if opts.out is None:
            return None
        why = dict(skipped)
        if running is not None:
            why[running] = "incomplete: the run stopped before this suite ended (only its rows so far)"
        return write_json(Path(opts.out) / f"bench_{opts.preset}.json", machine=machine, options=opts.to_dict(),
                          rows=rows + list(partial), skipped=why, setup=setup_info)

    for suite in opts.suites:
        if over_time():
            skipped[suite] = f"time limit of {opts.time_limit_s:.0f} s reached"
            log(f"{suite}: skipped ({skipped[suite]})")
            continue
        t = time.perf_counter()
        log(f"{suite}: running...")
        partial: list[Row] = []

        def on_row(row: Row, suite=suite, partial=partial) -> None:
            partial.append(row)
            save(partial, suite)
            log(_row_line(row))

        try:
            new = _run_suite(suite, opts, setup, device, batches, bandwidth, fast_dtype, on_row)
        except _Skip as why:
            skipped[suite] = str(why)
            log(f"{suite}: skipped ({why})")
            continue
        rows += new
        log(f"{suite}: done in {time.perf_counter() - t:.0f} s")
        save()  # after each suite: a run stopped from outside keeps what it measured
    table = format_table(rows)
    json_path, plot_path = save(), None
    if opts.out is not None:
        plot_path = plot_throughput(Path(opts.out) / f"bench_{opts.preset}.png", rows,
                                    f"vlv bench --preset {opts.preset} ({machine['gpu'] or machine['cpu']})")
    return BenchResult(rows, skipped, machine, setup_info, table, json_path, plot_path)


class _Skip(Exception):
    pass


def _row_line(row: Row) -> str:
    """A row as one progress line: a run stopped from outside (a time limit) keeps in its
    log what the suite measured before it ended."""
    ref = f"{row.reference:.4g}" if row.reference is not None else "-"
    return (f"{row.suite}: {row.metric} at batch {row.batch}: {row.fast:.4g} {row.unit} (reference {ref}) "
            + ", ".join(f"{k}={v}" for k, v in row.extra.items()))


def _run_suite(suite, opts, setup, device, batches, bandwidth, fast_dtype, on_row=lambda row: None) -> list[Row]:
    """One suite's rows; `on_row` sees each row as it is measured (the decode suite's, whose
    rows can be minutes apart on a GPU: each quantization scheme compiles)."""
    if suite == "encoder":
        from vlv_engine.bench.encoder import run_encoder

        return run_encoder(setup, batches, repeats=opts.repeats)
    if suite == "decode":
        from vlv_engine.bench.decode import run_decode

        dtype = fast_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return run_decode(setup, batches, repeats=opts.repeats, bandwidth=bandwidth,
                          schemes=list(opts.decode_schemes), dtype=dtype, compile=opts.compile_decoder,
                          on_row=on_row)
    if suite == "e2e":
        from vlv_engine.bench.e2e import run_e2e

        e2e_batches = sorted(set(opts.e2e_batch_sizes)) if opts.e2e_batch_sizes else batches
        return run_e2e(setup, e2e_batches, repeats=opts.repeats, latency_repeats=opts.latency_repeats)
    if suite == "memory":
        from vlv_engine.bench.memory import run_memory
        from vlv_engine.bench.pipelines import PRESET_DEFAULTS

        tokens, beams = PRESET_DEFAULTS[opts.preset]
        dtype = fast_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return run_memory(preset=opts.preset, device=device, batch=opts.memory_batch, dtype=dtype,
                          quantize=opts.quantize, compile=opts.compile_decoder,
                          encoder_quantize=opts.encoder_quantize,
                          new_tokens=opts.new_tokens or tokens, num_beams=opts.num_beams or beams,
                          encoder_backend=opts.encoder_backend)
    if suite == "unet":
        from vlv_engine.bench.unet import run_unet, unet_bench_model

        # The UNet's own dtype: fp16 on CUDA (SD-2.1's, and TensorRT's fastest exact-enough
        # path), float32 on a CPU (ONNX Runtime's graph runs in float32).
        dtype = fast_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        try:
            bench = unet_bench_model(opts.preset, device=device, dtype=dtype, seed=opts.seed)
        except ValueError as err:
            raise _Skip(str(err)) from None
        # batch 2 is one image with classifier-free guidance
        unet_batches = sorted({b for b in batches if b <= 8} | {2})
        return run_unet(bench, device=device, batches=unet_batches, repeats=opts.repeats,
                        backend=opts.unet_backend)
    if suite == "preprocess":
        from vlv_engine.bench.preprocess import SuiteUnavailable, run_preprocess
        from vlv_engine.config import preset as get_preset

        config = setup.reference.config if setup is not None else get_preset(
            "small" if opts.preset == "small" else "paper" if opts.preset == "paper" else "nano")
        try:
            return run_preprocess(config, batches=batches, repeats=opts.repeats)
        except SuiteUnavailable as err:
            raise _Skip(str(err)) from None
    raise AssertionError(suite)
