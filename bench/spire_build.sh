#!/usr/bin/env bash
# Builds spire-server and spire-agent from the Go module proxy into a cache outside the
# repository, for bench/agent.py's SPIRE peer. Built once, reused: binaries already in the
# cache are kept. A benchmark peer only, never a test or runtime dependency of meshca.
#
#   bench/spire_build.sh           # -> ${MESHCA_SPIRE_CACHE:-~/.cache/meshca/spire-v1.13.3}/bin
set -euo pipefail

SPIRE_VERSION=${SPIRE_VERSION:-v1.13.3}
CACHE=${MESHCA_SPIRE_CACHE:-$HOME/.cache/meshca/spire-$SPIRE_VERSION}
BIN=$CACHE/bin
export GOFLAGS=-mod=mod

command -v go >/dev/null || { echo "spire build: no Go on PATH" >&2; exit 1; }
mkdir -p "$BIN" "$CACHE/src"

if [ ! -x "$BIN/spire-server" ] || [ ! -x "$BIN/spire-agent" ]; then
  echo "building spire-server and spire-agent $SPIRE_VERSION into $BIN (once)" >&2
  cd "$CACHE/src"
  # The proxy lists no versions for this module, so a plain `go install ...@version` is
  # refused; a throwaway module that requires the exact version builds both commands.
  [ -f go.mod ] || printf 'module meshca.local/spirebuild\n\ngo 1.26\n' > go.mod
  go get "github.com/spiffe/spire@$SPIRE_VERSION" >&2
  for cmd in spire-server spire-agent; do
    [ -x "$BIN/$cmd" ] || nice -n 19 go build -p 1 -trimpath -ldflags="-s -w" \
      -o "$BIN/$cmd.tmp" "github.com/spiffe/spire/cmd/$cmd" >&2
    [ -x "$BIN/$cmd" ] || mv "$BIN/$cmd.tmp" "$BIN/$cmd"
  done
fi
echo "$BIN"
