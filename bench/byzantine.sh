#!/usr/bin/env bash
# One of five nodes misbehaving: the seed testbed with jetson-4 publishing corrupted models
# (it trains normally), under plain Metropolis-Hastings averaging and under clipped gossip,
# beside clipped gossip with no misbehaving node. Prints the accuracy of the honest Jetson
# nodes; the fault-free plain-averaging run is bench/seed-experiment.sh's `fed` variant.
#
#   bench/byzantine.sh [OUT_DIR] [KIND] [SCALE] [VARIANT ...]
#     KIND: scaled (default), signFlip or random; SCALE: default 10
#     variants: plain clipped clean (default: all three)
#
# Takes about 15 minutes per variant on a 2-core machine.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "${1:-$repo/runs/byzantine}")
kind="${2:-scaled}"
scale="${3:-10}"
shift 3 || shift $#
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(plain clipped clean)

data=$(realpath "$repo/../shared/data")
node="$repo/target/release/dfl-node"
bash "$repo/scripts/setup-libtorch.sh" >/dev/null
cargo build --release --locked -p edgesync-node --manifest-path "$repo/Cargo.toml"
mkdir -p "$out"

# The example manifest with absolute data paths, the aggregation rule, and jetson-4
# misbehaving when asked.
manifest() {
  local rule="$1" attack="$2" name="$3"
  python3 - "$repo/examples/seed-testbed.yaml" "$data" "$rule" "$attack" "$kind" "$scale" \
    > "$out/$name.yaml" <<'PY'
import sys
path, data, rule, attack, kind, scale = sys.argv[1:]
docs = open(path).read().replace("../../shared/data", data).split("\n---\n")
for i, doc in enumerate(docs):
    if "kind: FederationRound" in doc:
        doc = doc.replace("rule: metropolisHastings", f"rule: {rule}")
    if attack == "yes" and "name: jetson-4\n" in doc:
        doc = doc.replace("  hardware: jetson\n", "  hardware: jetson\n"
                          f"  misbehaviour: {{kind: {kind}, scale: {scale}}}\n")
    docs[i] = doc
print("\n---\n".join(docs))
PY
  echo "$out/$name.yaml"
}

for variant in "${variants[@]}"; do
  echo "== $variant"
  rm -rf "${out:?}/$variant"
  case "$variant" in
    plain) file=$(manifest metropolisHastings yes plain) ;;
    clipped) file=$(manifest clippedGossip yes clipped) ;;
    clean) file=$(manifest clippedGossip no clean) ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  "$node" local -f "$file" --report-dir "$out/$variant"
done

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
honest = ["jetson-1", "jetson-2", "jetson-3"]
print(f"{'variant':<8} {'r25 mean/min':>14} {'r50 mean/min':>14} {'r100 mean/min':>14}")
for variant in ["plain", "clipped", "clean"]:
    path = os.path.join(out, variant, "report.json")
    if not os.path.exists(path):
        continue
    rows = json.load(open(path))["rounds"]
    cells = []
    for r in (25, 50, 100):
        accs = []
        for n in honest:
            seen = [x for x in rows if x["node"] == n and x["round"] <= r
                    and x["test_accuracy"] is not None]
            if seen:
                accs.append(max(seen, key=lambda x: x["round"])["test_accuracy"])
        cells.append(f"{100 * sum(accs) / len(accs):5.1f}/{100 * min(accs):5.1f}"
                     if accs else "-")
    print(f"{variant:<8} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}")
PY
