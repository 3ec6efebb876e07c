"""The tests step of benchmarks/gpu_check.sh across runs cut off by their time limit.

Real pytest sessions on a small generated test module, killed as `timeout` kills the step:
what a killed session leaves in its verbose log must be enough to resume it and to
summarize it."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check_tests as gct  # noqa: E402

MODULE = '''
import os, time
import pytest

def test_a_passes():
    pass

def test_b_fails():
    assert 1 == 2

@pytest.mark.parametrize("n", [1, 2])
def test_c_param(n):
    pass

def test_d_hangs():
    if not os.environ.get("HANG_DONE"):
        time.sleep(60)

def test_e_skips():
    pytest.skip("not here")
'''


def _session(work: Path, out: Path, *extra: str, kill_after: float | None = None, env_extra=None) -> int:
    """One pytest run as the step runs it, its log and exit status numbered as the step does."""
    n = gct.next_log(out)
    env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    with open(out / f"gpu_tests.{n}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "tests", "-v", "--tb=short", "-p", "no:cacheprovider",
                                 "-rs", *extra], cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
        if kill_after is None:
            rc = proc.wait(timeout=120)
        else:
            deadline = time.monotonic() + 60
            while "test_d_hangs" not in (out / f"gpu_tests.{n}.log").read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(kill_after)
            proc.send_signal(signal.SIGTERM)  # what `timeout` sends
            proc.wait(timeout=30)
            rc = 124  # what `timeout` then exits with
    (out / f"gpu_tests.{n}.rc").write_text(f"{rc}\n")
    return rc


@pytest.fixture
def project(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "tests").mkdir(parents=True)
    out.mkdir()
    (work / "tests" / "test_mod.py").write_text(MODULE)
    return work, out


def test_a_run_cut_off_resumes_where_it_stopped(project):
    work, out = project
    _session(work, out, kill_after=1.0)
    runs = gct.read_runs(out)
    assert runs[0].outcomes == {
        "tests/test_mod.py::test_a_passes": "PASSED", "tests/test_mod.py::test_b_fails": "FAILED",
        "tests/test_mod.py::test_c_param[1]": "PASSED", "tests/test_mod.py::test_c_param[2]": "PASSED"}
    assert runs[0].running == "tests/test_mod.py::test_d_hangs" and not runs[0].crashed

    middle = gct.summarize(out)
    assert (middle.passed, middle.failed, middle.cut_off_in) == (
        3, ["tests/test_mod.py::test_b_fails"], "tests/test_mod.py::test_d_hangs")

    # The resumed run leaves out the four finished tests and runs the one cut off again.
    left_out = gct.deselect(runs)
    assert "tests/test_mod.py::test_d_hangs" not in left_out and len(left_out) == 4
    args = [a for i in left_out for a in ("--deselect", i)]
    assert _session(work, out, *args, env_extra={"HANG_DONE": "1"}) == 0
    second = gct.read_runs(out)[1]
    assert set(second.outcomes) == {"tests/test_mod.py::test_d_hangs", "tests/test_mod.py::test_e_skips"}

    total = gct.summarize(out)
    assert (total.passed, total.failed, total.skipped, total.cut_off_in, total.runs) == (
        4, ["tests/test_mod.py::test_b_fails"], 1, None, 2)


def test_a_test_that_kills_the_process_is_not_run_again(project):
    work, out = project
    (work / "tests" / "test_mod.py").write_text(MODULE.replace("time.sleep(60)", "os.abort()"))
    rc = _session(work, out)
    assert rc not in (0, 1)  # the process died (SIGABRT)
    runs = gct.read_runs(out)
    assert runs[0].crashed and runs[0].running == "tests/test_mod.py::test_d_hangs"
    assert "tests/test_mod.py::test_d_hangs" in gct.deselect(runs)
    assert gct.summarize(out).crashed_in == ["tests/test_mod.py::test_d_hangs"]


def test_a_module_that_does_not_import_is_counted(project):
    work, out = project
    (work / "tests" / "test_broken.py").write_text("import not_a_module_anywhere\n")
    _session(work, out, "--continue-on-collection-errors", env_extra={"HANG_DONE": "1"})
    summary = gct.summarize(out)
    assert summary.not_collected == 1 and summary.passed == 4 and summary.cut_off_in is None


def test_no_logs_no_summary(tmp_path):
    assert gct.summarize(tmp_path) is None
    assert gct.next_log(tmp_path) == 1 and gct.deselect([]) == []
