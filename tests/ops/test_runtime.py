"""Backend selection, import hygiene, and the interpreter's import-order independence."""

import subprocess
import sys
import textwrap

import pytest
import torch
from ops_helpers import HAS_TRITON

from vlv_engine import ops


def _run(code: str, env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLV_TRITON_ON_CPU")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_backend_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VLV_TRITON_ON_CPU", "1")
    assert ops.backend_for(cpu) == "reference"  # no interpreter: never Triton on CPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("VLV_TRITON_ON_CPU")
    assert ops.backend_for(cpu) == "reference"  # the interpreter alone does not slow the CPU path
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        assert ops.available() is False


def test_interpreter_makes_triton_available(interpreter):
    assert ops.available() is True
    assert ops.backend_for(torch.zeros(1)) == "triton"


def test_import_without_triton():
    """`import vlv_engine.ops` never imports triton, and without triton the ops run
    their references even when asked for Triton."""
    out = _run("""
        import sys
        import torch
        import vlv_engine.ops as ops
        assert "triton" not in sys.modules
        sys.modules["triton"] = None  # as if not installed
        assert ops.available() is False and ops.backend_for(torch.zeros(1)) == "reference"
        x = torch.randn(3, 8)
        y = ops.layer_norm(x, None, None, 1e-5)
        assert torch.allclose(y, torch.nn.functional.layer_norm(x, (8,)))
        print("ok")
    """, {"TRITON_INTERPRET": "1", "VLV_TRITON_ON_CPU": "1"})
    assert out == "ok"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e .[triton])")
def test_interpreter_works_when_triton_was_imported_first():
    """triton bakes TRITON_INTERPRET into every @triton.jit at import. Transformers (and
    so the model tests) import triton early; the kernels must still run when the
    interpreter is switched on later, as tests/ops does per test."""
    out = _run("""
        import os
        import triton, torch
        from vlv_engine import ops
        from vlv_engine.ops import reference as ref
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["VLV_TRITON_ON_CPU"] = "1"
        x, w, r = torch.randn(5, 24), torch.randn(40, 24), torch.randn(5, 24)
        q = torch.randn(1, 2, 9, 16)
        assert ops.backend_for(x) == "triton"
        errs = [
            (ops.layer_norm(x, None, None, 1e-5, residual=r)[0] - ref.add_layer_norm(x, r, None, None, 1e-5)[0]),
            ops.linear_gelu(x, w, None, "tanh") - ref.linear_gelu(x, w, None, "tanh"),
            ops.linear_gelu(x, w, None) - ref.linear_gelu(x, w, None),
            ops.attention(q, q, q, True) - ref.attention(q, q, q, True),
        ]
        print(max(e.abs().max().item() for e in errs))
    """, {})
    assert float(out) < 1e-5
