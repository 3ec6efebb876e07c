"""benchmarks/gemv_step.py: a decode step's int8 products, ours against PyTorch's kernel."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from vlv_engine.native import gemv

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gemv_step.py"


def _module():
    spec = importlib.util.spec_from_file_location("gemv_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_shapes_are_the_prepared_llms_products():
    layers, shapes = _module().step_shapes("small", None)
    # Qwen2.5-0.5B: width 896, 14 heads of 64, 2 key/value heads, MLP 4864, vocabulary 151936
    assert layers == 24
    assert shapes == {"qkv": (896 + 2 * 128, 896), "o": (896, 896), "gate_up": (2 * 4864, 896),
                      "down": (896, 4864), "lm_head": (151936, 896)}
    assert _module().step_shapes("small", 3)[0] == 3


@pytest.mark.skipif(not gemv.available(), reason="the native int8 kernel is not built")
def test_runs_and_prints_both_paths_per_row_count():
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--rows", "1", "3", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert [r.split("|")[1:3] for r in rows] == [[" 1 ", " vlv "], [" 1 ", " torch "], [" 3 ", " vlv "],
                                                 [" 3 ", " torch "]]
    assert all(float(r.split("|")[3]) > 0 for r in rows)  # a median step time was measured
    assert "copy bandwidth" in out.stdout and "peak RSS" in out.stdout
