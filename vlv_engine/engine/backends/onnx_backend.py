"""ONNX export (cached on disk) and ONNX Runtime execution of exported modules.

Export route: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which
needs ``onnxscript``) is the default. It exports diffusers' UNet2DConditionModel and
AutoencoderKL decoder as they are (fp32 results within ~1e-6 of eager), records the
batch axis symbolically from ``torch.export`` (the legacy tracer bakes batch-dependent
Python branches in, e.g. diffusers' ``if hidden_states.shape[0] >= 64`` in the
upsampler, with a TracerWarning) and is the exporter PyTorch maintains. The legacy
TorchScript exporter (``exporter="torchscript"``) stays selectable: it exports in
about a tenth of the time and gives the same numbers on these models.

The artifact is cached under a key over the weights' digest, the architecture, the
contract, the opset, the exporter and the torch/diffusers/onnx versions
(`onnx_cache_parts`); a second `ensure_onnx` with the same inputs loads the file.

Execution: one `OnnxRunner` per graph, CPU EP (the CUDA EP first when the tensors are
on CUDA and onnxruntime has it), thread counts set explicitly (intra-op = torch's
thread count unless given, inter-op 1, sequential execution). IO binding binds the
caller's torch tensors and preallocated outputs by pointer; it is on by default for
CUDA tensors (no host round trip) and off on the CPU, where ``run`` on zero-copy
numpy views costs the same.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from vlv_engine.engine.backends import cache
from vlv_engine.engine.backends.contract import (ContractError, Exportable, IOContract, unet_exportable, unet_inputs,
                                                 vae_decoder_exportable)

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
ONNX_FILE = "model.onnx"
# Graphs over this many bytes of weights keep them in an external data file
# (protobuf caps a single file at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

log = logging.getLogger(__name__)

_ORT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64"}


class OnnxUnavailable(ImportError):
    pass


def import_onnxruntime():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as err:
        raise OnnxUnavailable("onnxruntime is not installed: pip install 'vlv-engine[onnx]' "
                              "(onnx, onnxruntime, onnxscript)") from err


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- export


def onnx_cache_parts(exportable: Exportable, *, opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                     weights: str | None = None) -> dict[str, Any]:
    """Everything that determines the exported file; `weights` is a precomputed digest."""
    return {
        "artifact": "onnx",
        "weights": weights if weights is not None else cache.weights_digest(exportable.module),
        "config": exportable.config,
        "contract": exportable.contract.to_dict(),
        "opset": opset,
        "exporter": exporter,
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript") if exporter == "dynamo" else None,
    }


@dataclass
class OnnxArtifact:
    path: Path  # the .onnx file
    key: str
    exported: bool  # False: loaded from the cache
    parts: dict[str, Any]


def export_onnx(exportable: Exportable, path: str | Path, *, opset: int = DEFAULT_OPSET,
                exporter: str = "dynamo") -> Path:
    """Export `exportable.module` (in fp32, on the CPU) to `path` with the contract's names and axes."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    contract = exportable.contract
    module = _fp32_cpu(exportable.module)
    sample = contract.sample_inputs(contract.export_sizes())
    args = tuple(sample[n] for n in contract.input_names)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; correctness is tested, not warned
        if exporter == "dynamo":
            import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail with its name)

            # An axis with min == max is exported static.
            dims = {d: torch.export.Dim(d, min=r.min, max=r.max) for d, r in contract.dims.items() if r.min < r.max}
            dynamic_shapes = tuple({i: dims[d] for i, d in enumerate(s.shape) if d in dims} or None
                                   for s in contract.inputs)  # positional: forward's own names may differ
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset,
                              input_names=contract.input_names, output_names=contract.output_names,
                              dynamic_shapes=dynamic_shapes, external_data=big, verbose=False)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=contract.input_names, output_names=contract.output_names,
                              dynamic_axes=contract.dynamic_axes(), do_constant_folding=True)
    check_onnx_io(path, contract)
    return path


def _fp32_cpu(module: torch.nn.Module) -> torch.nn.Module:
    params = list(module.parameters())
    if all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params):
        return module
    import copy

    return copy.deepcopy(module).to(device="cpu", dtype=torch.float32)


def check_onnx_io(path: str | Path, contract: IOContract) -> None:
    """The exported graph's input/output names and ranks are the contract's."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    got_in = [(i.name, len(i.type.tensor_type.shape.dim)) for i in graph.input]
    got_out = [(o.name, len(o.type.tensor_type.shape.dim)) for o in graph.output]
    want_in = [(s.name, len(s.shape)) for s in contract.inputs]
    want_out = [(s.name, len(s.shape)) for s in contract.outputs]
    if got_in != want_in or got_out != want_out:
        raise ContractError(f"exported graph {path} has inputs {got_in} and outputs {got_out}; the contract "
                            f"says {want_in} -> {want_out}")


def ensure_onnx(exportable: Exportable, *, cache_dir: str | Path | None = None, opset: int = DEFAULT_OPSET,
                exporter: str = "dynamo") -> OnnxArtifact:
    """The cached ONNX file for `exportable`, exported first when the cache lacks it."""
    parts = onnx_cache_parts(exportable, opset=opset, exporter=exporter)
    key = cache.key_of(parts)
    folder = cache.entry_dir(Path(cache_dir) if cache_dir is not None else cache.default_cache_dir(),
                             exportable.contract.name, key)
    exported = False
    if not cache.entry_ready(folder, ONNX_FILE):
        log.info("exporting %s to ONNX (%s, opset %d) into %s", exportable.contract.name, exporter, opset, folder)
        cache.build_entry(folder, parts, lambda tmp: export_onnx(exportable, tmp / ONNX_FILE, opset=opset,
                                                                   exporter=exporter))
        exported = True
    return OnnxArtifact(folder / ONNX_FILE, key, exported, parts)


# --------------------------------------------------------------------------- execution


def session_options(*, threads: int | None = None, inter_op_threads: int = 1, allow_spinning: bool = True):
    """Explicit ONNX Runtime thread settings: intra-op `threads` (default torch's), inter-op 1,
    sequential execution, all graph optimizations."""
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = int(inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.log_severity_level = 3  # errors only
    return so


def default_providers(device: str | torch.device = "cpu") -> list[str]:
    ort = import_onnxruntime()
    have = ort.get_available_providers()
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRunner:
    """Runs one exported graph under its contract: named torch tensors in, named torch tensors out."""

    def __init__(self, path: str | Path, contract: IOContract, *, device: str | torch.device = "cpu",
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 io_binding: bool | None = None, allow_spinning: bool = True):
        ort = import_onnxruntime()
        self.path = Path(path)
        self.contract = contract
        self.device = torch.device(device)
        self.providers = list(providers) if providers is not None else default_providers(self.device)
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options(
            threads=threads, allow_spinning=allow_spinning), providers=self.providers)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.io_binding = self.on_cuda if io_binding is None else io_binding
        self.calls = 0

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs must already have the contract's dtypes; raises ContractError otherwise."""
        sizes = self.contract.bind_tensors(inputs, check_range=False)  # the graph is dynamic: any batch
        self.calls += 1
        if self.io_binding:
            return self._run_bound(inputs, sizes)
        feeds = {n: t.detach().to("cpu").contiguous().numpy() for n, t in inputs.items()}
        outs = self.session.run(self.contract.output_names, feeds)
        return {n: torch.from_numpy(o).to(self.device) for n, o in zip(self.contract.output_names, outs)}

    def _run_bound(self, inputs: Mapping[str, torch.Tensor], sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
        device = self.device if self.on_cuda else torch.device("cpu")
        binding = self.session.io_binding()
        keep = []  # tensors whose memory ONNX Runtime reads must outlive the run
        for spec in self.contract.inputs:
            t = inputs[spec.name].detach().to(device).contiguous()
            keep.append(t)
            binding.bind_input(spec.name, device.type, device.index or 0, _ORT_TYPES[t.dtype], list(t.shape),
                               t.data_ptr())
        outs = {}
        for spec, shape in zip(self.contract.outputs, self.contract.output_shapes(sizes).values()):
            out = torch.empty(shape, dtype=spec.torch_dtype, device=device)
            binding.bind_output(spec.name, device.type, device.index or 0, _ORT_TYPES[out.dtype], list(shape),
                                out.data_ptr())
            outs[spec.name] = out
        self.session.run_with_iobinding(binding)
        return {n: o.to(self.device) for n, o in outs.items()}


class OnnxUNetRunner:
    """`UNetRunner` on ONNX Runtime: (latents [B, C, h, w], t, context [B, Nq, D]) -> noise [B, C, h, w]."""

    backend = "onnx"

    def __init__(self, runner: OnnxRunner, artifact: OnnxArtifact | None = None):
        self.runner = runner
        self.contract = runner.contract
        self.artifact = artifact

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.runner.run(unet_inputs(self.contract, latents, t, context))["noise_pred"]
        return out.to(latents.dtype)


class OnnxVAEDecoderRunner:
    """Unscaled latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1], like ``vae.decode(z).sample``."""

    backend = "onnx"

    def __init__(self, runner: OnnxRunner, artifact: OnnxArtifact | None = None):
        self.runner = runner
        self.contract = runner.contract
        self.artifact = artifact

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = self.contract.inputs[0].torch_dtype
        return self.runner.run({"latent": latents.to(dtype)})["image"].to(latents.dtype)


def onnx_unet_runner(decoder, *, num_queries: int, max_batch: int = 8, cache_dir: str | Path | None = None,
                     device: str | torch.device = "cpu", threads: int | None = None,
                     io_binding: bool | None = None, opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                     providers: Sequence[str] | None = None) -> OnnxUNetRunner:
    """Export (or load from the cache) `decoder`'s UNet step and open it in ONNX Runtime."""
    import_onnxruntime()
    exp = unet_exportable(decoder, num_queries=num_queries, max_batch=max_batch)
    art = ensure_onnx(exp, cache_dir=cache_dir, opset=opset, exporter=exporter)
    return OnnxUNetRunner(OnnxRunner(art.path, exp.contract, device=device, threads=threads, io_binding=io_binding,
                                     providers=providers), art)


def onnx_vae_decoder_runner(decoder, *, max_batch: int = 8, cache_dir: str | Path | None = None,
                            device: str | torch.device = "cpu", threads: int | None = None,
                            io_binding: bool | None = None, opset: int = DEFAULT_OPSET,
                            exporter: str = "dynamo") -> OnnxVAEDecoderRunner:
    import_onnxruntime()
    exp = vae_decoder_exportable(decoder, max_batch=max_batch)
    art = ensure_onnx(exp, cache_dir=cache_dir, opset=opset, exporter=exporter)
    return OnnxVAEDecoderRunner(OnnxRunner(art.path, exp.contract, device=device, threads=threads,
                                           io_binding=io_binding), art)
