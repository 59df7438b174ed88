#!/usr/bin/env bash
# The seed prototype's experiment, side by side: the seed testbed federated (uncompressed,
# 3-bit quantised and top-k compressed), the same nodes training alone, and one model
# trained centrally on all their data with the same total number of samples. Prints the
# summary table.
#
#   bench/seed-experiment.sh [OUT_DIR] [VARIANT ...]     variants: fed quant topk solo central
#
# Takes about 10-15 minutes per variant on a 2-core machine; run it on an idle machine,
# since round timings are part of the figures.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "${1:-$repo/runs/seed-experiment}")
shift || true
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(fed quant topk solo central)

data=$(realpath "$repo/../shared/data")
node="$repo/target/release/dfl-node"
bash "$repo/scripts/setup-libtorch.sh" >/dev/null
cargo build --release --locked -p edgesync-node --manifest-path "$repo/Cargo.toml"
mkdir -p "$out"

# The example manifest with absolute data paths and one setting changed by sed.
manifest() {
  sed -e "s#\.\./\.\./shared/data#$data#" -e "$1" "$repo/examples/seed-testbed.yaml" \
    > "$out/$2.yaml"
  echo "$out/$2.yaml"
}

for variant in "${variants[@]}"; do
  echo "== $variant"
  rm -rf "${out:?}/$variant"
  case "$variant" in
    fed) "$node" local -f "$(manifest 's/^x//' fed)" --report-dir "$out/fed" ;;
    quant)
      "$node" local --report-dir "$out/quant" -f "$(manifest \
        "s/      kind: none$/      kind: quantized\n      bits: 3/" quant)" ;;
    topk)
      topk_edit="s/      kind: none$/      kind: topK\n      fraction: 0.1/"
      topk_edit+="; s/consensusStep: 1.0/consensusStep: 0.5/"
      "$node" local --report-dir "$out/topk" -f "$(manifest "$topk_edit" topk)" ;;
    solo) "$node" local -f "$(manifest 's/kind: fullMesh/kind: isolated/' solo)" \
        --report-dir "$out/solo" ;;
    central)
      # Four nodes x 100 rounds x 20 steps x 128 images = 1,024,000 samples = 8,000 steps.
      mkdir -p "$out/central"
      "$node" train --data "$data/cifar10" --rounds 80 --local-steps 100 --batch-size 128 \
        --lr 0.002 --warmup-steps 100 --eval-every 5 --report "$out/central/train.json" \
        | tee "$out/central/train.log" ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
done
python3 "$repo/bench/summarize.py" "$out"
