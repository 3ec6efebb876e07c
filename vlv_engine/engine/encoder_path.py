"""The encoder path behind one call: normalized pixels [B, 3, S, S] -> caption embedding [B, Nq, D].

Three runners, one per backend (chosen by `vlv_engine.engine.encoder_select`):

* `EagerEncoderPath`: the model's own modules (`VLVModel.caption_embedding`), the
  reference every other runner is checked against.
* `CompiledEncoderPath`: the same function under ``torch.compile``. Compiled lazily, on
  the first call of each batch bucket. ``batching="buckets"`` (default) pads a batch to
  the next power of two up to ``max_batch`` and compiles one static-shape graph per
  bucket (at most log2(max_batch) + 1 compiles); ``batching="dynamic"`` marks the batch
  dim dynamic and compiles one graph for every size (benchmarks/encoder_path.py measures
  both).
* `TritonEncoderPath`: `FusedEncoderPath` (Florence-2's BART encoder and query decoder,
  phi and the CLIP text encoder on the vlv ops; the DaViT vision tower stays as it is)
  replayed from one CUDA graph per batch bucket (`vlv_engine.engine.segment_graph`):
  the whole path, vision tower included (``graph_scope="full"``, the default), or only
  the fixed-shape phi -> text encoder segment (``graph_scope="segment"``).

None of them changes the model it is given: the fused modules share its parameters
(and hold stacked copies of the q/k/v weights, taken when the runner is built: load
new weights into the model, build a new runner). Batch invariance: eager is bit-exact
whatever the batch; the compiled and Triton runners run a batch in its bucket's
kernels, so an image's embedding agrees across batch sizes to rounding (the tests
hold it to 1e-5), not bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from vlv_engine.engine.encoder_select import ENCODER_BACKENDS, EncoderBackendChoice
from vlv_engine.engine.segment_graph import (BucketedSegment, CUDAGraphRecorder, bucket_for, eager_recorder,
                                             pad_rows, power_of_two_buckets)
from vlv_engine.ops.fused_blocks import FusedBartDecoder, FusedBartEncoder, FusedCLIPTextEncoder
from vlv_engine.ops.fused_modules import fuse_projector

BATCHING = ("buckets", "dynamic")
GRAPH_SCOPES = ("segment", "full")


class CaptionEmbedding(nn.Module):
    """`VLVModel.caption_embedding` as a module (what torch.compile compiles)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.caption_embedding(pixel_values)


class EagerEncoderPath:
    backend = "eager"

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, pixel_values: Tensor) -> Tensor:
        return self.model.caption_embedding(pixel_values)  # [B, Nq, D]


class CompiledEncoderPath:
    backend = "compile"

    def __init__(self, model: nn.Module, *, max_batch: int = 8, batching: str = "buckets", mode: str | None = None,
                 options: dict | None = None, backend: str | Callable = "inductor"):
        # backend: torch.compile's; tests pass a counting one to see the recompiles.
        if batching not in BATCHING:
            raise ValueError(f"unknown batching {batching!r}; choose one of {BATCHING}")
        self.module = CaptionEmbedding(model).eval()
        self.batching, self.mode, self.options, self.compiler = batching, mode, options, backend
        self.buckets = power_of_two_buckets(max_batch)
        self._compiled: Callable[[Tensor], Tensor] | None = None

    @property
    def compiled(self) -> Callable[[Tensor], Tensor]:
        if self._compiled is None:  # torch.compile is itself lazy: the work happens on the first call
            # buckets: static shapes (dynamic=False); dynamic: the batch dim is marked per call.
            self._compiled = torch.compile(self.module, dynamic=False if self.batching == "buckets" else None,
                                           backend=self.compiler, mode=self.mode, options=self.options)
        return self._compiled

    @torch.no_grad()
    def __call__(self, pixel_values: Tensor) -> Tensor:
        largest = self.buckets[-1]
        outs = []
        for lo in range(0, pixel_values.shape[0], largest):
            x = pixel_values[lo:lo + largest]  # [n, 3, S, S]
            n = x.shape[0]
            if self.batching == "dynamic":
                x = x.clone()  # mark_dynamic marks the tensor: never the caller's
                torch._dynamo.mark_dynamic(x, 0)
                outs.append(self.compiled(x))
            else:
                outs.append(self.compiled(pad_rows(x, bucket_for(n, self.buckets)))[:n])
        return torch.cat(outs) if len(outs) != 1 else outs[0]


class FusedEncoderPath(nn.Module):
    """The encoder path with every transformer on the vlv ops (parameters shared with `model`).

    pixels -> vision tower + projector (the model's own) -> [image, prompt] tokens
    -> FusedBartEncoder -> FusedBartDecoder on the queries (`query_states`)
    -> phi (Linear+GELU fused) -> FusedCLIPTextEncoder (`segment`) -> [B, Nq, D].
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        enc = model.encoder
        self.encoder = enc  # vision tower, projector, prompt ids, queries: used as they are
        lm = enc.florence.language_model
        self.bart_encoder = FusedBartEncoder(lm.encoder)
        self.query_decoder = FusedBartDecoder(lm.decoder)
        self.phi = fuse_projector(enc.language_proj)
        self.text_encoder = FusedCLIPTextEncoder(model.bottleneck.text_encoder)

    def query_states(self, pixel_values: Tensor) -> Tensor:
        enc = self.encoder
        image = enc.image_tokens(pixel_values)  # [B, T_img, d]
        prompt = enc.prompt_embeddings().to(image.dtype)  # [T_prompt, d]
        tokens = torch.cat([image, prompt.unsqueeze(0).expand(image.shape[0], -1, -1)], dim=1)  # [B, T, d]
        states = self.bart_encoder(tokens)  # [B, T, d]
        queries = enc.query_embed.to(states.dtype).expand(states.shape[0], -1, -1)  # [B, Nq, d]
        return self.query_decoder(queries, states)  # [B, Nq, d]

    def segment(self, query_states: Tensor) -> Tensor:
        """phi -> text encoder: [B, Nq, d] -> [B, Nq, D], fixed shapes per batch size."""
        return self.text_encoder(self.phi(query_states))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.segment(self.query_states(pixel_values))


class TritonEncoderPath:
    backend = "triton"

    def __init__(self, model: nn.Module, *, max_batch: int = 8, cuda_graph: bool | None = None,
                 graph_scope: str = "full", recorder: Callable | None = None):
        # cuda_graph: None = on CUDA devices. graph_scope: what one graph holds, "full"
        # (pixels -> embedding, the vision tower and BART included: every shape in the path
        # is fixed by the image size) or "segment" (phi -> text encoder, from the query
        # states; the rest runs eagerly). Full, because at batch 1 the eager vision tower
        # and BART are hundreds of small kernels whose launches, not the GPU, set the time.
        # recorder: replaces the CUDA-graph recorder (tests: segment_graph.eager_recorder).
        if graph_scope not in GRAPH_SCOPES:
            raise ValueError(f"unknown graph_scope {graph_scope!r}; choose one of {GRAPH_SCOPES}")
        self.fused = FusedEncoderPath(model).eval()
        self.buckets = power_of_two_buckets(max_batch)
        self.graph_scope = graph_scope
        self._recorder = recorder
        self._cuda_graph = cuda_graph
        self._segments: BucketedSegment | None = None

    def _segment_runner(self, device: torch.device) -> BucketedSegment | None:
        if self._segments is None:
            recorder = self._recorder
            if recorder is None and (self._cuda_graph if self._cuda_graph is not None else device.type == "cuda"):
                recorder = CUDAGraphRecorder()
            if recorder is None:
                return None
            fn = self.fused.segment if self.graph_scope == "segment" else self.fused.forward
            self._segments = BucketedSegment(fn, self.buckets, recorder)
        return self._segments

    @torch.no_grad()
    def __call__(self, pixel_values: Tensor) -> Tensor:
        runner = self._segment_runner(pixel_values.device)
        if runner is None:
            return self.fused(pixel_values)
        if self.graph_scope == "full":
            return runner(pixel_values)  # [B, Nq, D]
        return runner(self.fused.query_states(pixel_values))  # [B, Nq, d] -> [B, Nq, D]


def build_encoder_path(choice: EncoderBackendChoice | str, model: nn.Module, *, max_batch: int = 8, **options):
    """The runner for a chosen backend over `model` (a `VLVModel`); `options` go to its constructor."""
    name = choice.name if isinstance(choice, EncoderBackendChoice) else choice
    if name == "eager":
        return EagerEncoderPath(model)
    if name == "compile":
        return CompiledEncoderPath(model, max_batch=max_batch, **options)
    if name == "triton":
        return TritonEncoderPath(model, max_batch=max_batch, **options)
    raise ValueError(f"unknown encoder backend {name!r}; choose one of {ENCODER_BACKENDS}")


__all__ = ["BATCHING", "GRAPH_SCOPES", "CaptionEmbedding", "CompiledEncoderPath", "EagerEncoderPath", "FusedEncoderPath",
           "TritonEncoderPath", "build_encoder_path", "eager_recorder"]
