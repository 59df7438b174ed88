#!/usr/bin/env bash
# The fault report: four MNIST nodes in a ring across two hosts (network namespaces joined
# by veth), run three times with the same seed: fault-free on loopback; with the hosts cut
# apart for the second quarter of the run; and over a link losing 10% of packets each way,
# limited to 4 Mbit/s, with one node's updates held 1.5 s. Prints a Markdown table of
# rounds completed and final accuracy (RELIABILITY.md), and the consensus distance per
# round of the partition run.
#
#   bench/faults.sh [ROUNDS]      (default 40; about 10 minutes on a 2-core machine)
#
# Needs root, iproute2 and iptables, as the test suite does.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup-libtorch.sh" >/dev/null
cd "$repo"
EDGESYNC_FAULT_ROUNDS="${1:-40}" cargo test --release --locked -p edgesync-node \
    --test network_faults -- --ignored --exact fault_report --nocapture --test-threads 1
