"""UNet (and VAE decoder) backends behind one interface.

* `contract`: the I/O contract of each exported module (names, dtypes, dynamic axes,
  min/opt/max profile, a sample input) and the binding-shape logic runtimes share;
* `onnx_backend`: ONNX export cached on disk, run by ONNX Runtime;
* `tensorrt_backend`: TensorRT engines built from the same ONNX graph (CUDA only;
  tensorrt is imported lazily);
* `compile_backend`: ``torch.compile`` of the UNet step;
* `select`: choose once from constraints, build the `UNetRunner`.

Importing this package imports torch but no optional package (onnx, onnxruntime,
tensorrt); those load when a backend is built.
"""

from vlv_engine.engine.backends.select import (BACKENDS, PREFERENCES, BackendChoice, BackendUnavailable,
                                               EagerUNetRunner, UNetRunner, build_unet_runner, probe_availability,
                                               select_backend)

__all__ = ["BACKENDS", "PREFERENCES", "BackendChoice", "BackendUnavailable", "EagerUNetRunner", "UNetRunner",
           "build_unet_runner", "probe_availability", "select_backend"]
