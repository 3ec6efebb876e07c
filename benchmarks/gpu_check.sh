#!/usr/bin/env bash
# One command for a CUDA machine (an H100; nothing can be downloaded there):
#   bash benchmarks/gpu_check.sh [--out DIR] [--dry-run]
# 1. the GPU-only tests, with Triton compiled for real (TRITON_INTERPRET unset): every test
#    whose id names cuda across tests/ (compiled Triton kernels, flash attention, CUDA
#    graphs of the quantized and bf16 decode step, int4 / fp8 / int8 on CUDA, the native
#    CUDA preprocess kernels), slow ones included;
# 2. `vlv bench --preset paper` on the GPU: encoder (batch 1..64), decode (bf16 at batch
#    1..64, int8 and int4 at batch 1), e2e at 300 tokens and 4 beams in bf16 and with an
#    int4 decoder, peak memory; each beside the fp32 reference in the same run;
# 3. the diffusion side: `vlv bench --preset paper --suites unet preprocess`: an SD-2.1-base
#    UNet step at 512 px with CFG (batch 2, fp16) on TensorRT (else torch.compile) beside
#    eager, a 50-step reconstruction, and the native preprocessing (CUDA kernels if built);
# 4. a table of the caption and diffusion issues' H100 targets against the measured numbers.
# It installs nothing (the environment must already hold `pip install -e ".[dev]"`
# with a CUDA torch) and stays within ~20 minutes (each step has a time limit).
# --dry-run runs the same steps on the CPU with the nano preset (the CUDA tests skip):
# a check of this script, not of the GPU.
set -uo pipefail

OUT="gpu_check_out"
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
mkdir -p "$OUT"
unset TRITON_INTERPRET VLV_TRITON_ON_CPU  # real Triton compilation on the GPU

if ! "$PY" -c "import vlv_engine, pytest, torchao" 2>/dev/null; then
  echo "gpu_check.sh: vlv_engine with its dev extra is not installed here (pip install -e '.[dev]'); nothing is installed by this script" >&2
  exit 2
fi
if [ "$DRY" = 0 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); this check needs a GPU (or --dry-run)" >&2
    exit 3
  fi
  DEVICE=cuda; PRESET=paper; BATCHES="1 8 64"; TOKENS=300; MARK="slow or not slow"; FAST=()
  TESTS_LIMIT=360; BENCH_LIMIT=420; BENCH4_LIMIT=210; UNET_LIMIT=210  # 20 minutes in all
else  # CPU, nano, eager: checks the plumbing in a few minutes
  DEVICE=cpu; PRESET=nano; BATCHES="1 2"; TOKENS=8; MARK="not slow"; FAST=(--no-compile --encoder-backend eager)
  TESTS_LIMIT=600; BENCH_LIMIT=600; BENCH4_LIMIT=600; UNET_LIMIT=600
fi
"$PY" - <<'PY'
import torch, platform
print(f"gpu_check: torch {torch.__version__}, python {platform.python_version()}, "
      + (f"{torch.cuda.get_device_name(0)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})"
         if torch.cuda.is_available() else "no GPU (dry run)"))
PY

# 1. GPU tests ----------------------------------------------------------------
echo "== 1. GPU tests (pytest -k cuda, -m '$MARK', limit ${TESTS_LIMIT}s)"
timeout "$TESTS_LIMIT" "$PY" -m pytest tests -q -p no:cacheprovider -m "$MARK" -k cuda -rs \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
TESTS_RC=${PIPESTATUS[0]}

# 2. paper benchmarks --------------------------------------------------------
echo "== 2. vlv bench --preset $PRESET on $DEVICE (limits ${BENCH_LIMIT}s and ${BENCH4_LIMIT}s)"
if [ "$DEVICE" = cuda ]; then INT4=int4_weight_only; INT8=int8_weight_only; else INT4=int4_cpu; INT8=int8_dynamic; fi
timeout "$BENCH_LIMIT" vlv bench --preset "$PRESET" --device "$DEVICE" --suites encoder decode e2e memory \
  --batch-sizes $BATCHES --e2e-batch-sizes 1 8 --new-tokens "$TOKENS" --repeats 2 --latency-repeats 3 --memory-batch 8 \
  --decode-schemes "$INT8" "$INT4" --time-limit $((BENCH_LIMIT - 150)) --out "$OUT/bf16" "${FAST[@]}" \
  > "$OUT/bench_bf16.txt" 2> "$OUT/bench_bf16.err"
BENCH_RC=$?
cat "$OUT/bench_bf16.txt"; [ "$BENCH_RC" = 0 ] || tail -n 5 "$OUT/bench_bf16.err"
timeout "$BENCH4_LIMIT" vlv bench --preset "$PRESET" --device "$DEVICE" --suites e2e memory --batch-sizes 1 \
  --new-tokens "$TOKENS" --repeats 2 --latency-repeats 3 --memory-batch 8 --quantize "$INT4" \
  --time-limit $((BENCH4_LIMIT - 150)) --out "$OUT/int4" "${FAST[@]}" > "$OUT/bench_int4.txt" 2> "$OUT/bench_int4.err"
BENCH4_RC=$?
cat "$OUT/bench_int4.txt"; [ "$BENCH4_RC" = 0 ] || tail -n 5 "$OUT/bench_int4.err"

# 3. diffusion: UNet backends and preprocessing ----------------------------------
echo "== 3. vlv bench --preset $PRESET --suites unet preprocess on $DEVICE (limit ${UNET_LIMIT}s)"
timeout "$UNET_LIMIT" vlv bench --preset "$PRESET" --device "$DEVICE" --suites unet preprocess --batch-sizes 2 32 \
  --repeats 5 --time-limit $((UNET_LIMIT - 60)) --out "$OUT/unet" > "$OUT/bench_unet.txt" 2> "$OUT/bench_unet.err"
UNET_RC=$?
cat "$OUT/bench_unet.txt"; [ "$UNET_RC" = 0 ] || tail -n 5 "$OUT/bench_unet.err"

# 4. targets -----------------------------------------------------------------
echo "== 4. summary"
"$PY" - "$OUT" "$TESTS_RC" "$BENCH_RC" "$BENCH4_RC" "$PRESET" "$UNET_RC" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, tests_rc, bench_rc, bench4_rc, preset, unet_rc = Path(sys.argv[1]), *map(int, sys.argv[2:5]), sys.argv[5], int(sys.argv[6])

def load(name):
    p = out / name / f"bench_{preset}.json"
    return json.loads(p.read_text())["results"] if p.exists() else []

bf16, int4, unet = load("bf16"), load("int4"), load("unet")

def pick(rows, suite, metric, batch, path=None):
    for r in rows:
        if (r["suite"], r["metric"], r["batch"]) == (suite, metric, batch) and \
                (path is None or r["extra"].get("path", "").startswith(path)):
            return r["fast"]
    return None

GB = 1.0
targets = [
    ("decode batch 1 bf16 (tok/s)", pick(bf16, "decode", "tokens/s", 1, "fast"), ">=", 400),
    ("decode batch 1 int8 (tok/s)", pick(bf16, "decode", "tokens/s", 1, "int8"), ">=", 700),
    ("decode batch 1 int4 (tok/s)", pick(bf16, "decode", "tokens/s", 1, "int4"), ">=", 1000),
    ("caption 300 tok 4 beams bf16 (s)", pick(bf16, "e2e", "latency p50", 1), "<=", 0.8),
    ("caption 300 tok 4 beams int4 (s)", pick(int4, "e2e", "latency p50", 1), "<=", 0.35),
    ("encoder batch 1 (ms)", pick(bf16, "encoder", "latency p50", 1), "<=", 5),
    ("encoder batch 64 (img/s)", pick(bf16, "encoder", "throughput", 64), ">=", 300),
    ("caption path bf16 batch 8, max alloc (GB)", pick(bf16, "memory", "max allocated captioning", 8), "<=", 10),
    ("caption path int4 batch 8, max alloc (GB)", pick(int4, "memory", "max allocated captioning", 8), "<=", 6),
    ("UNet step 512 px with CFG, batch 2 (ms)", pick(unet, "unet", "UNet call p50", 2), "<=", 6),
    ("50-step 512 px reconstruction (s)", pick(unet, "unet", "reconstruction, 50 steps", 1), "<=", 0.4),
]
suite = {"tests": "-", "passed": 0, "failed": 0, "skipped": 0}
xml = out / "gpu_tests.xml"
if xml.exists():
    root = ET.parse(xml).getroot()
    ts = root if root.tag == "testsuite" else root.find("testsuite")
    n, f, e, s = (int(ts.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    suite = {"tests": n, "passed": n - f - e - s, "failed": f + e, "skipped": s}
print(f"| check | measured | target | met |\n| --- | --- | --- | --- |")
print(f"| GPU tests (rc {tests_rc}) | {suite['passed']} passed, {suite['failed']} failed, {suite['skipped']} skipped "
      f"| all pass | {'yes' if tests_rc == 0 and suite['failed'] == 0 else 'NO'} |")
for name, value, op, bound in targets:
    if value is None:
        print(f"| {name} | not measured | {op} {bound} | NO |")
        continue
    met = value >= bound if op == ">=" else value <= bound
    print(f"| {name} | {value:.3g} | {op} {bound} | {'yes' if met else 'NO'} |")
print(f"bench exit codes: bf16 {bench_rc}, int4 {bench4_rc}, unet {unet_rc} (124: time limit); tables and JSON "
      f"in {out}/")
sys.exit(0 if tests_rc == 0 and bench_rc == 0 and bench4_rc == 0 and unet_rc == 0 else 1)
PY
