"""benchmarks/gpu_check.sh's plumbing, in its CPU dry run (the nano preset, eager).

On a GPU machine a lease is short and one command may run 10 minutes, so the script is
run twice with --skip-done: the second run must skip what the first finished and still
summarize it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_second_run_skips_finished_steps(tmp_path):
    out = tmp_path / "check"
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--steps", "encoder", "--out", str(out),
           "--skip-done"]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert (out / "encoder.done").exists() and (out / "encoder" / "bench_nano.json").exists()
    assert "done in an earlier run" not in first.stdout
    summary = (out / "summary.md").read_text()
    assert "| encoder batch 1 (ms) | not measured" not in summary  # measured in the dry run

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "== encoder: done in an earlier run" in second.stdout
    assert "vlv bench" not in second.stdout  # nothing was measured again
    assert (out / "summary.md").read_text() == summary
