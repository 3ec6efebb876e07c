"""The CUDA preprocessing kernels, built on this CPU-only machine.

They run only on a GPU (tests/native/test_preprocess.py checks them there against the
reference), but they compile wherever nvcc is: this builds the extension as a GPU
machine would (`VLV_NATIVE_CUDA=ON`, the CMake default architectures), checks that it
holds machine code for every architecture it promises with no register spills, and that
without a GPU a call fails with CUDA's reason instead of crashing the process.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")  # CMakeLists.txt's default CMAKE_CUDA_ARCHITECTURES

pytestmark = pytest.mark.skipif(
    not (shutil.which("nvcc") and shutil.which("cmake") and importlib.util.find_spec("nanobind")),
    reason="needs nvcc, cmake and nanobind (pip install -e .[dev]) to build the CUDA kernels")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    if importlib.util.find_spec("triton"):  # Triton ships one
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(tool) if tool.exists() else None
    return None


@pytest.fixture(scope="module")
def cuda_module(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cuda_build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator, f"-DPython_EXECUTABLE={sys.executable}",
         "-DVLV_NATIVE_CUDA=ON"], capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build), "--target", "_preprocess_cuda", "-j", "2"],
                              capture_output=True, text=True, timeout=900)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    (module,) = build.glob("_preprocess_cuda*.so")
    return module


def test_machine_code_for_every_architecture(cuda_module):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here (neither the CUDA toolkit's nor Triton's)")
    listed = subprocess.run([tool, "--list-elf", str(cuda_module)], capture_output=True, text=True, timeout=60).stdout
    assert sorted(set(re.findall(r"\.(sm_\d+)\.cubin", listed))) == sorted(ARCHS), listed
    usage = subprocess.run([tool, "--dump-resource-usage", str(cuda_module)], capture_output=True, text=True,
                           timeout=60).stdout
    kernels = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert len(kernels) >= 4 * len(ARCHS), usage  # resize passes, colour conversion, LUT per dtype
    for name, _, stack, local in kernels:
        assert int(local) == 0 and int(stack) == 0, f"{name} spills registers: {usage}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_a_call_raises_cudas_reason(cuda_module):
    # In a fresh process: the module imports without a GPU (nothing runs at import), and a
    # call names the CUDA step that failed.
    code = f"""
import sys
import numpy as np
sys.path.insert(0, {str(cuda_module.parent)!r})
import _preprocess_cuda as m
try:
    m.resize_normalize_cuda([np.zeros((4, 4, 3), np.uint8)], 0, 0, 4, 8, 8, 1, 0, 0)
except RuntimeError as err:
    print("raised:", err)
"""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"raised: CUDA error in cudaSetDevice", run.stdout), run.stdout + run.stderr
