#!/usr/bin/env bash
# Watches a small local federation and the operator through a real Prometheus, and checks
# the Grafana dashboard against what it collected:
#   1. installs Prometheus (and promtool) from Debian's packages when missing;
#   2. serves the operator's real /metrics from its exposition test, which keeps
#      reconciling against a mocked Kubernetes API server (there is no cluster here);
#   3. runs two MNIST nodes on loopback with `dfl-node local`, Prometheus scraping every
#      node and the operator each second;
#   4. lints every node's and the operator's exposition with `promtool check metrics`;
#   5. checks through Prometheus's HTTP API that the series arrive with federation and node
#      labels and that the round moves;
#   6. kills node-1 and restarts it from its checkpoint, and checks that node-0's
#      disconnection and reconnection reach Prometheus (the dashboard's annotations);
#   7. evaluates every PromQL expression of charts/edgesync/dashboards/*.json against that
#      Prometheus with scripts/check_dashboard.py: each must return data.
# Stops everything it started and prints PASS or FAIL.
#
# Environment: EDGESYNC_MNIST (MNIST folder, default ../shared/data/mnist beside the
# checkout), PROMETHEUS_PORT (default: a free port).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

began=$SECONDS
federation=promcheck
mnist="$(cd "${EDGESYNC_MNIST:-../shared/data/mnist}" && pwd)"
work="$(mktemp -d)"
launcher_pid=""
restarted_pid=""
operator_pid=""
prometheus_pid=""

fail() {
    echo "FAIL: $*" >&2
    for log in launcher.log run/nodes/node-0/node.log node-1-restarted.log operator.log \
        prometheus.log; do
        if [[ -s "$work/$log" ]]; then
            echo "--- last lines of $log" >&2
            tail -n 15 "$work/$log" >&2
        fi
    done
    exit 1
}

# Waits up to $1 tenths of a second for process $2 to exit.
wait_exit() {
    for _ in $(seq 1 "$1"); do
        kill -0 "$2" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

# Ids of the node processes whose command line holds "run --config $1".
node_pids() {
    local cmdline pid
    for cmdline in /proc/[0-9]*/cmdline; do
        if tr '\0' ' ' 2>/dev/null <"$cmdline" | grep -qF -- "run --config $1"; then
            pid=${cmdline#/proc/}
            echo "${pid%/cmdline}"
        fi
    done
}

cleanup() {
    # Interrupted nodes finish their round and exit; the launcher passes the interrupt on.
    for pid in "$launcher_pid" "$restarted_pid"; do
        [[ -n "$pid" ]] && kill -INT "$pid" 2>/dev/null || true
    done
    for pid in "$launcher_pid" "$restarted_pid"; do
        if [[ -n "$pid" ]] && ! wait_exit 300 "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    # Nodes of this run that outlived a killed launcher: their configurations lie in $work.
    for pid in $(node_pids "$work/run/nodes/"); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "$operator_pid" "$prometheus_pid"; do
        [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); \
print(s.getsockname()[1])'
}

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null ||
    ! command -v curl >/dev/null; then
    sudo=""
    [[ "$(id -u)" -ne 0 ]] && sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        prometheus curl >/dev/null
fi
prometheus --version 2>&1 | head -1

# What `cargo test` in scripts/test.sh builds already (dfl-node and the operator's tests);
# the same command and flags, so nothing is rebuilt after it. The test binaries' paths
# come from cargo's messages; the binary is run directly, so no cargo (and none of its
# locks) is involved once the check runs.
cargo test --release --locked --workspace --no-run \
    --message-format=json-render-diagnostics >"$work/build.json" ||
    fail "the build failed"
exposition_test="$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "exposition":
        print(m["executable"])
' "$work/build.json")"
[[ -x "$exposition_test" ]] || fail "no operator exposition test after the build"
dfl_node="$PWD/target/release/dfl-node"
[[ -x "$dfl_node" ]] || fail "no $dfl_node after the build"
built=$SECONDS

# The operator's exposition, live: its real reconcilers and web server, the API server
# mocked. It serves until this script stops it (or for at most four minutes).
EDGESYNC_OPERATOR_METRICS_SERVE_SECONDS=240 \
    EDGESYNC_OPERATOR_METRICS_ADDR_FILE="$work/operator.addr" \
    "$exposition_test" --exact reconciliations_are_served_as_prometheus_metrics --nocapture \
    >"$work/operator.log" 2>&1 &
operator_pid=$!

# A run long enough for any check below; the script stops it when done.
cat >"$work/federation.yaml" <<EOF
apiVersion: edgesync.dev/v1alpha1
kind: FederationRound
metadata: {name: $federation}
spec:
  rounds: 2000
  localSteps: 20
  batchSize: 32
  seed: 11
  optimizer: {kind: adam, learningRate: 0.002, clipGradNorm: 5.0}
  topology: {kind: fullMesh}
  exchange: {roundDeadlineSeconds: 5, compression: {kind: none}}
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
for _ in $(seq 1 100); do
    [[ -s "$work/operator.addr" ]] && break
    kill -0 "$operator_pid" 2>/dev/null || fail "the operator's exposition test stopped"
    sleep 0.1
done
[[ -s "$work/operator.addr" ]] || fail "the operator's exposition test serves nothing"
operator_addr="$(cat "$work/operator.addr")"
echo "operator http://$operator_addr/metrics"

node_targets="$(awk '{sub("^http://", "", $2); sub("/metrics$", "", $2); printf "\"%s\",", $2}' \
    "$work/run/metrics.txt")"
port="${PROMETHEUS_PORT:-$(free_port)}"
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: edgesync-nodes
    static_configs:
      - targets: [${node_targets%,}]
  - job_name: edgesync-operator
    static_configs:
      - targets: ["$operator_addr"]
EOF
promtool check config "$work/prometheus.yml" >/dev/null
prometheus_start="$(date +%s.%N)"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$port" >"$work/prometheus.log" 2>&1 &
prometheus_pid=$!

# Every node's and the operator's exposition passes promtool's linter.
expositions=()
while read -r node url; do
    for _ in $(seq 1 100); do
        curl -fsS --max-time 2 "$url" >"$work/$node.prom" 2>/dev/null && break
        sleep 0.2
    done
    promtool check metrics <"$work/$node.prom" || fail "promtool rejects $node's metrics"
    echo "promtool check metrics: $node ok ($(grep -c '^edgesync_' "$work/$node.prom") samples)"
    expositions+=(--exposition "$work/$node.prom")
done <"$work/run/metrics.txt"
curl -fsS --max-time 2 "http://$operator_addr/metrics" >"$work/operator.prom" ||
    fail "the operator's /metrics did not answer"
promtool check metrics <"$work/operator.prom" || fail "promtool rejects the operator's metrics"
echo "promtool check metrics: operator ok" \
    "($(grep -c '^edgesync_operator_' "$work/operator.prom") samples)"
expositions+=(--exposition "$work/operator.prom")

api="http://127.0.0.1:$port/api/v1/query"
# Prints "<labels of $2...> value" per series of the instant query $1, one line each.
# Prints nothing while Prometheus cannot answer.
query() {
    local expr=$1 body
    shift
    body="$(curl -fsS --max-time 2 -G "$api" --data-urlencode "query=$expr" 2>/dev/null)" ||
        return 0
    python3 -c '
import json, sys
labels = sys.argv[1:]
for s in json.load(sys.stdin)["data"]["result"]:
    print(*[s["metric"].get(l, "-") for l in labels], s["value"][1])
' "$@" <<<"$body" || true
}
rounds() { query "edgesync_round{federation=\"$federation\"}" node; }

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

bytes="$(query "sum by (node) (edgesync_bytes_sent_total{federation=\"$federation\"})" node |
    wc -l)"
[[ "$bytes" -eq 2 ]] || fail "edgesync_bytes_sent_total is missing for some node"
reconciles="$(query 'edgesync_operator_reconciles_total' controller | wc -l)"
[[ "$reconciles" -eq 2 ]] || fail "Prometheus has no reconciles of both operator controllers"

# A disconnection and a reconnection, as the dashboard's annotations show them: node-1
# dies without a goodbye and comes back from its checkpoint.
victim="$(node_pids "$work/run/nodes/node-1/config.yaml")"
[[ "$victim" =~ ^[0-9]+$ ]] || fail "node-1's process was not found ($victim)"
kill -KILL "$victim"
echo "killed node-1 (pid $victim)"
sleep 1
"$dfl_node" run --config "$work/run/nodes/node-1/config.yaml" \
    >"$work/node-1-restarted.out" 2>"$work/node-1-restarted.log" &
restarted_pid=$!
link="federation=\"$federation\", node=\"node-0\", neighbour=\"node-1\""
reconnected=""
for _ in $(seq 1 90); do
    sleep 1
    lost="$(query "edgesync_neighbour_disconnections_total{$link}" node)"
    back="$(query "edgesync_neighbour_connected{$link}" node)"
    if [[ "$lost" == "node-0 "[1-9]* && "$back" == "node-0 1" ]]; then
        reconnected=yes
        break
    fi
done
[[ -n "$reconnected" ]] || fail "Prometheus did not see node-0 lose and regain node-1"
echo "node-0 lost node-1 and got it back: disconnections $lost"
# Rounds after the restart, so that every rate window of the dashboard covers some.
sleep 6

dashboard=charts/edgesync/dashboards/edgesync-federation.json
check_dashboard() {
    python3 scripts/check_dashboard.py "$1" --prometheus "http://127.0.0.1:$port" \
        --start "$prometheus_start" --scrape-interval 1s "${@:2}"
}
check_dashboard "$dashboard" "${expositions[@]}" ||
    fail "the dashboard does not hold up against Prometheus"

# The checker must itself catch a broken panel: a query of a metric nobody exports, and
# one that does not parse.
python3 - "$dashboard" "$work" <<'EOF'
import json, sys
dashboard = json.load(open(sys.argv[1]))
panel = next(p for p in dashboard["panels"] if p.get("targets"))
for name, expr in [("absent", "edgesync_no_such_metric"), ("unparsable", "rate(edgesync_round[")]:
    panel["targets"][0]["expr"] = expr
    json.dump(dashboard, open(f"{sys.argv[2]}/broken-{name}.json", "w"))
EOF
for broken in absent unparsable; do
    if check_dashboard "$work/broken-$broken.json" >"$work/broken-$broken.log" 2>&1; then
        fail "the dashboard checker passed a panel with an $broken query"
    fi
    echo "an $broken query fails the check: $(grep -m1 '^FAIL' "$work/broken-$broken.log")"
done

echo "PASS: Prometheus scraped both nodes and the operator, promtool accepts every" \
    "exposition, the round advanced, a disconnection was recorded and every dashboard" \
    "query returned data ($((SECONDS - built))s, $((SECONDS - began))s with the build)"
