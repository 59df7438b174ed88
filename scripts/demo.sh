#!/usr/bin/env bash
# The main job from a fresh clone: provision libtorch, build, and run the seed testbed
# federation (four Jetson-class nodes on CIFAR-10, one Akida-class node on MNIST) as local
# processes talking libp2p on 127.0.0.1. Pass another manifest to run that instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

manifest="${1:-examples/seed-testbed.yaml}"
bash scripts/setup-libtorch.sh
cargo build --release --locked -p edgesync-node
exec ./target/release/dfl-node local -f "$manifest" "${@:2}"
