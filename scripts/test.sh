#!/usr/bin/env bash
# The project's test command: provisions libtorch if needed, then format, lint and test, and
# finally watches a live local federation and the operator through a real Prometheus,
# checking every query of the Grafana dashboard against it (installs Prometheus from
# Debian's packages when missing). Tests read real data from ../shared/data beside the
# checkout. The network fault tests build two hosts from network namespaces, so they need
# root, iproute2 and iptables; the latter two are installed here when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup-libtorch.sh
if ! command -v iptables >/dev/null || ! command -v tc >/dev/null; then
    sudo=""
    [[ "$(id -u)" -ne 0 ]] && sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        iproute2 iptables >/dev/null
fi
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
cargo test --release --workspace --locked
bash scripts/check-prometheus.sh
