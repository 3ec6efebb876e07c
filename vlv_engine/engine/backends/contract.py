"""The I/O contract of an exported module, and the modules we export.

An exported graph (ONNX, a TensorRT engine) is only as good as the agreement on what
goes in and what comes out. Each contract states, for one module:

* input and output names, dtypes and shapes, where a dimension is either a fixed
  size (``int``) or the name of a dynamic axis (``str``);
* for each dynamic axis its ``min``/``opt``/``max`` sizes: the range the graph is
  exported for and the TensorRT optimization profile;
* a sample input (at the ``opt`` shapes) for export and smoke tests.

`IOContract.bind` is the binding-shape logic every runtime shares: it checks the
tensors handed to a runtime against the contract (names, dtypes, ranks, fixed sizes,
one size per dynamic axis, optionally the profile range) and resolves the dynamic
axes; `IOContract.output_shapes` then gives the shapes to allocate for the outputs.
ONNX Runtime (IO binding) and TensorRT (``set_input_shape`` + output buffers) both
go through it, so the logic is tested here against ONNX Runtime.

The UNet contract
-----------------
``sample [B, C, h, w]``, ``timestep [B]``, ``encoder_hidden_states [B, Nq, D]`` ->
``noise_pred [B, C_out, h, w]``, all float32 in the graph.

* ``C`` is the *latent* channel count: the exported module is `UNetStep`, the UNet
  call as `DiffusionDecoder.predict_noise` makes it, so it appends the coordinate
  channels itself when the model has them. A runtime is fed the plain latent.
* ``timestep`` is a float32 vector ``[B]``, not a scalar: every input then shares the
  batch axis (one profile dimension for TensorRT), items may carry different
  timesteps, and float32 holds every integer timestep exactly (< 2**24). Runners
  accept a scalar or 0-d ``t`` (what a scheduler loop yields) and expand it.
* ``B`` runs from 1 to ``2 * max_batch`` (classifier-free guidance doubles the
  batch); ``opt`` defaults to 2, one image with guidance: the latency case.
* ``h``/``w`` are fixed by the model (``unet.config.sample_size``) and ``Nq``
  (the caption embedding's length) is fixed by the encoder: static in the graph.

The VAE decoder contract
------------------------
``latent [B, C, h, w]`` (unscaled, what ``vae.decode`` takes) -> ``image [B, 3, H, W]``
in [-1, 1]; `DiffusionDecoder.decode` does the scaling and the [0, 1] mapping.

Graphs are exported in float32 whatever the model's dtype: ONNX Runtime's CPU EP
runs fp32, and TensorRT lowers precision itself from builder flags (fp16/bf16),
so one graph serves every backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vlv_engine.models.diffusion import coordinate_grid

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
PROFILE_POINTS = ("min", "opt", "max")


class ContractError(ValueError):
    """Tensors handed to an exported module do not match its contract."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # int: fixed size; str: the name of a dynamic axis
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        return f"{self.name} [{', '.join(str(s) for s in self.shape)}] {self.dtype}"


@dataclass(frozen=True)
class DimRange:
    """Sizes a dynamic axis may take: [min, max], tuned for opt."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}")

    def at(self, point: str) -> int:
        if point not in PROFILE_POINTS:
            raise ValueError(f"profile point must be one of {PROFILE_POINTS}, got {point!r}")
        return getattr(self, point)


@dataclass(frozen=True)
class IOContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping[str, DimRange] = field(default_factory=dict)

    def __post_init__(self):
        names = [s.name for s in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: tensor names must be unique, got {names}")
        used = {d for s in self.inputs + self.outputs for d in s.shape if isinstance(d, str)}
        if used != set(self.dims):
            raise ValueError(f"{self.name}: dynamic axes used {sorted(used)} != declared {sorted(self.dims)}")
        in_dims = {d for s in self.inputs for d in s.shape if isinstance(d, str)}
        if used - in_dims:
            raise ValueError(f"{self.name}: output axes {sorted(used - in_dims)} are set by no input")

    # ---------------------------------------------------------------- description

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis: axis name}}, inputs and outputs (the legacy exporter's format)."""
        out: dict[str, dict[int, str]] = {}
        for spec in self.inputs + self.outputs:
            axes = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if axes:
                out[spec.name] = axes
        return out

    def sizes_at(self, point: str) -> dict[str, int]:
        return {d: r.at(point) for d, r in self.dims.items()}

    def shapes_at(self, point: str | Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes with every dynamic axis at min/opt/max (or at given sizes)."""
        sizes = self.sizes_at(point) if isinstance(point, str) else point
        return {s.name: tuple(sizes[d] if isinstance(d, str) else d for d in s.shape) for s in self.inputs}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input: (min shape, opt shape, max shape)}: a TensorRT optimization profile."""
        mins, opts, maxs = (self.shapes_at(p) for p in PROFILE_POINTS)
        return {name: (mins[name], opts[name], maxs[name]) for name in self.input_names}

    def sample_inputs(self, point: str | Mapping[str, int] = "opt", *, seed: int = 0,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Random inputs at a profile point (or given axis sizes): normal for float
        tensors, integer-valued timesteps in [0, 1000)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for spec, shape in zip(self.inputs, self.shapes_at(point).values()):
            if spec.name == "timestep" or not spec.torch_dtype.is_floating_point:
                t = torch.randint(0, 1000, shape, generator=gen).to(spec.torch_dtype)
            else:
                t = torch.randn(shape, generator=gen).to(spec.torch_dtype)
            out[spec.name] = t.to(device)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (part of every cache key)."""
        return {"name": self.name,
                "inputs": [dataclasses.asdict(s) for s in self.inputs],
                "outputs": [dataclasses.asdict(s) for s in self.outputs],
                "dims": {d: dataclasses.asdict(r) for d, r in sorted(self.dims.items())}}

    def describe(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        outs = ", ".join(s.describe() for s in self.outputs)
        dims = ", ".join(f"{d} in [{r.min}, {r.max}] (opt {r.opt})" for d, r in self.dims.items())
        return f"{self.name}: {ins} -> {outs}" + (f"; {dims}" if dims else "")

    # ---------------------------------------------------------------- binding shapes

    def bind(self, shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, torch.dtype] | None = None,
             *, check_range: bool = True) -> dict[str, int]:
        """Check input shapes (and dtypes) against the contract; return {axis: size}.

        `check_range` also holds every dynamic axis to [min, max] (TensorRT's profile);
        ONNX Runtime runs any size, so its runner checks only the rest."""
        missing = [n for n in self.input_names if n not in shapes]
        extra = [n for n in shapes if n not in self.input_names]
        if missing or extra:
            raise ContractError(f"{self.name}: expected inputs {self.input_names}, got {list(shapes)}"
                                + (f" (missing {missing})" if missing else "")
                                + (f" (unknown {extra})" if extra else ""))
        sizes: dict[str, int] = {}
        for spec in self.inputs:
            shape = tuple(int(s) for s in shapes[spec.name])
            where = f"{self.name}: input {spec.name!r} has shape {list(shape)}, expected {spec.describe()}"
            if len(shape) != len(spec.shape):
                raise ContractError(f"{where} (rank {len(shape)} != {len(spec.shape)})")
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int):
                    if got != want:
                        raise ContractError(f"{where} (axis {axis} must be {want})")
                elif want in sizes and sizes[want] != got:
                    raise ContractError(f"{where} (axis {axis} is {want!r}={got}, but another input set "
                                        f"{want!r}={sizes[want]})")
                else:
                    sizes[want] = got
            if dtypes is not None and spec.name in dtypes and dtypes[spec.name] != spec.torch_dtype:
                raise ContractError(f"{self.name}: input {spec.name!r} has dtype {dtypes[spec.name]}, "
                                    f"expected {spec.dtype}")
        for dim, size in sizes.items():
            r = self.dims[dim]
            if size < 1 or (check_range and not r.min <= size <= r.max):
                lo, hi = (r.min, r.max) if check_range else (1, "any")
                raise ContractError(f"{self.name}: dynamic axis {dim!r}={size} is outside the range "
                                    f"[{lo}, {hi}] this module was built for")
        return sizes

    def bind_tensors(self, inputs: Mapping[str, torch.Tensor], *, check_range: bool = True) -> dict[str, int]:
        return self.bind({k: tuple(v.shape) for k, v in inputs.items()},
                         {k: v.dtype for k, v in inputs.items()}, check_range=check_range)

    def output_shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """The output shapes for resolved dynamic axes (what to allocate before a run)."""
        return {s.name: tuple(sizes[d] if isinstance(d, str) else d for d in s.shape) for s in self.outputs}

    def export_sizes(self) -> dict[str, int]:
        """Axis sizes of the sample an exporter traces: opt, but never 1 where the axis may
        grow (torch.export specializes a size-1 sample axis to a constant)."""
        return {d: (min(2, r.max) if r.opt == 1 else r.opt) for d, r in self.dims.items()}


# --------------------------------------------------------------------------- exported modules


class UNetStep(nn.Module):
    """The UNet call as `DiffusionDecoder.predict_noise` makes it, with the contract's
    signature: appends the coordinate channels, returns the noise prediction tensor."""

    def __init__(self, unet: nn.Module, coord_channels: int = 0):
        super().__init__()
        self.unet = unet
        self.coord_channels = coord_channels

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.coord_channels:
            sample = torch.cat([sample, coordinate_grid(sample, self.coord_channels)], dim=1)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


class VAEDecoderStep(nn.Module):
    """``vae.decode(latent).sample``: unscaled latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent).sample


@dataclass
class Exportable:
    """A module to export, its contract, and the architecture it was built from."""

    module: nn.Module  # forward(*inputs in contract order) -> the single output
    contract: IOContract
    config: dict[str, Any]  # JSON-able; part of the cache key


def _batch_range(max_batch: int, opt_batch: int | None, cfg: bool) -> DimRange:
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    hi = 2 * max_batch if cfg else max_batch
    opt = min(hi, 2 if opt_batch is None else opt_batch)
    return DimRange(1, max(1, opt), hi)


def unet_contract(unet_config: Mapping[str, Any], *, coord_channels: int, num_queries: int, max_batch: int,
                  opt_batch: int | None = None, cfg: bool = True) -> IOContract:
    """The UNet contract; `max_batch` images per call, doubled when `cfg` (guidance)."""
    size = unet_config["sample_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    channels = int(unet_config["in_channels"]) - coord_channels
    out_channels = int(unet_config["out_channels"])
    dim = int(unet_config["cross_attention_dim"])
    return IOContract(
        name="unet",
        inputs=(TensorSpec("sample", ("batch", channels, h, w)),
                TensorSpec("timestep", ("batch",)),
                TensorSpec("encoder_hidden_states", ("batch", num_queries, dim))),
        outputs=(TensorSpec("noise_pred", ("batch", out_channels, h, w)),),
        dims={"batch": _batch_range(max_batch, opt_batch, cfg)},
    )


def vae_decoder_contract(vae_config: Mapping[str, Any], *, latent_size: int, max_batch: int,
                         opt_batch: int | None = 1) -> IOContract:
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    c = int(vae_config["latent_channels"])
    return IOContract(
        name="vae_decoder",
        inputs=(TensorSpec("latent", ("batch", c, latent_size, latent_size)),),
        outputs=(TensorSpec("image", ("batch", int(vae_config["out_channels"]), latent_size * factor,
                                      latent_size * factor)),),
        dims={"batch": _batch_range(max_batch, opt_batch, cfg=False)},
    )


def unet_exportable(decoder, *, num_queries: int, max_batch: int, opt_batch: int | None = None) -> Exportable:
    """`decoder` is a `DiffusionDecoder`; the module shares its UNet's weights."""
    config = _arch(decoder.unet.config)
    contract = unet_contract(config, coord_channels=decoder.coord_channels, num_queries=num_queries,
                             max_batch=max_batch, opt_batch=opt_batch)
    return Exportable(UNetStep(decoder.unet, decoder.coord_channels).eval(), contract,
                      {"class": type(decoder.unet).__name__, "unet": _jsonable(config),
                       "coord_channels": decoder.coord_channels})


def vae_decoder_exportable(decoder, *, max_batch: int, opt_batch: int | None = 1) -> Exportable:
    config = _arch(decoder.vae.config)
    contract = vae_decoder_contract(config, latent_size=decoder.latent_shape(1)[-1], max_batch=max_batch,
                                    opt_batch=opt_batch)
    return Exportable(VAEDecoderStep(decoder.vae).eval(), contract,
                      {"class": type(decoder.vae).__name__, "vae": _jsonable(config)})


def unet_inputs(contract: IOContract, latents: torch.Tensor, t: torch.Tensor | float | int,
                context: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`predict_noise`'s arguments as the contract's inputs: t (scalar, 0-d or [B]) -> [B]."""
    dtype = dtype or contract.inputs[0].torch_dtype
    return {"sample": latents.to(dtype),
            "timestep": batch_timestep(t, latents).to(contract.inputs[1].torch_dtype),
            "encoder_hidden_states": context.to(dtype)}


def batch_timestep(t: torch.Tensor | float | int, latents: torch.Tensor) -> torch.Tensor:
    """A scalar, 0-d or [B] timestep as a float32 vector [B] on the latents' device."""
    b = latents.shape[0]
    t = torch.as_tensor(t, device=latents.device)
    if t.dim() == 0:
        t = t.expand(b)
    elif tuple(t.shape) != (b,):
        raise ContractError(f"timestep must be a scalar or [B={b}], got shape {list(t.shape)}")
    return t.to(torch.float32)


def _arch(config: Mapping[str, Any]) -> dict[str, Any]:
    # Private keys (_name_or_path, _use_default_values, ...) say where a model came from,
    # not what it computes; the diffusers version is part of the cache key separately.
    return {k: v for k, v in config.items() if not str(k).startswith("_")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
