"""Weight quantization of the caption LLM with torchao, by scheme name.

Decoding a caption reads every LLM weight once per new token; at small batches that
read is the whole cost, so fewer bytes per weight is the speed-up. Only the LLM's
linear layers (lm_head included) are quantized: the encoder path is compute bound
and the caption embedding must not move.

| scheme | device | weights | activations |
| --- | --- | --- | --- |
| int8_weight_only | CPU, CUDA (one row: greedy batch 1) | int8 per row | model dtype |
| int8_dynamic | CPU, CUDA | int8 per row | int8 per token, computed at run time |
| int4_weight_only | CUDA | int4, groups of 128 (tinygemm tile layout) | bf16 |
| fp8 | CUDA, sm89+ | float8 e4m3 per row | float8 per row, dynamic |
| int4_cpu | CPU | int4, groups of 128 (torchao's prototype opaque CPU layout) | bf16 |
| int8_cpu | CPU | int8 per row (our native kernel, `vlv_engine.native.gemv`) | fp32 |
| int8_dynamic_cpu | CPU | int8 per row (PyTorch's fbgemm, `fbgemm_int8`) | int8 per tensor, computed at run time |

On CUDA, int8_weight_only is fast at one row only: inductor fuses its product into a
multiply + reduction for one row, and at more rows (beams, batches) each token converts
every weight to bf16 before cuBLAS (`decode.cuda_step_options`).

Which is fast where (docs: cpu-facts.md): on an AVX2 CPU without VNNI torchao's int8
weight-only is slower than fp32 (it materializes float weights); int8_cpu widens each
weight in registers and reads a quarter of fp32's bytes, the fastest at batch 1 with a compiled
step. Many rows (beams x captions, a prefill) make the products compute-bound: there
int8_dynamic_cpu multiplies int8 by int8 (~3.6x faster than int8_cpu at 32 rows); its
layers reach fbgemm through a registered op, so its decode step compiles too. Schemes with bf16
activations cast the LLM to bf16 first (the decoder's static cache follows the LLM's
dtype; the rest of the model keeps its own).

Two side effects of `torchao.quantize_` are undone or avoided here:
* it sets global inductor options unless told not to: we always pass
  `set_inductor_config=False`;
* a tied lm_head (Qwen's) stops sharing the input embedding once its weight is
  replaced; we record that in the config (`tie_word_embeddings=False`) so nothing ties
  the float embedding back over the quantized head. The embedding stays in float
  (one row is read per token).

torchao is imported only when a scheme is applied; a missing torchao (or, for int8_cpu,
an unbuilt native extension), a GPU scheme on a CPU or an unsupported GPU raise
`QuantizationError` saying what to do.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
import torch
from torch import nn

from vlv_engine.engine.fused_projections import fuse_projections

class QuantizationError(RuntimeError):
    """A quantization scheme cannot run here (unknown name, torchao, device, GPU)."""


@dataclass(frozen=True)
class Scheme:
    name: str
    devices: tuple[str, ...]
    activation_dtype: torch.dtype | None  # None: keep the model's dtype
    min_capability: tuple[int, int] | None  # CUDA compute capability
    grouped: bool  # int4: group-wise scales, group size must divide in_features
    summary: str


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("int8_weight_only", ("cpu", "cuda"), None, None, False, "int8 weights (per row), float activations"),
    Scheme("int8_dynamic", ("cpu", "cuda"), None, None, False, "int8 weights and dynamic int8 activations"),
    Scheme("int4_weight_only", ("cuda",), torch.bfloat16, (8, 0), True, "int4 weights (tinygemm), bf16 activations"),
    Scheme("fp8", ("cuda",), torch.bfloat16, (8, 9), False, "float8 e4m3 weights and dynamic activations"),
    Scheme("int4_cpu", ("cpu",), torch.bfloat16, None, True, "int4 weights (prototype CPU layout), bf16 activations"),
    Scheme("int8_cpu", ("cpu",), torch.float32, None, False, "int8 weights (per row, native AVX-512/AVX2 kernel), fp32 "
           "activations"),
    Scheme("int8_dynamic_cpu", ("cpu",), torch.float32, None, False, "int8 weights (per row) and dynamic int8 "
           "activations (per tensor), PyTorch's fbgemm kernels"),
)}
NATIVE_SCHEMES = ("int8_cpu",)  # ours, not torchao's
FBGEMM_SCHEMES = ("int8_dynamic_cpu",)  # PyTorch's quantized CPU kernels, not torchao's

INT4_GROUP_SIZES = (128, 64, 32)  # what the int4 kernels accept, largest (fewest scales) first


def check_scheme(name: str, device: str | torch.device) -> Scheme:
    """The scheme `name` if it can run on `device`, else a `QuantizationError` with the reason."""
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise QuantizationError(f"quantize={name!r}: unknown scheme; choose one of {sorted(SCHEMES)}")
    device = torch.device(device)
    if device.type not in scheme.devices:
        raise QuantizationError(f"quantize={name!r} runs on {' or '.join(d.upper() for d in scheme.devices)} "
                                f"only, not on {device.type!r}"
                                + ("; on a CPU use 'int4_cpu'" if name == "int4_weight_only" else ""))
    if name in NATIVE_SCHEMES:
        from vlv_engine.native import gemv

        if not gemv.available():
            raise QuantizationError(f"quantize={name!r}: {gemv.unavailable_reason()}")
    elif name in FBGEMM_SCHEMES:
        from vlv_engine.engine.fbgemm_int8 import unavailable_reason

        if unavailable_reason():
            raise QuantizationError(f"quantize={name!r}: {unavailable_reason()}")
    elif importlib.util.find_spec("torchao") is None:
        raise QuantizationError(f"quantize={name!r} needs torchao: pip install -e '.[quant]'")
    if device.type == "cuda" and scheme.min_capability is not None:
        if not torch.cuda.is_available():
            raise QuantizationError(f"quantize={name!r}: no CUDA device is available")
        cap = torch.cuda.get_device_capability(device)
        if cap < scheme.min_capability:
            raise QuantizationError(f"quantize={name!r} needs a GPU of compute capability "
                                    f"{'.'.join(map(str, scheme.min_capability))} or newer; "
                                    f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    return scheme


def _torchao_config(scheme: Scheme, group_size: int | None):
    # Lazy: importing torchao registers kernels and prints notices about missing native
    # libraries; nothing of that belongs in `import vlv_engine`.
    import torchao.quantization as tq

    if scheme.name == "int8_weight_only":
        return tq.Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme.name == "int8_dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if scheme.name == "int4_weight_only":
        return tq.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                       set_inductor_config=False)
    if scheme.name == "fp8":
        from torchao.quantization.granularity import PerRow

        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    if scheme.name == "int4_cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
    raise AssertionError(scheme.name)


def _linears(llm: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in llm.named_modules() if isinstance(m, nn.Linear)}


def int4_group_size(linears: dict[str, nn.Linear]) -> int:
    """The largest int4 group size that divides every layer's in_features."""
    for g in INT4_GROUP_SIZES:
        if all(m.in_features % g == 0 for m in linears.values()):
            return g
    widths = sorted({m.in_features for m in linears.values()})
    raise QuantizationError(f"int4 quantization needs in_features divisible by one of {INT4_GROUP_SIZES}; "
                            f"this LLM has linear layers of widths {widths}")


def quantize_llm(llm: nn.Module, name: str, *, device: str | torch.device | None = None) -> nn.Module:
    """Quantize the linear layers of `llm` in place with scheme `name`; returns `llm`.

    The model should already be on its device. Schemes with bf16 activations cast it to
    bf16 first. Sibling projections are fused first (`fused_projections`: q/k/v and
    gate/up, one quantized layer each). A tied lm_head is untied (see the module docstring)."""
    device = torch.device(device) if device is not None else next(llm.parameters()).device
    scheme = check_scheme(name, device)
    linears = _linears(llm)
    if not linears:
        raise QuantizationError(f"quantize={name!r}: the LLM has no linear layers")
    group = int4_group_size(linears) if scheme.grouped else None
    if scheme.activation_dtype is not None and any(p.dtype != scheme.activation_dtype for p in llm.parameters()):
        llm.to(dtype=scheme.activation_dtype)
    was_tied = _lm_head_is_tied(llm)
    # q/k/v and gate/up as one layer each before quantizing: one quantized product per group.
    fuse_projections(llm)
    if name in NATIVE_SCHEMES:
        _replace_linears(llm, _linears(llm))
    elif name in FBGEMM_SCHEMES:
        from vlv_engine.engine.fbgemm_int8 import swap_linears

        swap_linears([llm])
    else:
        from torchao.quantization import quantize_

        quantize_(llm, _torchao_config(scheme, group), filter_fn=_is_linear)
    if was_tied:
        for cfg in {id(c): c for c in (llm.config, llm.config.get_text_config(decoder=True))}.values():
            cfg.tie_word_embeddings = False
    llm.requires_grad_(False)
    llm.vlv_quantization = name  # read by weight_bytes() callers and reports
    return llm


def _replace_linears(llm: nn.Module, linears: dict[str, nn.Linear]) -> None:
    from vlv_engine.native.gemv import Int8Linear

    for name, linear in linears.items():
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, child, Int8Linear.from_linear(linear))


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _lm_head_is_tied(llm: nn.Module) -> bool:
    get_out, get_in = getattr(llm, "get_output_embeddings", None), getattr(llm, "get_input_embeddings", None)
    if get_out is None or get_in is None or get_out() is None:
        return False
    return get_out().weight is get_in().weight


# --------------------------------------------------------------------------- bytes


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking through torchao's wrapper subclasses (packed data + scales)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))
    return t.numel() * t.element_size()


def decode_weight_bytes(llm: nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter, except an untied input
    embedding table (a step gathers one row of it)."""
    emb = llm.get_input_embeddings() if hasattr(llm, "get_input_embeddings") else None
    skip = None if emb is None or _lm_head_is_tied(llm) else emb.weight
    seen: set[int] = set()
    total = 0
    for p in llm.parameters():
        if id(p) in seen or p is skip:
            continue
        seen.add(id(p))
        total += tensor_bytes(p.data if not _is_wrapper(p) else p)
    if getattr(llm, "vlv_quantization", None) in FBGEMM_SCHEMES:  # packed weights are no parameters
        from vlv_engine.engine.fbgemm_int8 import is_dynamic_int8, weight_bytes

        total += sum(weight_bytes(m) for m in llm.modules() if is_dynamic_int8(m))
    return total


def _is_wrapper(t: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(t) or is_traceable_wrapper_subclass(getattr(t, "data", t))


def available_schemes(device: str | torch.device) -> list[str]:
    """The scheme names `check_scheme` accepts on `device`."""
    out = []
    for name in SCHEMES:
        try:
            check_scheme(name, device)
        except QuantizationError:
            continue
        out.append(name)
    return out

