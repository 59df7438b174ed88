#!/usr/bin/env bash
# Create a Python virtual environment with BrainChip's akida package (2.19.3, from PyPI),
# used by scripts/akida/convert.py and check.py to build and run exported models.
#
# akida is optional: nothing else in EdgeSync needs it, and it is never vendored into the
# repository. The venv lives outside the checkout (EDGESYNC_AKIDA_VENV, default
# ~/.cache/edgesync/akida-venv). Wheels are cached in EDGESYNC_CACHE/wheels (default
# ~/.cache/edgesync/wheels): when they are there the install is offline, otherwise they are
# downloaded into the cache first, so later installs need no network.
#
# Prints the venv's python path on its last line. The akida wheels exist for CPython 3.11
# on x86_64 Linux (among others); set PYTHON to pick an interpreter.
set -euo pipefail

AKIDA_VERSION=2.19.3
python=${PYTHON:-python3}
cache="${EDGESYNC_CACHE:-$HOME/.cache/edgesync}/wheels"
venv="${EDGESYNC_AKIDA_VENV:-$HOME/.cache/edgesync/akida-venv}"

if [ -f "$venv/.edgesync-complete" ] \
  && "$venv/bin/python" -c "import akida, sys; sys.exit(akida.__version__ != '$AKIDA_VERSION')" \
    2>/dev/null; then
  echo "akida $AKIDA_VERSION already installed in $venv" >&2
  echo "$venv/bin/python"
  exit 0
fi

mkdir -p "$cache"
if ! ls "$cache"/akida-"$AKIDA_VERSION"-*.whl >/dev/null 2>&1; then
  echo "downloading akida==$AKIDA_VERSION and its dependencies into $cache" >&2
  "$python" -m pip download --quiet -d "$cache" "akida==$AKIDA_VERSION" >&2
fi

# A venv cannot be moved once built, so an interrupted run is told apart by the marker
# written last: without it the venv is rebuilt from scratch.
rm -rf "$venv"
"$python" -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --no-index --find-links "$cache" \
  "akida==$AKIDA_VERSION" >&2
touch "$venv/.edgesync-complete"
echo "installed akida $AKIDA_VERSION in $venv" >&2
echo "$venv/bin/python"
