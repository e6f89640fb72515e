#!/usr/bin/env bash
# Build tests/istio_client/go (Istio's own Go client of its CA API, istio.io/api from the Go
# module proxy) once into ${MESHCA_ISTIO_CLIENT_CACHE:-~/.cache/meshca/istio-ca-client-<api version>}.
# tests/test_kube_istio.py runs it when it is there. Needs Go (GOTOOLCHAIN may fetch the
# version go.mod names).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="$(awk '$1 == "istio.io/api" {print $2}' "$here/go.mod")"
out="${MESHCA_ISTIO_CLIENT_CACHE:-$HOME/.cache/meshca/istio-ca-client-$version}"
if [ -x "$out/istio-ca-client" ]; then
    echo "istio-ca-client ($version) already built in $out"
    exit 0
fi
echo "building istio-ca-client (istio.io/api $version) into $out"
mkdir -p "$out"
cd "$here"
go build -trimpath -o "$out/istio-ca-client.tmp" .
mv "$out/istio-ca-client.tmp" "$out/istio-ca-client"
