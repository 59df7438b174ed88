#!/usr/bin/env bash
# Compares the node's CPU training throughput for the Jetson-class CNN with PyTorch's Python
# API on the same model, step and thread count, and prints the ratio of the medians.
#
#   bench/throughput.sh [--threads N] [--steps N] [--warmup N] [--reps N] [--batch-size N]
#                       [--variants "fused:cl foreach:cl fused:nchw foreach:nchw"]
#
# PyTorch runs in every listed variant (AdamW implementation : memory format) and the ratio
# is taken against the fastest variant's median, so that the node is measured against
# PyTorch at its best on this machine rather than at its defaults. Runs alternate between
# Rust and PyTorch so that drift in the machine's speed affects both alike.
#
# PyTorch lives in a venv in .venv-bench/ (ignored by git). PyPI's Linux torch wheel is the
# CUDA build and pulls about 2.7 GB of NVIDIA packages; they are unused here but are what
# `pip install torch` gives, and the CPU kernels (oneDNN, MKL) are the ones libtorch has.
set -euo pipefail

TORCH_VERSION=2.13.0

threads=$(nproc)
steps=60
warmup=10
reps=3
batch=128
variants="fused:cl foreach:cl fused:nchw foreach:nchw"

while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --batch-size) batch=$2; shift 2 ;;
    --variants) variants=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Checked up front so that a typo fails before minutes of installing and measuring.
for variant in $variants; do
  case "$variant" in
    fused:cl|fused:nchw|foreach:cl|foreach:nchw|forloop:cl|forloop:nchw) ;;
    *) echo "bad variant $variant: expected fused|foreach|forloop : cl|nchw" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv-bench"
cache="${EDGESYNC_CACHE:-$HOME/.cache/edgesync}/wheels"
python="${PYTHON:-python3}"

# (a) PyTorch, installed once.
torch_ok() {
  "$venv/bin/python" - "$TORCH_VERSION" 2>/dev/null <<'EOF'
import sys
import numpy  # noqa: F401  torch warns and loses tensor<->array interop without it
import torch
sys.exit(torch.__version__.split("+")[0] != sys.argv[1])
EOF
}
if ! torch_ok; then
  echo "== installing torch==$TORCH_VERSION and numpy into $venv"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  # Given only --find-links, pip still downloaded the wheel from the index; naming the cached
  # file itself is what reuses it (the one setup-libtorch.sh fetched, if any).
  tag=$("$venv/bin/python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  wheel=$(ls "$cache"/torch-"$TORCH_VERSION"-"$tag"-"$tag"-*x86_64.whl 2>/dev/null \
    | head -n1 || true)
  "$venv/bin/python" -m pip install --progress-bar off --find-links "$cache" \
    "${wheel:-torch==$TORCH_VERSION}" numpy
  torch_ok || { echo "torch $TORCH_VERSION does not import from $venv" >&2; exit 1; }
fi
"$venv/bin/python" -c 'import torch
print("== torch", torch.__version__, "| CUDA available:", torch.cuda.is_available())'

# (b) The node's side.
echo "== building the Rust example"
(cd "$repo" && cargo build --release --quiet -p edgesync-node --example throughput)
rust_bin="${CARGO_TARGET_DIR:-$repo/target}/release/examples/throughput"

# Throughput figures mean little while other jobs compete for the cores.
load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" 'BEGIN { exit !(l > 0.5) }'; then
  echo "== WARNING: load average is $load: the machine is not idle, figures will be low/noisy"
fi

# (c) Alternating runs.
common=(--threads "$threads" --steps "$steps" --warmup "$warmup" --batch-size "$batch")
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== $reps repetitions, threads=$threads batch=$batch steps=$steps warmup=$warmup"
for rep in $(seq 1 "$reps"); do
  line=$("$rust_bin" "${common[@]}" --augment off)
  echo "[$rep] $line" | tee -a "$log"
  for variant in $variants; do
    adam=${variant%%:*}
    format=--channels-last
    [ "${variant#*:}" = cl ] || format=--no-channels-last
    line=$("$venv/bin/python" "$repo/bench/torch_throughput.py" "${common[@]}" \
      --adam "$adam" "$format")
    echo "[$rep] $line" | tee -a "$log"
  done
done

"$venv/bin/python" - "$log" <<'EOF'
import statistics
import sys

runs = {}
for line in open(sys.argv[1]):
    _, side, *fields = line.split()
    kv = dict(f.split("=", 1) for f in fields)
    if side == "rust":
        key = "rust"
    else:
        key = f"pytorch adam={kv['adam']} channels_last={kv['channels_last']}"
    runs.setdefault(key, []).append(float(kv["images_per_second"]))

print("== medians (images/s)")
medians = {key: statistics.median(values) for key, values in runs.items()}
for key, values in runs.items():
    each = " ".join(f"{v:.1f}" for v in values)
    print(f"{key:<40} median={medians[key]:8.1f}  runs: {each}")
best = max((k for k in medians if k != "rust"), key=medians.get)
print(f"fastest PyTorch variant: {best.removeprefix('pytorch ')}")
print(f"ratio rust/pytorch = {medians['rust'] / medians[best]:.2f}")
EOF
