#!/usr/bin/env bash
# Watches a small local federation through a real Prometheus: installs Prometheus (and
# promtool) from Debian, runs two MNIST nodes on loopback, scrapes them, and checks through
# Prometheus's HTTP API that the series arrive with federation and node labels and that the
# round moves. Stops everything it started and prints PASS or FAIL.
#
# Environment: EDGESYNC_MNIST (MNIST folder, default ../shared/data/mnist beside the
# checkout), PROMETHEUS_PORT (default 19090).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

federation=promcheck
port="${PROMETHEUS_PORT:-19090}"
mnist="$(cd "${EDGESYNC_MNIST:-../shared/data/mnist}" && pwd)"
work="$(mktemp -d)"
launcher_pid=""
prometheus_pid=""

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

cleanup() {
    # The launcher passes an interrupt on to its nodes, which finish their round and exit.
    if [[ -n "$launcher_pid" ]] && kill -0 "$launcher_pid" 2>/dev/null; then
        kill -INT "$launcher_pid" 2>/dev/null || true
        for _ in $(seq 1 300); do
            kill -0 "$launcher_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$launcher_pid" 2>/dev/null || true
    fi
    if [[ -n "$prometheus_pid" ]]; then
        kill -TERM "$prometheus_pid" 2>/dev/null || true
        wait "$prometheus_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    sudo=""
    [[ "$(id -u)" -ne 0 ]] && sudo=sudo
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends prometheus
fi
prometheus --version | head -1

cargo build --release -p edgesync-node
dfl_node="$PWD/target/release/dfl-node"

# Long enough that Prometheus scrapes every node many times while it trains.
cat >"$work/federation.yaml" <<EOF
apiVersion: edgesync.dev/v1alpha1
kind: FederationRound
metadata: {name: $federation}
spec:
  rounds: 80
  localSteps: 20
  batchSize: 32
  seed: 11
  optimizer: {kind: adam, learningRate: 0.002, clipGradNorm: 5.0}
  topology: {kind: fullMesh}
  exchange: {roundDeadlineSeconds: 10, compression: {kind: none}}
  partition: {kind: dirichlet, alpha: 0.2, minPerNode: 100}
  evaluation: {everyRounds: 5, testLimit: 600}
  nodeSelector: {matchLabels: {fed: $federation}}
EOF
for i in 0 1; do
    cat >>"$work/federation.yaml" <<EOF
---
apiVersion: edgesync.dev/v1alpha1
kind: DflNode
metadata: {name: node-$i, labels: {fed: $federation}}
spec:
  hardware: cpu
  model: akida-cnn
  dataset: {format: mnist, path: $mnist}
EOF
done

"$dfl_node" local -f "$work/federation.yaml" --report-dir "$work/run" --threads-per-node 1 \
    >"$work/launcher.out" 2>"$work/launcher.log" &
launcher_pid=$!

for _ in $(seq 1 300); do
    [[ -s "$work/run/metrics.txt" ]] && break
    sleep 0.1
done
[[ -s "$work/run/metrics.txt" ]] || fail "the launcher wrote no metrics.txt"
cat "$work/run/metrics.txt"
targets="$(awk '{sub("^http://", "", $2); sub("/metrics$", "", $2); printf "\"%s\",", $2}' \
    "$work/run/metrics.txt")"

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: edgesync
    static_configs:
      - targets: [${targets%,}]
EOF
promtool check config "$work/prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$port" >"$work/prometheus.log" 2>&1 &
prometheus_pid=$!

# Every node's exposition passes promtool's linter.
while read -r node url; do
    for _ in $(seq 1 100); do
        curl -fsS --max-time 2 "$url" >"$work/$node.prom" 2>/dev/null && break
        sleep 0.2
    done
    promtool check metrics <"$work/$node.prom" || fail "promtool rejects $node's metrics"
done <"$work/run/metrics.txt"

api="http://127.0.0.1:$port/api/v1/query"
# Prints "node round" per series of edgesync_round carrying this federation's label.
rounds() {
    curl -fsS --max-time 2 -G "$api" --data-urlencode "query=edgesync_round" 2>/dev/null |
        python3 -c '
import json, sys
fed = sys.argv[1]
for s in json.load(sys.stdin)["data"]["result"]:
    m = s["metric"]
    if m.get("federation") == fed and "node" in m:
        print(m["node"], s["value"][1])
' "$federation"
}

first=""
for _ in $(seq 1 120); do
    first="$(rounds || true)"
    [[ "$(wc -l <<<"$first")" -eq 2 ]] && break
    sleep 1
done
[[ "$(wc -l <<<"$first")" -eq 2 ]] || fail "Prometheus has no edgesync_round for both nodes"
echo "first query:"
echo "$first"

moved=""
for _ in $(seq 1 60); do
    sleep 1
    later="$(rounds || true)"
    moved="$(join <(sort <<<"$first") <(sort <<<"$later") | awk '$3 > $2 {n++} END {print n+0}')"
    [[ "$moved" -eq 2 ]] && break
done
echo "later query:"
echo "$later"
[[ "$moved" -eq 2 ]] || fail "the round did not advance on both nodes in Prometheus"

bytes="$(curl -fsS --max-time 2 -G "$api" \
    --data-urlencode "query=sum by (node) (edgesync_bytes_sent_total{federation=\"$federation\"})" |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["result"]))')"
[[ "$bytes" -eq 2 ]] || fail "edgesync_bytes_sent_total is missing for some node"

echo "PASS: Prometheus scraped both nodes with federation/node labels; the round advanced"
