#!/usr/bin/env bash
# Gather, on a machine with the package registry, the wheels `gpu_check.sh` needs on a GPU
# machine that cannot download (the lent H100/H200: Python 3.12, its own CUDA torch, Triton,
# numpy, tokenizers, huggingface-hub, pytest, cmake, nanobind... but transformers 5.17 and
# no diffusers or torchao):
#   bash benchmarks/gpu_wheels.sh [--out DIR] [--python 3.12]
# Into DIR (default .whl, which gpu_check.sh installs from with --no-index --no-deps): the
# versions this environment runs of transformers, diffusers and torchao, and what of their
# requirements that image lacks. Only binary wheels for CPython on x86-64 Linux, no
# dependencies resolved (pip would fetch a CUDA torch); the size is printed, since a device
# call carries at most 64 MiB of working tree.
set -euo pipefail
OUT=".whl"
PYV="3.12"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --python) PYV="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (use --out DIR, --python X.Y)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# The versions the tests ran with here (fall back to the newest the pins allow).
pins=$("$PY" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
wanted = {"transformers": "transformers>=5.23,<6", "diffusers": "diffusers>=0.42,<0.43", "torchao": "torchao>=0.18",
          # transformers checks regex's version at import; the image's may be older
          "regex": "regex>=2025.10.22",
          # per-test time limits in the tests step (pure Python)
          "pytest-timeout": "pytest-timeout>=2.3"}
for name, fallback in wanted.items():
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(fallback)
# diffusers' requirement the image lacks; from 9 on it needs lazy-importer, which it lacks too
print("importlib_metadata<9")
PY
)
mkdir -p "$OUT"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" $pins
# One version of each: two would stop the whole install there.
dupes=$(ls "$OUT"/*.whl | xargs -n1 basename | sed 's/-[0-9].*//' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "gpu_wheels.sh: more than one version of: $dupes (remove the older from $OUT)" >&2
  exit 1
fi
ls -1 "$OUT"
du -sh "$OUT"
