#!/usr/bin/env bash
# Builds the Kubernetes test peers from the Go module proxy into a cache outside the
# repository: kube-apiserver and kube-controller-manager from the k8s.io/kubernetes module
# (its staging modules pinned to the matching v0.x with replace lines) and etcd from
# go.etcd.io/etcd/server/v3. Built once, reused: a binary already in the cache is kept.
# Never a runtime dependency of meshca.
#
#   tests/kube/build.sh                      # all three (make kube)
#   tests/kube/build.sh etcd kube-apiserver  # only these (what make test needs)
#   -> ${MESHCA_KUBE_CACHE:-~/.cache/meshca/k8s-v1.37.2}/bin
set -euo pipefail

WANTED=${*:-etcd kube-apiserver kube-controller-manager}
wanted() { [[ " $WANTED " == *" $1 "* ]]; }

KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
CACHE=${MESHCA_KUBE_CACHE:-$HOME/.cache/meshca/k8s-$KUBE_VERSION}
BIN=$CACHE/bin
export GOFLAGS=-mod=mod

command -v go >/dev/null || { echo "kube build: no Go on PATH" >&2; exit 1; }
mkdir -p "$BIN" "$CACHE/kube" "$CACHE/etcd"
# Two test runs at once (two work trees) share the cache: one builds, the other waits.
exec 9>"$CACHE/.build.lock"
flock 9

kube_cmds=""
for cmd in kube-apiserver kube-controller-manager; do
  if wanted "$cmd" && [ ! -x "$BIN/$cmd" ]; then kube_cmds="$kube_cmds $cmd"; fi
done

if [ -n "$kube_cmds" ]; then
  echo "building$kube_cmds $KUBE_VERSION into $BIN (once; later runs reuse it)"
  cd "$CACHE/kube"
  mod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  staging_version="v0.${KUBE_VERSION#v1.}"
  {
    printf 'module meshca.local/kubebuild\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
    grep -E '=> \./staging/' "$mod" | awk -v v="$staging_version" '{printf "\t%s => %s %s\n", $1, $1, v}'
    printf ')\n'
  } > go.mod
  printf '//go:build tools\n\npackage kubebuild\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kube-apiserver"\n\t_ "k8s.io/kubernetes/cmd/kube-controller-manager"\n)\n' > tools.go
  printf 'package kubebuild\n' > doc.go
  go mod tidy
  for cmd in $kube_cmds; do
    go build -trimpath -ldflags="-s -w" -o "$BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd"
  done
fi

if wanted etcd && [ ! -x "$BIN/etcd" ]; then
  echo "building etcd $ETCD_VERSION into $BIN (once; later runs reuse it)"
  cd "$CACHE/etcd"
  printf 'module meshca.local/etcdbuild\n\ngo 1.26\n' > go.mod
  printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' > main.go
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go mod tidy
  go build -trimpath -ldflags="-s -w" -o "$BIN/etcd" .
fi
echo "Kubernetes test peers ($WANTED) in $BIN"
