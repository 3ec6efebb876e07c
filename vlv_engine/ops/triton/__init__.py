"""@triton.jit kernels only, one file per op. Importing any module here imports triton:
only the launchers in `vlv_engine.ops` import them, lazily, at the first launch."""
