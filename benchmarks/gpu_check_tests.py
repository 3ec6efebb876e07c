"""The GPU tests step of `gpu_check.sh`, read from pytest's verbose logs.

A device lease is short, and one command may run 10 minutes, so the tests step may be
cut off by its time limit and run again by a second `--skip-done` call. pytest writes its
report files only when a session ends, so a killed session leaves none. Its verbose log
(`-v`, unbuffered) has each test's outcome as it happens, though. So every run keeps its
own log (`OUT/gpu_tests.N.log`, exit status in `OUT/gpu_tests.N.rc`), and this module reads
them all:

* `deselect OUT` prints the node ids a new run should leave out, one per line: those with
  an outcome in an earlier run, and the test an earlier run crashed in (CUDA aborts the
  process on some errors). A test cut off by the time limit runs again.
* `summarize(OUT)` gives the counts and names the summary table shows, over all runs.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
_OUTCOME = re.compile(r"^(tests/\S+?::.*?) (" + "|".join(OUTCOMES) + r")(?:\s|$)")
# The id, written before the test runs; a process that dies in the test may append its
# last words on the same line ("Fatal Python error: Aborted").
_STARTED = re.compile(r"^(tests/\S+?::\S+)(?:\s|$)")
_NOT_COLLECTED = re.compile(r"^_+ ERROR collecting (\S+) _+$")
# pytest's own exit statuses (0 passed, 1 some failed, 2 interrupted, 3 internal error,
# 4 usage, 5 nothing collected) and `timeout`'s (124, or 137 after its KILL): anything
# else is the process dying inside a test.
_NOT_A_CRASH = {0, 1, 2, 3, 4, 5, 124, 137}


@dataclass
class RunLog:
    outcomes: dict[str, str] = field(default_factory=dict)  # node id -> its last outcome
    running: str | None = None  # the test the run was inside when its log ends
    not_collected: set[str] = field(default_factory=set)
    rc: int | None = None

    @property
    def crashed(self) -> bool:
        return self.rc is not None and self.rc not in _NOT_A_CRASH


def read_log(text: str, rc: int | None = None) -> RunLog:
    run = RunLog(rc=rc)
    for line in text.splitlines():
        if m := _OUTCOME.match(line):
            run.outcomes[m.group(1)] = m.group(2)  # a teardown ERROR after PASSED wins
            if run.running == m.group(1):
                run.running = None
        elif m := _NOT_COLLECTED.match(line):
            run.not_collected.add(m.group(1))
        elif m := _STARTED.match(line):
            run.running = m.group(1)
    if run.running in run.outcomes:
        run.running = None
    return run


def read_runs(out: Path) -> list[RunLog]:
    """Every run's log in `out`, oldest first."""
    runs = []
    for log in sorted(out.glob("gpu_tests.*.log"), key=lambda p: int(p.name.split(".")[1])):
        rc_file = log.with_suffix(".rc")
        rc = int(rc_file.read_text().strip()) if rc_file.exists() and rc_file.read_text().strip() else None
        runs.append(read_log(log.read_text(errors="replace"), rc))
    return runs


def next_log(out: Path) -> int:
    """The number of the next run's log."""
    return 1 + max((int(p.name.split(".")[1]) for p in out.glob("gpu_tests.*.log")), default=0)


def deselect(runs: list[RunLog]) -> list[str]:
    ids: dict[str, None] = {}
    for run in runs:
        ids.update(dict.fromkeys(run.outcomes))
        if run.crashed and run.running:
            ids[run.running] = None
    return list(ids)


@dataclass
class Summary:
    passed: int
    failed: list[str]
    skipped: int
    crashed_in: list[str]  # tests a run died in (not rerun)
    cut_off_in: str | None  # the test the last run was inside when its time limit ended it
    not_collected: int
    runs: int


def summarize(out: Path) -> Summary | None:
    """The tests step over all its runs in `out` (None: it never ran)."""
    runs = read_runs(Path(out))
    if not runs:
        return None
    outcomes: dict[str, str] = {}
    for run in runs:
        outcomes.update(run.outcomes)
    crashed = [r.running for r in runs if r.crashed and r.running and r.running not in outcomes]
    last = runs[-1]
    return Summary(
        passed=sum(o in ("PASSED", "XFAIL") for o in outcomes.values()),
        failed=[i for i, o in outcomes.items() if o in ("FAILED", "ERROR", "XPASS")],
        skipped=sum(o == "SKIPPED" for o in outcomes.values()),
        crashed_in=crashed,
        cut_off_in=last.running if not last.crashed else None,
        not_collected=len(set().union(*(r.not_collected for r in runs))),
        runs=len(runs),
    )


if __name__ == "__main__":
    command, out = sys.argv[1], Path(sys.argv[2])
    if command == "deselect":
        print("\n".join(deselect(read_runs(out))))
    elif command == "next":
        print(next_log(out))
    else:
        sys.exit(f"gpu_check_tests.py: unknown command {command!r} (deselect OUT, next OUT)")
