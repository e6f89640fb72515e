#!/usr/bin/env bash
# Builds bench/goclient (sdsclient, a compiled SDS load client) once into a cache outside
# the repository, for bench/sds_fanout.py --client go. Modules come from the Go module
# proxy. A benchmark tool only, never a test or runtime dependency of meshca.
#
#   bench/goclient/build.sh      # prints the binary's path
set -euo pipefail

CACHE=${MESHCA_GOCLIENT_CACHE:-$HOME/.cache/meshca/goclient}
SOURCE=$(cd "$(dirname "$0")" && pwd)
command -v go >/dev/null || { echo "sdsclient build: no Go on PATH" >&2; exit 1; }
mkdir -p "$CACHE"
# rebuilt when its source is newer than the binary
if [ ! -x "$CACHE/sdsclient" ] || [ -n "$(find "$SOURCE" -newer "$CACHE/sdsclient" -name '*.go' -o -newer "$CACHE/sdsclient" -name 'go.*' | head -1)" ]; then
  echo "building sdsclient into $CACHE (once)" >&2
  (cd "$SOURCE" && nice -n 19 go build -trimpath -ldflags="-s -w" -o "$CACHE/sdsclient.tmp" . >&2)
  mv "$CACHE/sdsclient.tmp" "$CACHE/sdsclient"
fi
echo "$CACHE/sdsclient"
