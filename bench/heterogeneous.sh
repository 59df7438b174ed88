#!/usr/bin/env bash
# Jetson- and Akida-class nodes in one federation, with and without cross-architecture
# alignment: the seed testbed (Akida node on MNIST, sharing the convolutional features) and
# the grey-CIFAR testbed (Akida node on CIFAR-10 in grey at 28x28, sharing every layer but
# batch norm's running statistics), each also run with `crossArchitecture: none`, where the
# Akida node learns alone and the Jetsons only with each other. Prints the Akida node's
# accuracy and the Jetson nodes' mean and minimum at the last round.
#
#   bench/heterogeneous.sh [OUT_DIR] [ROUNDS] [VARIANT ...]
#     variants: gray-all gray-none seed-features seed-none (default: all four)
#
# Takes 10-20 minutes per variant at 60 rounds on a 2-core machine.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "${1:-$repo/runs/heterogeneous}")
rounds="${2:-100}"
shift 2 || shift $#
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(gray-all gray-none seed-features seed-none)

data=$(realpath "$repo/../shared/data")
node="$repo/target/release/dfl-node"
bash "$repo/scripts/setup-libtorch.sh" >/dev/null
cargo build --release --locked -p edgesync-node --manifest-path "$repo/Cargo.toml"
mkdir -p "$out"

# An example manifest with absolute data paths, the round count, and what is shared.
manifest() {
  local example="$1" shared="$2" name="$3"
  sed -e "s#\.\./\.\./shared/data#$data#" -e "s/^  rounds: .*/  rounds: $rounds/" \
    -e "/crossArchitecture:/d" \
    -e "s/^    consensusStep: 1.0$/    consensusStep: 1.0\n    crossArchitecture: $shared/" \
    "$repo/examples/$example.yaml" > "$out/$name.yaml"
  echo "$out/$name.yaml"
}

for variant in "${variants[@]}"; do
  echo "== $variant"
  rm -rf "${out:?}/$variant"
  case "$variant" in
    gray-all) file=$(manifest gray-cifar-testbed all "$variant") ;;
    gray-none) file=$(manifest gray-cifar-testbed none "$variant") ;;
    seed-features) file=$(manifest seed-testbed features "$variant") ;;
    seed-none) file=$(manifest seed-testbed none "$variant") ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  "$node" local -f "$file" --report-dir "$out/$variant"
done

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
print(f"{'variant':<14} {'round':>5} {'akida-1':>8} {'jetsons mean/min':>17}")
for variant in ["gray-all", "gray-none", "seed-features", "seed-none"]:
    path = os.path.join(out, variant, "report.json")
    if not os.path.exists(path):
        continue
    rows = [r for r in json.load(open(path))["rounds"] if r["test_accuracy"] is not None]
    last = max(r["round"] for r in rows)
    final = {r["node"]: r["test_accuracy"] for r in rows if r["round"] == last}
    jetsons = [a for n, a in final.items() if n.startswith("jetson")]
    print(f"{variant:<14} {last:>5} {100 * final['akida-1']:>8.1f} "
          f"{100 * sum(jetsons) / len(jetsons):>10.1f}/{100 * min(jetsons):.1f}")
PY
