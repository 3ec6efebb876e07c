"""TensorRT engines built from the backends' ONNX graphs (CUDA only).

TensorRT is imported inside functions only: this module imports, and everything up
to the engine build (cache keys, the optimization profile, build-option checks, the
binding-shape logic in `IOContract.bind`) runs, on machines without it. When it is
missing, `import_tensorrt` raises `TensorRTUnavailable` with what to do.

Route: the UNet step's ONNX graph (`onnx_backend.ensure_onnx`, fp32, the same file
ONNX Runtime runs) -> ``OnnxParser`` -> builder config with the precision flags
(fp16 / bf16; fp8 / int8 only for graphs carrying Q/DQ nodes, i.e. quantized
explicitly, e.g. with NVIDIA ModelOpt: TensorRT 10 has no implicit calibration
worth relying on) and one optimization profile whose min/opt/max are the contract's
-> a serialized engine, cached on disk under a key over the ONNX key (weights,
architecture, contract, opset, torch), the TensorRT version, the GPU (name and
compute capability), the profile and the build options.

Execution binds the caller's CUDA tensors by pointer (``set_tensor_address``) after
``set_input_shape`` from the contract's resolved axes, allocates outputs from
`IOContract.output_shapes`, and runs ``execute_async_v3`` on torch's current stream.
With ``cuda_graph=True`` each new input shape is run once, captured in a CUDA graph
with static buffers, and replayed afterwards (inputs copied into the static buffers).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from vlv_engine.engine.backends import cache
from vlv_engine.engine.backends.contract import (ContractError, IOContract, unet_exportable, unet_inputs,
                                                 vae_decoder_exportable)

ENGINE_FILE = "model.plan"
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")

MISSING_MESSAGE = (
    "TensorRT is not installed: pip install tensorrt on a CUDA machine (NVIDIA's wheels need the CUDA "
    "libraries, see the [gpu] extra); it cannot run on a CPU-only machine. Meanwhile use "
    "unet_backend='compile' (CUDA) or 'onnx' (CPU), or 'auto' to pick what is available.")


class TensorRTUnavailable(ImportError):
    pass


def import_tensorrt():
    """``tensorrt``, or a TensorRTUnavailable saying how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as err:  # ImportError, or the PyPI stub failing to find its CUDA libraries
        raise TensorRTUnavailable(f"{MISSING_MESSAGE} ({type(err).__name__}: {err})") from err


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
        return True
    except TensorRTUnavailable:
        return False


# --------------------------------------------------------------------------- build options


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"  # lowest float precision TensorRT may use: fp32 | tf32 | fp16 | bf16
    fp8: bool = False  # needs Q/DQ nodes in the graph and compute capability >= 8.9
    int8: bool = False  # needs Q/DQ nodes in the graph
    workspace_gib: float | None = None  # None: TensorRT's default (the device's memory)
    optimization_level: int = 3  # 0..5: builder time against kernel search
    cuda_graph: bool = False  # runtime option, not part of the engine's key

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level must be in 0..5, got {self.optimization_level}")

    def engine_parts(self) -> dict[str, Any]:
        parts = dataclasses.asdict(self)
        parts.pop("cuda_graph")
        return parts


def precision_for(dtype: torch.dtype) -> str:
    """The builder precision matching an engine dtype."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "tf32")


def check_build_options(options: BuildOptions, *, compute_capability: tuple[int, int], qdq_nodes: int) -> None:
    """Refuse builds TensorRT would fail on or silently degrade, with the reason."""
    if options.precision == "bf16" and compute_capability < (8, 0):
        raise ValueError(f"bf16 engines need compute capability >= 8.0 (Ampere), this GPU has "
                         f"{compute_capability[0]}.{compute_capability[1]}: use precision='fp16'")
    if options.fp8 and compute_capability < (8, 9):
        raise ValueError(f"fp8 needs compute capability >= 8.9 (Ada/Hopper), this GPU has "
                         f"{compute_capability[0]}.{compute_capability[1]}")
    if (options.fp8 or options.int8) and qdq_nodes == 0:
        kind = "fp8" if options.fp8 else "int8"
        raise ValueError(f"{kind} needs an explicitly quantized graph (QuantizeLinear/DequantizeLinear nodes, "
                         f"e.g. from NVIDIA ModelOpt); this ONNX graph has none")


def count_qdq_nodes(onnx_path: str | Path) -> int:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def profile_shapes(contract: IOContract) -> list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """[(input, min, opt, max)] for ``IOptimizationProfile.set_shape``, in input order."""
    return [(name, *shapes) for name, shapes in contract.profile().items()]


def gpu_identity(device: str | torch.device = "cuda") -> str:
    """'<name> sm<major><minor>': engines are specific to the GPU they were built on."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm{major}{minor}"


def tensorrt_cache_parts(onnx_key: str, contract: IOContract, options: BuildOptions, *, trt_version: str,
                         gpu: str) -> dict[str, Any]:
    """What determines an engine: the ONNX graph's key (weights, architecture, contract,
    opset, torch), the TensorRT version, the GPU, the profile and the build options."""
    return {"artifact": "tensorrt", "onnx": onnx_key, "tensorrt": trt_version, "gpu": gpu,
            "profile": [[n, list(lo), list(opt), list(hi)] for n, lo, opt, hi in profile_shapes(contract)],
            "build": options.engine_parts()}


# --------------------------------------------------------------------------- build


def build_engine(onnx_path: str | Path, contract: IOContract, options: BuildOptions, out_path: str | Path) -> Path:
    """Parse the ONNX graph and build a serialized engine into `out_path`."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != contract.input_names:
        raise ContractError(f"ONNX graph inputs {names} != contract inputs {contract.input_names}")
    config = builder.create_builder_config()
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.optimization_level
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif options.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if options.fp8:
        config.set_flag(trt.BuilderFlag.FP8)
    if options.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for name, lo, opt, hi in profile_shapes(contract):
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    out_path = Path(out_path)
    out_path.write_bytes(bytes(blob))
    return out_path


# --------------------------------------------------------------------------- run


class TensorRTEngine:
    """A deserialized engine run on torch CUDA tensors under its contract."""

    def __init__(self, path: str | Path, contract: IOContract, *, device: str | torch.device = "cuda",
                 cuda_graph: bool = False):
        trt = import_tensorrt()
        self.path = Path(path)
        self.contract = contract
        self.device = torch.device(device)
        self.cuda_graph = cuda_graph
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {self.path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self._graphs: dict[tuple, tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self.calls = 0

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sizes = self.contract.bind_tensors(inputs, check_range=True)
        self.calls += 1
        if self.cuda_graph:
            return self._replay(inputs, sizes)
        feeds = {n: t.to(self.device).contiguous() for n, t in inputs.items()}
        outs = self._allocate(sizes)
        self._bind(feeds, outs)
        self._execute()
        return outs

    def _allocate(self, sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
        return {s.name: torch.empty(shape, dtype=s.torch_dtype, device=self.device)
                for s, shape in zip(self.contract.outputs, self.contract.output_shapes(sizes).values())}

    def _bind(self, feeds: Mapping[str, torch.Tensor], outs: Mapping[str, torch.Tensor]) -> None:
        for name, t in feeds.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        for name, t in outs.items():
            got = tuple(self.context.get_tensor_shape(name))
            if got != tuple(t.shape):
                raise ContractError(f"{self.contract.name}: engine output {name!r} has shape {list(got)}, the "
                                    f"contract says {list(t.shape)}")
            self.context.set_tensor_address(name, t.data_ptr())

    def _execute(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path} failed")

    def _replay(self, inputs: Mapping[str, torch.Tensor], sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
        key = tuple(sorted(sizes.items()))
        if key not in self._graphs:
            static_in = {n: t.to(self.device).contiguous().clone() for n, t in inputs.items()}
            static_out = self._allocate(sizes)
            self._bind(static_in, static_out)
            self._execute()  # warm-up: TensorRT allocates and sets up before capture
            torch.cuda.current_stream(self.device).synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._execute()
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        for name, t in inputs.items():
            static_in[name].copy_(t)
        graph.replay()
        return {n: t.clone() for n, t in static_out.items()}


class TensorRTUNetRunner:
    """`UNetRunner` on a TensorRT engine; a batch over the profile's max runs in chunks."""

    backend = "tensorrt"

    def __init__(self, engine: TensorRTEngine):
        self.engine = engine
        self.contract = engine.contract

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feeds = unet_inputs(self.contract, latents, t, context)
        most = self.contract.dims["batch"].max
        b = latents.shape[0]
        if b <= most:
            return self.engine.run(feeds)["noise_pred"].to(latents.dtype)
        parts = [self.engine.run({n: v[lo:lo + most] for n, v in feeds.items()})["noise_pred"]
                 for lo in range(0, b, most)]
        return torch.cat(parts).to(latents.dtype)


def _cached_engine(exp, *, kind: str, dtype: torch.dtype, device: str | torch.device,
                   cache_dir: str | Path | None, options: BuildOptions | None, cuda_graph: bool) -> TensorRTEngine:
    """Export `exp` to ONNX (cached), build its TensorRT engine (cached), load it."""
    trt = import_tensorrt()  # fail before any export work
    from vlv_engine.engine.backends.onnx_backend import ensure_onnx

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"TensorRT runs on CUDA devices, got {device}")
    options = options or BuildOptions(precision=precision_for(dtype), cuda_graph=cuda_graph)
    root = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    art = ensure_onnx(exp, cache_dir=root)
    check_build_options(options, compute_capability=torch.cuda.get_device_capability(device),
                        qdq_nodes=count_qdq_nodes(art.path) if (options.fp8 or options.int8) else 0)
    parts = tensorrt_cache_parts(art.key, exp.contract, options, trt_version=trt.__version__,
                                 gpu=gpu_identity(device))
    folder = cache.entry_dir(root, kind, cache.key_of(parts))
    if not cache.entry_ready(folder, ENGINE_FILE):
        cache.build_entry(folder, parts, lambda tmp: build_engine(art.path, exp.contract, options, tmp / ENGINE_FILE))
    return TensorRTEngine(folder / ENGINE_FILE, exp.contract, device=device,
                          cuda_graph=options.cuda_graph or cuda_graph)


def tensorrt_unet_runner(decoder, *, num_queries: int, max_batch: int = 8, dtype: torch.dtype = torch.float16,
                         device: str | torch.device = "cuda", cache_dir: str | Path | None = None,
                         options: BuildOptions | None = None, cuda_graph: bool = False) -> TensorRTUNetRunner:
    """Export the UNet step to ONNX (cached), build a TensorRT engine (cached), load it."""
    exp = unet_exportable(decoder, num_queries=num_queries, max_batch=max_batch)
    return TensorRTUNetRunner(_cached_engine(exp, kind="unet-trt", dtype=dtype, device=device, cache_dir=cache_dir,
                                             options=options, cuda_graph=cuda_graph))


class TensorRTVAEDecoderRunner:
    """Unscaled latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] on a TensorRT engine."""

    backend = "tensorrt"

    def __init__(self, engine: TensorRTEngine):
        self.engine = engine
        self.contract = engine.contract

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = self.contract.inputs[0].torch_dtype
        most = self.contract.dims["batch"].max
        parts = [self.engine.run({"latent": latents[lo:lo + most].to(dtype)})["image"]
                 for lo in range(0, latents.shape[0], most)]
        return torch.cat(parts).to(latents.dtype)


def tensorrt_vae_decoder_runner(decoder, *, max_batch: int = 8, dtype: torch.dtype = torch.float16,
                                device: str | torch.device = "cuda", cache_dir: str | Path | None = None,
                                options: BuildOptions | None = None) -> TensorRTVAEDecoderRunner:
    """The VAE decoder as a TensorRT engine (same ONNX export and cache as the UNet's)."""
    exp = vae_decoder_exportable(decoder, max_batch=max_batch)
    return TensorRTVAEDecoderRunner(_cached_engine(exp, kind="vae-trt", dtype=dtype, device=device,
                                                   cache_dir=cache_dir, options=options, cuda_graph=False))
