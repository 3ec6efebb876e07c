"""One matrix product for the projections that read the same input: an attention's
q/k/v, an MLP's gate/up (Llama-style blocks: Qwen2, Llama, Mistral, ...).

Why: a decode step at batch 1 is a chain of small products, each its own kernel. In a
Qwen2.5-3B step the k and v projections are 2048 x 256 each: a GPU reads them in well
under a microsecond and then waits for the next launch, and even inside a CUDA graph
every kernel costs a few microseconds of launch and ramp-down. Fusing takes 7 products
per layer to 4 (252 -> 144 on 36 layers); a 1,000 tokens/s target leaves 1 ms per token
for everything. On a CPU the same cut removes per-call overhead (our int8 kernel's thread
pool wakes once per product). gpt-fast and vLLM fuse these the same way.

How, without touching the model's code: the members' `nn.Linear`s are concatenated into
one `nn.Linear` registered on their parent (`qkv_proj`, `gate_up_proj`), and each member
becomes a `ProjectionSlice`. The model's own forward still calls every member. The first
member called with a tensor `x` computes the fused product and keeps the other members'
slices; a member then called with the *same object* `x` takes its kept slice. Any other
call (another input, a repeated call) computes the fused product afresh and slices it,
so results never depend on call order. Under `torch.compile` dynamo traces this logic
and the graph holds one product; the kept slices never outlive a forward.

The fused layer is a plain `nn.Linear`, so quantization schemes (torchao's, ours,
fbgemm's) quantize it like any other: one quantized product per group, and every scheme
used here quantizes per output row (or per row-group), so a row's numbers are what its
member's would have been.

The state dict keeps the model's own layout (`q_proj.weight`, ...): a state-dict hook
splits the fused tensors back into the members' (views, no copies) and a load hook joins
them, so `save_pretrained`, checkpoint hashes and `load_state_dict` see the unfused model.
Tensors a quantization library wraps (torchao's) cannot be split and stay fused.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# (members, fused name) in the order the model calls them.
FUSABLE: tuple[tuple[tuple[str, ...], str], ...] = (
    (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    (("gate_proj", "up_proj"), "gate_up_proj"),
)


class FusedProjection:
    """One fused group: the fused layer (`parent.<fused_name>`, looked up on each call, so a
    quantization scheme may replace it) and the rows of each member."""

    def __init__(self, parent: nn.Module, fused_name: str, bounds: list[tuple[int, int]]):
        self.parent, self.fused_name, self.bounds = parent, fused_name, bounds
        # (input, slices not yet taken): one attribute, swapped whole, so a thread never
        # pairs one call's input with another call's outputs.
        self._state: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None

    @property
    def linear(self) -> nn.Module:
        return getattr(self.parent, self.fused_name)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state is not None and state[0] is x and state[1][index] is not None:
            kept = state[1]
            out, kept[index] = kept[index], None
            if all(o is None for o in kept) and self._state is state:
                self._state = None
            return out
        y = self.linear(x)
        kept = [y[..., lo:hi] for lo, hi in self.bounds]
        out, kept[index] = kept[index], None
        self._state = (x, kept)
        return out


class ProjectionSlice(nn.Module):
    """A member of a fused group: its rows of the fused product. No parameters of its own
    (the fused layer holds them), so nothing is stored or counted twice."""

    def __init__(self, group: FusedProjection, index: int, in_features: int):
        super().__init__()
        # A plain attribute, not a submodule: the fused layer is registered once, on the parent.
        self.__dict__["group"] = group
        self.index, self.in_features = index, in_features
        lo, hi = group.bounds[index]
        self.out_features = hi - lo

    @property
    def weight(self) -> torch.Tensor:
        """This member's rows of the fused weight (a view), for code that reads a layer's dtype,
        device or shape."""
        return _rows(self.group.linear.weight, self.group.bounds[self.index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused rows {self.group.bounds[self.index]}"


def _rows(t: torch.Tensor, bounds: tuple[int, int]) -> torch.Tensor:
    lo, hi = bounds
    return t[lo:hi]


def _fusable(members: list) -> bool:
    if not all(type(m) is nn.Linear for m in members):  # noqa: E721 - subclasses may compute otherwise
        return False
    if any(is_traceable_wrapper_subclass(m.weight) or m._forward_hooks or m._forward_pre_hooks for m in members):
        return False  # already quantized, or something watches the member's own call
    first = members[0].weight
    return all(m.in_features == members[0].in_features and m.weight.dtype == first.dtype
               and m.weight.device == first.device for m in members)


def _fuse_group(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> None:
    members: list[nn.Linear] = [getattr(parent, n) for n in names]
    first = members[0].weight
    has_bias = any(m.bias is not None for m in members)
    with torch.no_grad():
        weight = torch.cat([m.weight for m in members])
        bias = torch.cat([m.bias if m.bias is not None else first.new_zeros(m.out_features)
                          for m in members]) if has_bias else None
    linear = nn.Linear(first.shape[1], weight.shape[0], bias=has_bias, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    bounds, lo = [], 0
    for m in members:
        bounds.append((lo, lo + m.out_features))
        lo += m.out_features
    parent.add_module(fused_name, linear)
    group = FusedProjection(parent, fused_name, bounds)
    for i, name in enumerate(names):
        setattr(parent, name, ProjectionSlice(group, i, members[i].in_features))
    specs = getattr(parent, "_vlv_fused", None)
    if specs is None:
        specs = parent.__dict__["_vlv_fused"] = {}
        parent.register_state_dict_post_hook(_split_fused_state)
        parent.register_load_state_dict_pre_hook(_join_fused_state)
    specs[fused_name] = (names, bounds, [m.bias is not None for m in members])


def fuse_projections(model: nn.Module, groups=FUSABLE) -> int:
    """Fuse every group of sibling `nn.Linear`s named in `groups` (same input width, dtype
    and device); returns how many groups were fused. Idempotent: fused groups, layers of
    other types (already quantized) and partial groups are left alone."""
    made = 0
    for parent in list(model.modules()):
        for names, fused_name in groups:
            members = [getattr(parent, n, None) for n in names]
            if hasattr(parent, fused_name) or not _fusable(members):
                continue
            _fuse_group(parent, names, fused_name)
            made += 1
    return made


def _split_fused_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # Every tensor of the fused layer with one row per output (an nn.Linear's weight and
    # bias; our int8 layer's weight, scale and bias) goes back to the members as views.
    for fused_name, (names, bounds, has_bias) in module._vlv_fused.items():
        head = f"{prefix}{fused_name}."
        for key in [k for k in state_dict if k.startswith(head)]:
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or is_traceable_wrapper_subclass(value) or \
                    value.dim() == 0 or value.shape[0] != bounds[-1][1]:
                continue  # a quantization library's tensor: kept fused
            param = key[len(head):]
            del state_dict[key]
            for name, rows, biased in zip(names, bounds, has_bias):
                if param != "bias" or biased:
                    state_dict[f"{prefix}{name}.{param}"] = _rows(value, rows)


def _join_fused_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    for fused_name, (names, bounds, has_bias) in module._vlv_fused.items():
        fused = getattr(module, fused_name)
        params = [p for p, _ in fused.named_parameters(recurse=False)] + \
                 [b for b, _ in fused.named_buffers(recurse=False)]
        for param in params:
            keys = [f"{prefix}{name}.{param}" for name, biased in zip(names, has_bias) if param != "bias" or biased]
            if not all(k in state_dict for k in keys):
                continue  # the fused layout itself, or missing keys that loading reports
            parts = [state_dict.pop(k) for k in keys]
            if param == "bias" and not all(has_bias):
                it = iter(parts)
                parts = [next(it) if biased else parts[0].new_zeros(hi - lo)
                         for biased, (lo, hi) in zip(has_bias, bounds)]
            state_dict[f"{prefix}{fused_name}.{param}"] = torch.cat(parts)
