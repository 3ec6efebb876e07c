#!/usr/bin/env bash
# One command for a CUDA machine (an H100 or H200; nothing can be downloaded there):
#   bash benchmarks/gpu_check.sh [--out DIR] [--steps LIST] [--deadline S] [--test-paths "DIRS"]
#                                [--no-build] [--wheels DIR] [--skip-done] [--dry-run]
# Steps (--steps, comma-separated, in this order; default: all of them):
#   tests    the GPU-only tests with Triton compiled for real (TRITON_INTERPRET unset): every
#            test whose id names cuda (compiled Triton kernels, CUDA graphs of the encoder
#            segment and of the quantized and bf16 decode step, int4 / fp8 / int8 on CUDA,
#            the native CUDA preprocess kernels), slow ones included; --test-paths narrows it;
#            each test's outcome is logged as it happens, so with --skip-done a run cut off
#            by its limit goes on with the tests it had not finished;
#   decode   `vlv bench --preset paper --suites decode`: bf16 and int4 at batch 1 (ms/token,
#            tokens/s, % of the bandwidth bound, agreement) beside HF fp32, and bf16 under
#            inductor's CUDA graphs instead of the captured token steps (an A/B; its
#            kernels are the bf16 step's, already built); each row reaches the step's JSON
#            as it is measured, so a step cut off by its limit keeps the rows before;
#   e2e      a 300-token 4-beam caption at batch 1 in bf16 (and, after the encoder step and
#            the bf16 memory step, with an int4 decoder), beside HF generate in fp32;
#   encoder  the encoder to the bottleneck at batch 1, 8 and 64 beside the eager fp32 encoder,
#            8 images per forward (the engine's default is 2 at 768 px, for memory);
#   memory   max allocated (and reserved) while captioning batch 8 (300 tokens, 4 beams), bf16
#            and int4, with the engine's defaults;
#            (then, under `decode`, int8 weight-only at batch 1 in a step of its own: its
#            compile tunes every reduction, minutes, and must not cost the rows above;)
#   batch    decode at batch 8 and 64 in bf16;
#   unet     an SD-2.1-base UNet step at 512 px with CFG (batch 2, fp16) on TensorRT (else
#            torch.compile) beside eager, a 50-step reconstruction, native preprocessing.
# Then a table of the H100 targets against what was measured (the H200 is the same chip
# with faster memory: its bandwidth bound is measured, not assumed).
#
# Environment. Nothing is downloaded. Either the environment holds `pip install -e ".[dev]"`
# with a CUDA torch, or the source tree runs as it is: wheels carried in --wheels DIR
# (default .whl; transformers, diffusers, torchao, ...) are installed with --no-index into a
# folder under /tmp and put on PYTHONPATH with the repository root
# (`bash benchmarks/gpu_wheels.sh` gathers them where the package registry is reachable).
# Time: the steps' limits add up to ~27 minutes; the whole check ends within --deadline S
# seconds (default 1140: under 20 minutes). Each step gets what is left, in the order above
# (most wanted first), and a step that would get under 40 s is skipped and says so. A
# 15-minute lease (~1 minute to start) fits ~780 s of checks, but one command may run 10
# minutes: run `--deadline 560 --skip-done` twice. --skip-done skips the steps that
# finished in an earlier run into the same --out (each writes OUT/STEP.done), so the
# second run goes on where the first stopped; the summary covers both.
# --dry-run runs the same steps on the CPU with the nano preset (the CUDA tests skip):
# a check of this script, not of the GPU.
set -uo pipefail

OUT="gpu_check_out"
DRY=0
STEPS="tests,decode,e2e,encoder,memory,batch,unet"
DEADLINE=1140  # 19 minutes: the whole check stays under 20 by default
WHEELS=".whl"
TEST_PATHS="tests"
BUILD_NATIVE=1
SKIP_DONE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --deadline) DEADLINE="$2"; shift 2 ;;
    --test-paths) TEST_PATHS="$2"; shift 2 ;;
    --no-build) BUILD_NATIVE=0; shift ;;
    --skip-done) SKIP_DONE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR, --steps LIST, --deadline S, --wheels DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
ROOT="$PWD"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
unset TRITON_INTERPRET VLV_TRITON_ON_CPU  # real Triton compilation on the GPU
export PYTHONUNBUFFERED=1
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# Environment --------------------------------------------------------------------
if ! "$PY" -c "import vlv_engine, torchao" 2>/dev/null; then
  SITE="${TMPDIR:-/tmp}/vlv_gpu_site"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || { echo "gpu_check.sh: installing the carried wheels in $WHEELS failed" >&2; exit 2; }
  fi
  mkdir -p "$SITE"
  ln -sfn "$ROOT/training" "$SITE/vlv_training"  # the training package's installed name
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import vlv_engine, vlv_training, pytest, torchao, transformers, diffusers" 2>"$OUT/import.err"; then
  echo "gpu_check.sh: vlv_engine and its dev extra do not import here (install '.[dev]', or carry wheels in $WHEELS):" >&2
  tail -n 3 "$OUT/import.err" >&2
  exit 2
fi
VLV=("$PY" -m vlv_engine.cli)
# The native CUDA preprocessing kernels, when this tree was not installed with them: build
# them in place (cmake, ninja, nvcc and nanobind are all there is to it; nothing downloaded;
# --no-build skips this, and their test then fails saying they are not built).
if [ "$DRY" = 0 ] && [ "$BUILD_NATIVE" = 1 ] && ! "$PY" -c "import vlv_engine.native._preprocess_cuda" 2>/dev/null && command -v nvcc >/dev/null \
    && command -v cmake >/dev/null; then
  t0=$SECONDS
  BUILD="${TMPDIR:-/tmp}/vlv_native_build"
  GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
  if timeout 240 cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DPython_EXECUTABLE="$(command -v "$PY")" -DVLV_NATIVE_CUDA=ON \
       -DCMAKE_CUDA_ARCHITECTURES=native > "$OUT/native_build.log" 2>&1 \
     && timeout 240 cmake --build "$BUILD" -j >> "$OUT/native_build.log" 2>&1; then
    find "$BUILD" -maxdepth 1 -name "_*.so" -exec cp {} "$ROOT/vlv_engine/native/" \;
    echo "gpu_check: built the native extension with its CUDA kernels in $((SECONDS - t0)) s"
  else
    echo "gpu_check: building the native CUDA kernels failed (their test will say so); last lines:"; tail -n 5 "$OUT/native_build.log"
  fi
fi
if [ "$DRY" = 0 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); this check needs a GPU (or --dry-run)" >&2
    exit 3
  fi
  DEVICE=cuda; PRESET=paper; TOKENS=300; DTOKENS=32; MARK="slow or not slow"; FAST=()
  INT4=int4_weight_only; INT8=int8_weight_only; BIG="8 64"; ENC="1 8 64"; ABROW=(inductor_graphs)
  L_TESTS=150; L_DECODE=200; L_INT8=240; L_ENCODER=80; L_E2E=150; L_MEMORY=150; L_BATCH=120; L_UNET=200
else  # CPU, nano, eager: checks the plumbing in a few minutes
  DEVICE=cpu; PRESET=nano; TOKENS=8; DTOKENS=8; MARK="not slow"; FAST=(--no-compile --encoder-backend eager)
  INT4=int4_cpu; INT8=int8_dynamic; BIG="2"; ENC="1 2"; ABROW=()
  L_TESTS=600; L_DECODE=600; L_INT8=600; L_ENCODER=600; L_E2E=600; L_MEMORY=600; L_BATCH=600; L_UNET=600
fi
"$PY" - <<'PY' | tee "$OUT/machine.txt"
import importlib, platform, torch
def v(name):
    try:
        return importlib.import_module(name).__version__
    except Exception as err:  # an optional package: say why it is missing
        return f"missing ({type(err).__name__})"
gpu = (f"{torch.cuda.get_device_name(0)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}, "
       f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)" if torch.cuda.is_available() else "no GPU (dry run)")
print(f"gpu_check: {gpu}; python {platform.python_version()}, torch {torch.__version__}, "
      + ", ".join(f"{n} {v(n)}" for n in ("triton", "transformers", "diffusers", "torchao", "onnxruntime", "tensorrt", "flash_attn")))
PY
date -u +"gpu_check: started %Y-%m-%d %H:%M UTC" | tee -a "$OUT/machine.txt"

declare -A RC
done_before() {  # done_before NAME: with --skip-done, whether NAME finished in an earlier run into $OUT
  [ "$SKIP_DONE" = 1 ] && [ -f "$OUT/$1.done" ] || return 1
  echo "== $1: done in an earlier run (--skip-done; $OUT/$1.done)"; RC[$1]=done
}
fit() {  # fit LIMIT -> the step's limit within the deadline (0: skip it)
  local limit="$1" left
  [ "$DEADLINE" -gt 0 ] || { echo "$limit"; return; }
  left=$((DEADLINE - SECONDS - 20))  # the summary's time
  [ "$left" -lt 40 ] && { echo 0; return; }
  [ "$left" -lt "$limit" ] && echo "$left" || echo "$limit"
}
bench() {  # bench NAME LIMIT ARGS...: one `vlv bench` run, its table on stdout, its JSON under $OUT/NAME
  local name="$1" limit; limit=$(fit "$2"); shift 2
  local t0=$SECONDS
  done_before "$name" && return
  rm -f "$OUT/$name.done"
  if [ "$limit" = 0 ]; then echo "== $name: skipped (deadline of ${DEADLINE}s)"; RC[$name]=skipped; return; fi
  echo "== $name: vlv bench --preset $PRESET $* (limit ${limit}s)"
  timeout "$limit" "${VLV[@]}" bench --preset "$PRESET" --device "$DEVICE" --out "$OUT/$name" \
    --time-limit $((limit * 2 / 3)) "$@" "${FAST[@]}" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  RC[$name]=$?
  cat "$OUT/$name.txt"
  # Done: exited 0 with no suite skipped for time (a suite the bench skips for its own
  # reason, e.g. no TensorRT, stays skipped on a rerun).
  [ "${RC[$name]}" = 0 ] && "$PY" -c "import json, sys; s = json.load(open(sys.argv[1]))['skipped']
sys.exit(any('time limit' in why for why in s.values()))" "$OUT/$name/bench_$PRESET.json" 2>/dev/null \
    && touch "$OUT/$name.done"
  [ "${RC[$name]}" = 0 ] || { echo "-- $name: exit ${RC[$name]} (124: time limit); last lines of its log:"; tail -n 8 "$OUT/$name.err"; }
  echo "-- $name: $((SECONDS - t0)) s"
}

L_TESTS=$(fit "$L_TESTS")
if want tests && ! done_before tests && [ "$L_TESTS" -gt 0 ]; then
  rm -f "$OUT/tests.done"
  # Each run keeps its own verbose log (each test's outcome as it happens): a run cut off
  # by its limit loses nothing, and with --skip-done the next run leaves out what earlier
  # runs finished (benchmarks/gpu_check_tests.py).
  TESTS_PY="$ROOT/benchmarks/gpu_check_tests.py"
  [ "$SKIP_DONE" = 1 ] || rm -f "$OUT"/gpu_tests.*.log "$OUT"/gpu_tests.*.rc
  N=$("$PY" "$TESTS_PY" next "$OUT")
  DESELECT=()
  while IFS= read -r id; do [ -n "$id" ] && DESELECT+=(--deselect "$id"); done < <("$PY" "$TESTS_PY" deselect "$OUT")
  echo "== tests: pytest -k cuda -m '$MARK' (limit ${L_TESTS}s; run $N, $(( ${#DESELECT[@]} / 2 )) finished earlier)"
  t0=$SECONDS
  # A module whose optional imports (the service, Ray) are missing there must not stop the rest.
  PER_TEST=(); "$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 120)
  timeout "$L_TESTS" "$PY" -m pytest $TEST_PATHS -v --tb=short -p no:cacheprovider -m "$MARK" -k cuda -rs \
    --continue-on-collection-errors "${PER_TEST[@]}" "${DESELECT[@]}" > "$OUT/gpu_tests.$N.log" 2>&1
  RC[tests]=$?
  echo "${RC[tests]}" > "$OUT/gpu_tests.$N.rc"
  case "${RC[tests]}" in 0|1|5) touch "$OUT/tests.done" ;; esac  # finished (1: some failed; 5: none left), not cut off
  grep -E " (FAILED|ERROR)( |$)|^(FAILED|ERROR) " "$OUT/gpu_tests.$N.log" | tail -n 20
  tail -n 3 "$OUT/gpu_tests.$N.log"
  echo "-- tests: $((SECONDS - t0)) s"
fi
want decode && bench decode "$L_DECODE" --suites decode --batch-sizes 1 --new-tokens "$DTOKENS" --repeats 2 \
  --decode-schemes "$INT4" "${ABROW[@]}"
want e2e && bench e2e "$L_E2E" --suites e2e --e2e-batch-sizes 1 --batch-sizes 1 --new-tokens "$TOKENS" \
  --repeats 2 --latency-repeats 2
want encoder && bench encoder "$L_ENCODER" --suites encoder --batch-sizes $ENC --repeats 5 --encoder-batch-size 8
# bf16 memory before the int4 caption: a 15-minute lease reaches one of them, and the bf16
# caption path's 10 GB is the closer call (9.1 GB estimated: python -m vlv_engine.bench.memory_estimate).
want memory && bench memory "$L_MEMORY" --suites memory --memory-batch 8 --new-tokens "$TOKENS"
want decode && bench decode_int8 "$L_INT8" --suites decode --batch-sizes 1 --new-tokens "$DTOKENS" --repeats 2 \
  --quantize "$INT8"
want e2e && bench e2e_int4 "$L_E2E" --suites e2e --e2e-batch-sizes 1 --batch-sizes 1 --new-tokens "$TOKENS" \
  --repeats 2 --latency-repeats 2 --quantize "$INT4"
want memory && bench memory_int4 "$L_MEMORY" --suites memory --memory-batch 8 --new-tokens "$TOKENS" --quantize "$INT4"
want batch && bench batch "$L_BATCH" --suites decode --batch-sizes $BIG --new-tokens "$DTOKENS" --repeats 2
want unet && bench unet "$L_UNET" --suites unet preprocess --batch-sizes 2 32 --repeats 5

echo "== summary"
"$PY" - "$OUT" "$PRESET" "${RC[tests]:-skip}" "$ROOT" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

out, preset, tests_rc = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def load(name):
    p = out / name / f"bench_{preset}.json"
    return json.loads(p.read_text()) if p.exists() else {"results": [], "machine": {}}

runs = {n: load(n) for n in ("decode", "decode_int8", "encoder", "e2e", "e2e_int4", "memory", "memory_int4", "batch", "unet")}

def pick(run, suite, metric, batch, path=None, key="fast"):
    for r in runs[run]["results"]:
        if (r["suite"], r["metric"], r["batch"]) == (suite, metric, batch) and \
                (path is None or r["extra"].get("path", "").startswith(path)):
            return r[key] if key in ("fast", "reference") else r["extra"].get(key)
    return None

def quant_note(run, path):  # a quantized decode row: its bound and its agreement with the reference
    return (f"{pick(run, 'decode', 'ms/token', 1, path, 'bw_bound_pct')} % of bound; teacher-forced top-1 "
            f"{pick(run, 'decode', 'ms/token', 1, path, 'tf_top1')}, logit SQNR "
            f"{pick(run, 'decode', 'ms/token', 1, path, 'logit_sqnr_db')} dB")

def g(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)

targets = [
    ("decode batch 1 bf16 (tok/s)", pick("decode", "decode", "tokens/s", 1, "fast ("), ">=", 400,
     f"{pick('decode', 'decode', 'ms/token', 1, 'fast (', 'bw_bound_pct')} % of bound"
     + (f", GPU kernels {k} ms/token" if (k := pick('decode', 'decode', 'ms/token', 1, 'fast (', 'gpu_kernel_ms'))
        is not None else "")
     + (f", {n} GPU ops/token" if (n := pick('decode', 'decode', 'ms/token', 1, 'fast (', 'gpu_ops'))
        is not None else "")),
    ("decode batch 1 bf16, inductor's CUDA graphs (tok/s)", pick("decode", "decode", "tokens/s", 1, "fast, inductor"),
     ">=", None, "A/B: the same step behind dynamo's guards"),
    ("decode batch 1 int8 (tok/s)", pick("decode_int8", "decode", "tokens/s", 1, "fast ("), ">=", 700,
     quant_note("decode_int8", "fast (")),
    ("decode batch 1 int4 (tok/s)", pick("decode", "decode", "tokens/s", 1, "int4"), ">=", 1000,
     quant_note("decode", "int4")),
    ("decode batch 8 bf16 (tok/s)", pick("batch", "decode", "tokens/s", 8), ">=", None, ""),
    ("decode batch 64 bf16 (tok/s)", pick("batch", "decode", "tokens/s", 64), ">=", None, ""),
    ("caption 300 tok 4 beams bf16 (s)", pick("e2e", "e2e", "latency p50", 1), "<=", 0.8,
     f"HF fp32 {g(pick('e2e', 'e2e', 'latency p50', 1, key='reference'))}"),
    ("caption 300 tok 4 beams int4 (s)", pick("e2e_int4", "e2e", "latency p50", 1), "<=", 0.35,
     f"HF fp32 {g(pick('e2e_int4', 'e2e', 'latency p50', 1, key='reference'))}"),
    ("encoder batch 1 (ms)", pick("encoder", "encoder", "latency p50", 1), "<=", 5,
     f"eager fp32 {g(pick('encoder', 'encoder', 'latency p50', 1, key='reference'))}"),
    ("encoder batch 64 (img/s)", pick("encoder", "encoder", "throughput", 64), ">=", 300,
     f"eager fp32 {g(pick('encoder', 'encoder', 'throughput', 64, key='reference'))}"),
    ("caption path bf16 batch 8, max alloc (GB)", pick("memory", "memory", "max allocated captioning", 8), "<=", 10,
     f"max reserved {pick('memory', 'memory', 'max allocated captioning', 8, key='max_reserved_GB')}"),
    ("caption path int4 batch 8, max alloc (GB)", pick("memory_int4", "memory", "max allocated captioning", 8), "<=", 6,
     f"max reserved {pick('memory_int4', 'memory', 'max allocated captioning', 8, key='max_reserved_GB')}"),
    ("UNet step 512 px with CFG, batch 2 (ms)", pick("unet", "unet", "UNet call p50", 2), "<=", 6, ""),
    ("50-step 512 px reconstruction (s)", pick("unet", "unet", "reconstruction, 50 steps", 1), "<=", 0.4, ""),
]
bw = next((r["machine"].get("memory_bandwidth_GBps") for r in runs.values() if r["machine"]), None)
print(f"copy bandwidth measured: {bw} GB/s\n")
sys.path.insert(0, str(Path(sys.argv[4]) / "benchmarks"))
from gpu_check_tests import summarize

tests = summarize(out)
print("| check | measured | target | met | beside it |\n| --- | --- | --- | --- | --- |")
if tests is not None:
    finished = (out / "tests.done").exists()
    notes = [", ".join(tests.failed[:6]) + (" ..." if len(tests.failed) > 6 else "")] if tests.failed else []
    notes += [f"crashed the run: {name}" for name in tests.crashed_in]
    if not finished and tests.cut_off_in:
        notes.append(f"cut off by the time limit in {tests.cut_off_in}")
    notes.append(f"{tests.not_collected} module(s) not collected; {tests.runs} run(s)")
    ok = finished and not tests.failed and not tests.crashed_in and tests.passed
    print(f"| GPU tests | {tests.passed} passed, {len(tests.failed)} failed, {tests.skipped} skipped"
          f"{'' if finished else ' (not all run)'} | all pass | {'yes' if ok else 'NO'} | {'; '.join(notes)} |")
elif tests_rc != "skip":
    print(f"| GPU tests | no log (exit {tests_rc}) | all pass | NO | |")
for name, value, op, bound, note in targets:
    if value is None:
        print(f"| {name} | not measured | {op + ' ' + str(bound) if bound is not None else '(no target)'} | - | |")
        continue
    met = "-" if bound is None else ("yes" if (value >= bound if op == ">=" else value <= bound) else "NO")
    print(f"| {name} | {value:.4g} | {op} {bound if bound is not None else '(no target)'} | {met} | {note} |")
PY
