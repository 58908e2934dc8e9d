#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, etcd, kwok, helm) from the Go module proxy into a cache outside the repository.
#
# Why build: no Kubernetes package exists in Debian or PyPI and release downloads are not
# reachable, but the Go module proxy is. Each component lands in its own versioned folder
# under $SLM_FLEET_CACHE/bin and is only marked usable (a .complete stamp) after every binary
# in it linked, so an interrupted build is detected and redone on the next run.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

CACHE="${SLM_FLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slm-fleet}"
# Absolute: the builds run `go build -o` after a cd into their work folder, where a relative
# cache would name another place (the binaries landed under the work folder, and the build
# failed as "missing" them).
CACHE="$(realpath -m "$CACHE")"
BIN_ROOT="$CACHE/bin"
WORK="$CACHE/work"
export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
JOBS="${SLM_FLEET_BUILD_JOBS:-$(nproc)}"

log() { printf '[build-binaries %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v go >/dev/null 2>&1; then
  if [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
  else
    echo "error: the Go toolchain (go >= 1.26) is needed to build the local Kubernetes control plane." >&2
    echo "       Install Go from your distribution or https://go.dev/dl and put 'go' on PATH, then re-run 'make setup'." >&2
    exit 3
  fi
fi
log "using $(go version)"

# done_or_reset DIR: returns 0 when DIR holds a complete build, else wipes any partial one.
done_or_reset() {
  local dir="$1"
  if [ -f "$dir/.complete" ]; then return 0; fi
  if [ -e "$dir" ]; then log "found an unfinished build in $dir; redoing it"; rm -rf "$dir"; fi
  return 1
}

# json_field KEY: the KEY of the JSON object on stdin; empty when it has none or is no JSON.
json_field() {
  python3 -c 'import json, sys
try:
    print(json.load(sys.stdin).get(sys.argv[1]) or "")
except ValueError:
    pass' "$1"
}

# kube_minor: the minor of KUBERNETES_VERSION (36 for v1.36.3), which kubectl and helm report.
kube_minor() { local m="${KUBERNETES_VERSION#v1.}"; echo "${m%%.*}"; }

finish() {  # finish DIR BIN...: verify every binary exists, then stamp the folder
  local dir="$1"; shift
  local b
  for b in "$@"; do [ -x "$dir/$b" ] || { log "missing $dir/$b after build"; exit 1; }; done
  date -u +%FT%TZ > "$dir/.complete"
}

build_kubernetes() {
  local v="$KUBERNETES_VERSION" dir="$BIN_ROOT/kubernetes-$KUBERNETES_VERSION"
  done_or_reset "$dir" && { log "kubernetes $v: cached"; return; }
  local w="$WORK/kubernetes-$v"; rm -rf "$w"; mkdir -p "$w" "$dir.tmp"
  log "kubernetes $v: resolving staging modules"
  local info gomod
  # On failure (proxy unreachable, unknown version) go says why in the JSON's Error field.
  if ! info="$(cd "$w" && go mod download -json "k8s.io/kubernetes@$v")" \
      || ! gomod="$(json_field GoMod <<<"$info")" || [ -z "$gomod" ]; then
    log "kubernetes $v: 'go mod download -json k8s.io/kubernetes@$v' failed: $(json_field Error <<<"$info")"
    exit 1
  fi
  local staging_ver="v0.${v#v1.}"
  {
    echo "module slmfleet.local/k8sbuild"
    echo
    echo "go 1.26"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    # Every 'k8s.io/X => ./staging/src/k8s.io/X' line of kubernetes' own go.mod becomes a
    # replace to the published module at the matching v0.y.z tag.
    grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$gomod" | awk -v sv="$staging_ver" '{print "replace " $1 " => " $1 " " sv}'
  } > "$w/go.mod"
  log "kubernetes $v: $(grep -c '^replace' "$w/go.mod") staging replaces"
  cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$w" && go mod tidy)
  local minor; minor="$(kube_minor)"
  local pkg ld
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "kubernetes $v: compiling (tens of minutes on 2 cores)"
  (cd "$w" && go build -p "$JOBS" -trimpath -ldflags "-s -w$ld" -o "$dir.tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  finish "$dir.tmp" kube-apiserver kube-controller-manager kube-scheduler kubectl
  mv "$dir.tmp" "$dir"
  log "kubernetes $v: done"
}

build_etcd() {
  local v="$ETCD_VERSION" dir="$BIN_ROOT/etcd-$ETCD_VERSION"
  done_or_reset "$dir" && { log "etcd $v: cached"; return; }
  local w="$WORK/etcd-$v"; rm -rf "$w" "$dir.tmp"; mkdir -p "$w" "$dir.tmp"
  # etcd's server module carries replace directives, so 'go install' refuses it; a wrapper
  # module that requires it resolves the published api/client modules instead.
  printf 'module slmfleet.local/etcdbuild\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$v" > "$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$w/tools.go"
  (cd "$w" && go mod tidy)
  log "etcd $v: compiling"
  (cd "$w" && go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$dir.tmp/etcd" go.etcd.io/etcd/server/v3)
  finish "$dir.tmp" etcd
  mv "$dir.tmp" "$dir"
  log "etcd $v: done"
}

build_kwok() {
  local v="$KWOK_VERSION" dir="$BIN_ROOT/kwok-$KWOK_VERSION"
  done_or_reset "$dir" && { log "kwok $v: cached"; return; }
  rm -rf "$dir.tmp"; mkdir -p "$dir.tmp/stages"
  log "kwok $v: compiling"
  GOBIN="$dir.tmp" go install -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${v#v}" "sigs.k8s.io/kwok/cmd/kwok@$v"
  # The standalone kwok binary needs its stages passed explicitly: keep the module's own
  # stage YAMLs next to the binary.
  local src; src="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$v/kustomize/stage"
  local f
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [ -f "$src/$f" ] || { log "kwok stage $src/$f not found"; find "$src" -name '*.yaml' >&2; exit 1; }
    cp "$src/$f" "$dir.tmp/stages/$(basename "$f")"
  done
  chmod u+w "$dir.tmp/stages"/*
  finish "$dir.tmp" kwok
  mv "$dir.tmp" "$dir"
  log "kwok $v: done"
}

build_helm() {
  # The Kubernetes minor is baked into helm (below), so it is part of the folder's name: keyed
  # by HELM_VERSION alone, a bumped KUBERNETES_VERSION found the old helm "cached", and it
  # went on rendering charts for the old minor. Keep in step with slm_e2e/binaries.py.
  local minor; minor="$(kube_minor)"
  local v="$HELM_VERSION" dir="$BIN_ROOT/helm-$HELM_VERSION-k8s1.$minor"
  done_or_reset "$dir" && { log "helm $v (Kubernetes 1.$minor): cached"; return; }
  rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$v"
  # Without these helm assumes Kubernetes 1.20 for .Capabilities and 'helm lint'.
  ld+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
  ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
  log "helm $v (Kubernetes 1.$minor): compiling"
  GOBIN="$dir.tmp" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$v"
  finish "$dir.tmp" helm
  mv "$dir.tmp" "$dir"
  log "helm $v: done"
}

mkdir -p "$BIN_ROOT" "$WORK"
# Two setups at once (two clones, two terminals) would build into the same folders and delete
# each other's work: the second waits for the first, then finds its binaries cached. The lock
# is held by fd 9, which the build's go processes inherit: it is released when they and this
# script have all exited, so a killed build holds it only until its children exit too.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/build.lock"
  if ! flock -n 9; then
    log "another build holds $CACHE/build.lock; waiting for it to finish"
    flock 9
  fi
else
  log "flock not found (util-linux): two builds at once into $CACHE would clash"
fi
start=$(date +%s)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(etcd kwok kubernetes helm)
for t in "${targets[@]}"; do "build_$t"; done
log "all requested binaries ready under $BIN_ROOT ($(( $(date +%s) - start )) s)"
du -sh "$BIN_ROOT" >&2
