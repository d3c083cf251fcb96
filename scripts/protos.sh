#!/usr/bin/env bash
# Generates the Python code for protos/ into services/v1 (`generate`), or checks that the
# committed code is what the protos generate (`check`).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$python" -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    protos/chatmesh/v1/*.proto
case "${1:-generate}" in
generate)
    find services/v1 -name '*_pb2*' -delete
    cp "$out"/chatmesh/v1/*_pb2* services/v1/
    ;;
check)
    if ! diff -r -x __init__.py -x __pycache__ "$out/chatmesh/v1" services/v1; then
        echo "services/v1 differs from protos/: run 'make proto' and commit the result" >&2
        exit 1
    fi
    ;;
*)
    echo "usage: $0 [generate|check]" >&2
    exit 2
    ;;
esac
