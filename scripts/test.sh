#!/usr/bin/env bash
# The project's test command: provisions libtorch if needed, then format, lint and test.
# Tests read real data from ../shared/data beside the checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup-libtorch.sh
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
cargo test --release --workspace --locked
