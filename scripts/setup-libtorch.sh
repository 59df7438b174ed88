#!/usr/bin/env bash
# Provision a CPU libtorch for tch into .libtorch/ of this checkout, from PyPI only.
#
# PyPI's torch wheel for Linux is the CUDA build and, installed normally, pulls gigabytes of
# NVIDIA packages. The node needs only the C++ headers and the CPU libraries, so this script
# downloads the wheel without its dependencies and unpacks just those, plus the two small
# CUDA runtime libraries that libtorch_cpu.so links against even when no GPU is used.
#
# Wheels are kept in a cache outside the checkout (EDGESYNC_CACHE, default
# ~/.cache/edgesync) so that a fresh clone on the same machine provisions without a network.
#
# Users who already have libtorch (for example NVIDIA's build on a Jetson) skip this script
# and set LIBTORCH=/path/to/libtorch, or LIBTORCH_USE_PYTORCH=1 to use an installed PyTorch.
set -euo pipefail

TORCH_VERSION=2.13.0
CUDART_SPEC='nvidia-cuda-runtime==13.0.96.*'
CUPTI_SPEC='nvidia-cuda-cupti==13.0.85.*'

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest="${1:-$repo/.libtorch}"
cache="${EDGESYNC_CACHE:-$HOME/.cache/edgesync}/wheels"

if [ -f "$dest/build-version" ] && grep -q "^$TORCH_VERSION" "$dest/build-version"; then
  echo "libtorch $TORCH_VERSION already provisioned in $dest"
  exit 0
fi

mkdir -p "$cache"
if ! ls "$cache"/torch-"$TORCH_VERSION"-*.whl >/dev/null 2>&1 \
  || ! ls "$cache"/nvidia_cuda_runtime-*.whl >/dev/null 2>&1 \
  || ! ls "$cache"/nvidia_cuda_cupti-*.whl >/dev/null 2>&1; then
  echo "downloading torch==$TORCH_VERSION wheel (about 530 MB) into $cache"
  python3 -m pip download --quiet --no-deps --progress-bar on -d "$cache" \
    "torch==$TORCH_VERSION" "$CUDART_SPEC" "$CUPTI_SPEC"
fi

# Unpack into a temporary folder first and move it into place at the end, so that an
# interrupted run never leaves a half-provisioned libtorch that later builds would trust.
tmp="$dest.partial"
rm -rf "$tmp"
mkdir -p "$tmp/lib"
python3 - "$cache" "$tmp" "$TORCH_VERSION" <<'PY'
import glob, os, shutil, sys, zipfile

cache, out, version = sys.argv[1], sys.argv[2], sys.argv[3]
torch_whl = glob.glob(os.path.join(cache, f"torch-{version}-*.whl"))[0]
keep_libs = {"libc10.so", "libtorch_cpu.so", "libgomp.so.1"}

def extract(zf, member, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with zf.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)

with zipfile.ZipFile(torch_whl) as zf:
    for name in zf.namelist():
        if name.startswith("torch/include/") and not name.endswith("/"):
            extract(zf, name, os.path.join(out, name[len("torch/"):]))
        elif name.startswith("torch/lib/") and os.path.basename(name) in keep_libs:
            extract(zf, name, os.path.join(out, "lib", os.path.basename(name)))

for pattern, lib in (("nvidia_cuda_runtime-*.whl", "libcudart.so.13"),
                     ("nvidia_cuda_cupti-*.whl", "libcupti.so.13")):
    with zipfile.ZipFile(glob.glob(os.path.join(cache, pattern))[0]) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/" + lib))
        extract(zf, member, os.path.join(out, "lib", lib))
PY

# torch-sys always links -ltorch; the wheel's libtorch.so pulls in the CUDA libraries, so an
# empty stub stands in for it. With no libtorch_cuda.so present, torch-sys links CPU only.
cc -shared -o "$tmp/lib/libtorch.so" -x c /dev/null
echo "$TORCH_VERSION+cpu" > "$tmp/build-version"

rm -rf "$dest"
mv "$tmp" "$dest"
echo "libtorch $TORCH_VERSION provisioned in $dest ($(du -sh "$dest" | cut -f1))"
