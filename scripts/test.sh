#!/usr/bin/env bash
# The project's test command: provisions libtorch if needed, then format, lint and test, and
# finally watches a live local federation and the operator through a real Prometheus,
# checking every query of the Grafana dashboard against it (installs Prometheus from
# Debian's packages when missing). Tests read real data from ../shared/data beside the
# checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup-libtorch.sh
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
cargo test --release --workspace --locked
bash scripts/check-prometheus.sh
