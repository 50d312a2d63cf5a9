#!/usr/bin/env bash
# Download the source distributions megablocks needs, on a machine that reaches PyPI, into DIR
# (default .sdist/), so that scripts/build_megablocks.sh can build them on a GPU machine with no network.
# `pip download` cannot do this for grouped-gemm: its setup.py asks CUDA for the device's capability just
# to produce metadata, so we fetch the files named by PyPI's simple index directly.
set -euo pipefail
dest=${1:-.sdist}
mkdir -p "$dest"
for spec in megablocks==0.10.0 grouped-gemm==0.3.0 stanford-stk==0.7.1; do
    name=${spec%%==*}; version=${spec##*==}
    url=$(curl -fsS -H "Accept: application/vnd.pypi.simple.v1+json" "https://pypi.org/simple/$name/" |
        python3 -c "import json, sys
files = json.load(sys.stdin)['files']
print(next(f['url'] for f in files if f['filename'].endswith('-$version.tar.gz')))")
    curl -fsSL -o "$dest/${url##*/}" "$url"
    echo "fetched $dest/${url##*/}"
done
