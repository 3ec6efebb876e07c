"""Fused ops for the encoder-to-bottleneck path, each a torch.library custom op.

    layer_norm(x, weight, bias, eps, residual=None)   # vlv::layer_norm / vlv::add_layer_norm
    linear_gelu(x, weight, bias, approximate="none")  # vlv::linear_gelu ('none' | 'tanh' | 'quick')
    attention(q, k, v, is_causal=False, scale=None)   # vlv::attention

Each op runs its Triton kernel on CUDA tensors and its plain-PyTorch reference
(`vlv_engine.ops.reference`) on CPU tensors; with TRITON_INTERPRET=1 and
VLV_TRITON_ON_CPU=1, CPU tensors go through the kernels in Triton's interpreter
(tests). `available()` says whether a Triton kernel can run here. Importing this
package never imports triton. Forward only: the ops have no backward.

`fused_modules` holds drop-in LayerNorm / Linear+GELU modules; `fused_blocks` the
encoder path's transformers (Florence-2's BART encoder and query decoder, the CLIP
text encoder) rebuilt on these ops, used by the engine's "triton" encoder backend.
"""

from vlv_engine.ops import reference
from vlv_engine.ops._runtime import available, backend_for
from vlv_engine.ops.attention import attention
from vlv_engine.ops.fused_modules import FusedLayerNorm, FusedLinearGELU, fuse_projector
from vlv_engine.ops.layer_norm import layer_norm
from vlv_engine.ops.linear_gelu import linear_gelu

__all__ = ["FusedLayerNorm", "FusedLinearGELU", "attention", "available", "backend_for", "fuse_projector", "layer_norm",
           "linear_gelu", "reference"]
