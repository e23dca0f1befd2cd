#!/usr/bin/env bash
# Builds the dev cluster's binaries from the Go module proxy into a cache outside the repository.
# Each component lands in $CACHE/<component>-<version>/bin and is built only when its stamp file is missing.
# Usage: devcluster/build-tools.sh [component ...]   (default: all; prints the cache root on success)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
CACHE=${LLMENGINE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmengine-devcluster}
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
mkdir -p "$CACHE"

die() { echo "devcluster: $*" >&2; exit 1; }
# A login shell of a user other than the one who installed Go may not have its directory on PATH: look where the
# official archive and the common packages put it before giving up.
if ! command -v go >/dev/null 2>&1; then
  for d in /usr/local/go/bin /usr/lib/go/bin "$HOME/go/bin" "$HOME/.local/go/bin"; do
    if [ -x "$d/go" ]; then export PATH="$d:$PATH"; break; fi
  done
fi
command -v go >/dev/null 2>&1 || die "Go is not installed or not on PATH; install Go >= 1.24 (https://go.dev/doc/install) and retry."
builddate=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# Fails fast with one line when the module proxy cannot be reached, instead of a wall of resolver errors.
check_proxy() {
  local mod=$1
  if ! out=$(timeout 120 go list -m -json "$mod" 2>&1); then
    die "cannot fetch $mod from the Go module proxy (GOPROXY=$(go env GOPROXY)): $(echo "$out" | tail -n 1)"
  fi
}

# new_module DIR NAME: an empty wrapper module of its own per tool, so MVS of one tool never moves another's deps.
new_module() {
  rm -rf "$1"; mkdir -p "$1"; (cd "$1" && go mod init "$2" >/dev/null 2>&1)
}

done_stamp() { echo "$CACHE/$1/.built"; }

build_etcd() {
  local d="etcd-$ETCD_VERSION"; [ -f "$(done_stamp $d)" ] && return 0
  echo "devcluster: building etcd $ETCD_VERSION" >&2
  check_proxy "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  local w="$CACHE/$d/src"; new_module "$w" llmengine.dev/etcd
  (cd "$w" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null \
    && go build -trimpath -ldflags "-s -w" -o "$CACHE/$d/bin/etcd" go.etcd.io/etcd/server/v3)
  touch "$(done_stamp $d)"
}

build_kwok() {
  local d="kwok-$KWOK_VERSION"; [ -f "$(done_stamp $d)" ] && return 0
  echo "devcluster: building kwok $KWOK_VERSION" >&2
  check_proxy "sigs.k8s.io/kwok@$KWOK_VERSION"
  GOBIN="$CACHE/$d/bin" go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  touch "$(done_stamp $d)"
}

build_helm() {
  local d="helm-$HELM_VERSION"; [ -f "$(done_stamp $d)" ] && return 0
  echo "devcluster: building helm $HELM_VERSION" >&2
  check_proxy "helm.sh/helm/v3@$HELM_VERSION"
  GOBIN="$CACHE/$d/bin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  touch "$(done_stamp $d)"
}

build_versitygw() {
  local d="versitygw-$VERSITYGW_VERSION"; [ -f "$(done_stamp $d)" ] && return 0
  echo "devcluster: building versitygw $VERSITYGW_VERSION" >&2
  check_proxy "github.com/versity/versitygw@$VERSITYGW_VERSION"
  GOBIN="$CACHE/$d/bin" go install -trimpath \
    -ldflags "-s -w -X main.Version=$VERSITYGW_VERSION -X main.Build=module -X main.BuildTime=$builddate" \
    "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
  touch "$(done_stamp $d)"
}

# Not part of the dev cluster: a peer the engine store benchmark (scripts/bench_store.py) measures against.
build_s5cmd() {
  local d="s5cmd-$S5CMD_VERSION"; [ -f "$(done_stamp $d)" ] && return 0
  echo "devcluster: building s5cmd $S5CMD_VERSION" >&2
  check_proxy "github.com/peak/s5cmd/v2@$S5CMD_VERSION"
  # A wrapper module, as for etcd: the proxy serves v2's versions but not its version list, which `go install
  # pkg@version` asks for (module deprecation).
  local w="$CACHE/$d/src"; new_module "$w" llmengine.dev/s5cmd
  (cd "$w" && go get "github.com/peak/s5cmd/v2@$S5CMD_VERSION" >/dev/null \
    && go build -trimpath -ldflags "-s -w -X github.com/peak/s5cmd/v2/version.Version=$S5CMD_VERSION -X github.com/peak/s5cmd/v2/version.GitCommit=module" \
      -o "$CACHE/$d/bin/s5cmd" github.com/peak/s5cmd/v2)
  rm -rf "$w"
  touch "$(done_stamp $d)"
}

build_kubernetes() {
  local d="kubernetes-$KUBERNETES_VERSION"; [ -f "$(done_stamp $d)" ] && return 0
  echo "devcluster: building kubernetes $KUBERNETES_VERSION (cold: 25-40 min on 2 cores)" >&2
  check_proxy "k8s.io/kubernetes@$KUBERNETES_VERSION"
  local w="$CACHE/$d/src"; new_module "$w" llmengine.dev/kubernetes
  local gomod staging_ver="v0${KUBERNETES_VERSION#v1}"
  gomod=$(cd "$w" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || die "could not download the go.mod of k8s.io/kubernetes@$KUBERNETES_VERSION"
  # Upstream replaces each staging module with ./staging/...; point those at the published tags instead.
  local mods
  mods=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")
  [ -n "$mods" ] || die "no staging replaces found in $gomod"
  (cd "$w" && for m in $mods; do go mod edit -replace "$m=$m@$staging_ver"; done)
  local pkgs="k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl"
  local minor; minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld="$ld -X $p.gitTreeState=clean -X $p.buildDate=$builddate -X $p.gitCommit=module"
  done
  # Pin every package to the release: an unversioned `go get` of a package would move to the newest k8s.
  (cd "$w" && go get "k8s.io/kubernetes@$KUBERNETES_VERSION" >/dev/null \
    && go get $(for p in $pkgs; do printf '%s@%s ' "$p" "$KUBERNETES_VERSION"; done) >/dev/null)
  for p in $pkgs; do
    (cd "$w" && go build -trimpath -ldflags "$ld" -o "$CACHE/$d/bin/$(basename "$p")" "$p")
  done
  touch "$(done_stamp $d)"
}

build_promtool() {
  local d="promtool-$PROMETHEUS_VERSION"; [ -f "$(done_stamp $d)" ] && return 0
  echo "devcluster: building promtool $PROMETHEUS_VERSION" >&2
  check_proxy "github.com/prometheus/prometheus@$PROMETHEUS_VERSION"
  # A wrapper module, as for etcd: `go install pkg@version` refuses a main module with replace/exclude directives.
  # remove_all_sd leaves out the cloud service-discovery plugins (most of the build): only rule checks are used.
  local w="$CACHE/$d/src"; new_module "$w" llmengine.dev/promtool
  local m="${PROMETHEUS_VERSION#v0.}" v; v="${m:0:1}.${m:1}"
  (cd "$w" && go get "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" >/dev/null \
    && go build -trimpath -tags remove_all_sd -ldflags "-s -w -X github.com/prometheus/common/version.Version=$v" \
      -o "$CACHE/$d/bin/promtool" github.com/prometheus/prometheus/cmd/promtool)
  rm -rf "$w"
  touch "$(done_stamp $d)"
}

# The Prometheus server, for the operator's `traffic.source: prometheus` tests (llmengine.dev.prometheus runs it).
# Built like promtool: remove_all_sd keeps only static and file service discovery (all the dev cluster needs), and
# without the builtinassets tag the web UI is left out; the HTTP API (/api/v1/query) is all the operator reads.
build_prometheus() {
  local d="prometheus-$PROMETHEUS_VERSION"; [ -f "$(done_stamp $d)" ] && return 0
  echo "devcluster: building prometheus $PROMETHEUS_VERSION" >&2
  check_proxy "github.com/prometheus/prometheus@$PROMETHEUS_VERSION"
  local w="$CACHE/$d/src"; new_module "$w" llmengine.dev/prometheus
  local m="${PROMETHEUS_VERSION#v0.}" v; v="${m:0:1}.${m:1}"
  (cd "$w" && go get "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION" >/dev/null \
    && go build -trimpath -tags remove_all_sd -ldflags "-s -w -X github.com/prometheus/common/version.Version=$v" \
      -o "$CACHE/$d/bin/prometheus" github.com/prometheus/prometheus/cmd/prometheus)
  rm -rf "$w"
  touch "$(done_stamp $d)"
}

# Not a binary: the CustomResourceDefinitions of the prometheus-operator, from its module's example/ directory.
build_monitoring-crds() {
  local d="monitoring-crds-$PROMETHEUS_OPERATOR_VERSION"; [ -f "$(done_stamp $d)" ] && return 0
  check_proxy "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION"
  local src
  src=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -d "$src/example/prometheus-operator-crd" ] || die "no example/prometheus-operator-crd in $src"
  mkdir -p "$CACHE/$d/crds"
  for k in servicemonitors podmonitors prometheusrules; do
    cp "$src/example/prometheus-operator-crd/monitoring.coreos.com_$k.yaml" "$CACHE/$d/crds/"
    chmod u+w "$CACHE/$d/crds/monitoring.coreos.com_$k.yaml"
  done
  touch "$(done_stamp $d)"
}

version_of() {
  case $1 in
    etcd) echo "$ETCD_VERSION" ;; kwok) echo "$KWOK_VERSION" ;; helm) echo "$HELM_VERSION" ;;
    versitygw) echo "$VERSITYGW_VERSION" ;; kubernetes) echo "$KUBERNETES_VERSION" ;;
    promtool|prometheus) echo "$PROMETHEUS_VERSION" ;; monitoring-crds) echo "$PROMETHEUS_OPERATOR_VERSION" ;;
    s5cmd) echo "$S5CMD_VERSION" ;;
  esac
}

# One progress line per component; the Go tool's own output goes to a log, shown (its end) only on failure.
all="etcd kwok helm versitygw kubernetes promtool prometheus monitoring-crds"
logs="$CACHE/logs"; mkdir -p "$logs"
for c in ${*:-$all}; do
  case $c in
    etcd|kwok|helm|versitygw|kubernetes|promtool|prometheus|monitoring-crds|s5cmd) ;;
    *) die "unknown component '$c' (choose from: $all)" ;;
  esac
  v=$(version_of "$c")
  [ -f "$(done_stamp "$c-$v")" ] && continue
  log="$logs/$c-$v.log"
  echo "devcluster: building $c $v from the Go module proxy (log: $log)" >&2
  start=$(date +%s)
  # Not `if ! ( ... )`: errexit is off inside a condition, and a failed step must not reach the stamp.
  set +e
  ( set -e; "build_$c" ) >"$log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "devcluster: building $c $v failed; the end of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  echo "devcluster: built $c $v in $(( $(date +%s) - start )) s" >&2
done
echo "$CACHE"
