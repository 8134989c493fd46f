#!/usr/bin/env sh
# Build every wheel the fedslim image needs into docker/wheels/, for an offline
# `--no-index` image build. Run from anywhere, in an environment whose Python has the
# image's minor version (3.11) and whose pip can reach an index (or local wheels).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-python3}
# torch first and pinned: an unpinned torch resolves to the multi-GB CUDA build.
"$python" -m pip wheel --wheel-dir "$here/wheels" "torch==${TORCH_VERSION:-2.13.0}" \
    "$repo" "setuptools>=68" wheel
# The image installs fedslim from the build context's source, not from a wheel.
rm -f "$here"/wheels/fedslim-*.whl
ls "$here"/wheels/*.whl | wc -l | xargs echo "wheels in $here/wheels:"
