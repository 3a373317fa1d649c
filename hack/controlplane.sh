#!/usr/bin/env bash
# controlplane.sh - a real Kubernetes v1.20.2 control plane (etcd + kube-apiserver +
# kube-controller-manager, optionally kube-scheduler) built from Debian bookworm's
# "kubernetes" source package with bookworm's Go 1.19; no container engine, no
# release downloads, no Go module proxy.
# Adapted for vk-provider from a measured reference: `make controlplane` builds it, the tests use it.
#
#   controlplane.sh build        build the binaries into $KTB_CACHE/bin (skips if built)
#   controlplane.sh up DIR       start etcd + apiserver + controller-manager on free
#                               127.0.0.1 ports, write DIR/kubeconfig and DIR/pids,
#                               wait until ready, print the kubeconfig path on stdout
#   controlplane.sh down DIR     stop exactly the processes listed in DIR/pids
#   controlplane.sh status DIR   show whether those processes are alive and /readyz
#   controlplane.sh env DIR      print shell exports (KUBECONFIG, PATH with kubectl)
#
# Environment knobs (all optional):
#   KTB_CACHE            cache dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/vk-provider/k8s-v1.20.2)
#   KTB_DEB_VERSION      Debian source version to build (default below; falls back to
#                        whatever bookworm carries when that exact version is gone)
#   KTB_GO               Go toolchain (default /usr/lib/go-1.19/bin/go from golang-1.19-go)
#   KTB_KEEP_BUILD=1     keep the unpacked source and Go build cache after `build`
#   KTB_SCHEDULER=1      `up` also starts kube-scheduler
#   KTB_NODE_NAME        node name for DIR/node.kubeconfig (default virtual-kubelet)
#   KTB_APISERVER_ARGS, KTB_KCM_ARGS, KTB_SCHEDULER_ARGS   extra flags (word-split)
#   KTB_TIMEOUT          seconds to wait for each component (default 90)
set -euo pipefail

KTB_K8S_VERSION=v1.20.2
KTB_DEB_VERSION=${KTB_DEB_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}
KTB_RECIPE=1   # bump when the build steps change, forces a rebuild
KTB_CACHE=${KTB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vk-provider/k8s-$KTB_K8S_VERSION}
KTB_BIN=$KTB_CACHE/bin
KTB_GO=${KTB_GO:-/usr/lib/go-1.19/bin/go}
KTB_TIMEOUT=${KTB_TIMEOUT:-90}
KTB_NODE_NAME=${KTB_NODE_NAME:-virtual-kubelet}
KTB_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
# Debian packages needed to build (golang-1.19-go) and to run (etcd-server, openssl, curl).
KTB_APT_PKGS=(golang-1.19-go golang-github-modern-go-reflect2-dev dpkg-dev etcd-server openssl curl ca-certificates)

log() { printf '[controlplane] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- build

ensure_packages() {
  local missing=() p
  for p in "${KTB_APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing Debian packages (run as root or install them): ${missing[*]}"
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
    apt-get update >&2
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
}

# apt-get source, using the system's deb-src entries when it has them, otherwise a
# private deb-src list for bookworm/main built from the mirror the system already uses
# for bookworm/main binaries (the system's apt configuration is not modified).
fetch_source() {
  local dl=$1 spec=$2
  mkdir -p "$dl"
  ( cd "$dl" && apt-get source --download-only "$spec" >&2 ) && return 0
  local uri aptdir=$KTB_CACHE/apt
  uri=$(apt-cache policy | awk '
      $3 == "bookworm/main" && $NF == "Packages" { u = $2; next }
      u != "" && /release/ && /n=bookworm,/ && /c=main/ { print u; exit }
      { u = "" }')
  [[ -n $uri ]] || die "apt-get source failed and no bookworm/main mirror found in 'apt-cache policy'"
  log "no usable deb-src entry; using a private deb-src list for $uri bookworm main"
  mkdir -p "$aptdir/lists/partial"
  printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s bookworm main\n' "$uri" >"$aptdir/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=$aptdir/none"
              -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache")
  mkdir -p "$aptdir/none" "$aptdir/cache/archives/partial"
  apt-get "${opts[@]}" update >&2
  ( cd "$dl" && apt-get "${opts[@]}" source --download-only "$spec" >&2 )
}

cmd_build() {
  local stamp=$KTB_CACHE/build.stamp want b
  want="recipe=$KTB_RECIPE deb=$KTB_DEB_VERSION"
  if [[ -f $stamp && $(cat "$stamp") == "$want"* ]]; then
    local ok=1
    for b in "${KTB_BINARIES[@]}"; do [[ -x $KTB_BIN/$b ]] || ok=0; done
    if [[ $ok == 1 ]]; then log "already built: $KTB_BIN ($(cat "$stamp"))"; return 0; fi
  fi
  ensure_packages
  [[ -x $KTB_GO ]] || die "Go toolchain not found at $KTB_GO"
  local t0=$SECONDS dl=$KTB_CACHE/download gopath=$KTB_CACHE/gopath
  local src=$gopath/src/k8s.io/kubernetes work=$KTB_CACHE/work

  # 1. source package
  if ! ls "$dl"/kubernetes_"${KTB_DEB_VERSION}".dsc >/dev/null 2>&1; then
    rm -rf "$dl"
    if ! fetch_source "$dl" "kubernetes=$KTB_DEB_VERSION"; then
      log "kubernetes=$KTB_DEB_VERSION not available; trying kubernetes/bookworm"
      rm -rf "$dl"; fetch_source "$dl" "kubernetes/bookworm"
    fi
  fi
  local dsc
  dsc=$(ls "$dl"/kubernetes_*.dsc | head -n1)
  [[ -f $dsc ]] || die "no .dsc downloaded into $dl"
  [[ $(basename "$dsc") == kubernetes_*really1.20.* || $(basename "$dsc") == kubernetes_1.20.* ]] \
    || die "unexpected source version $(basename "$dsc") (this script knows how to build 1.20.x)"

  # 2. unpack (applies Debian's patches) into a GOPATH layout: Kubernetes 1.20 builds
  #    in GOPATH mode (GO111MODULE=off), like its own hack/ scripts and debian/rules do;
  #    module mode with -mod=vendor fails with "updates to go.mod needed".
  rm -rf "$gopath" "$work"; mkdir -p "$gopath/src/k8s.io" "$work"
  log "unpacking $(basename "$dsc")"
  dpkg-source -x "$dsc" "$src" >&2

  # 3. fix: vendored github.com/modern-go/reflect2 v1.0.1 is broken on Go >= 1.18
  #    (kube-apiserver panics decoding any object with a map field); replace it with
  #    Debian's v1.0.2 source (same API).
  local r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [[ -f $r2/go_above_118.go ]] || die "$r2 lacks go_above_118.go (need golang-github-modern-go-reflect2-dev >= 1.0.2)"
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  mkdir -p "$src/vendor/github.com/modern-go/reflect2"
  cp "$r2"/*.go "$r2"/*.s "$src/vendor/github.com/modern-go/reflect2/"

  export GOPATH=$gopath GO111MODULE=off GOFLAGS='' GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0
  export GOCACHE=$KTB_CACHE/go-build GOTMPDIR=$work
  cd "$src"

  # 4. generate pkg/generated/openapi/zz_generated.openapi.go (not in the tarball; the
  #    upstream Makefile generates it). Same inputs as Makefile.generated_files' KUBE target.
  log "generating OpenAPI definitions"
  "$KTB_GO" build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  find -H . \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune -o -type f -name '*.go' -print \
    | sed 's|^\./staging/src|vendor|; s|^\./||' \
    | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
    | xargs grep --color=never -l '^// *+k8s:' \
    | xargs grep --color=never -l '+k8s:openapi-gen=' \
    | xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' >"$work/openapi-inputs"
  "$work/openapi-gen" --logtostderr -i "$(paste -sd, "$work/openapi-inputs")" \
    -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$work/openapi-violations.report" 2>"$work/openapi-gen.log" \
    || { cat "$work/openapi-gen.log" >&2; die "openapi-gen failed"; }
  if ! diff -q <(LC_ALL=C sort "$work/openapi-violations.report") <(LC_ALL=C sort api/api-rules/violation_exceptions.list) >/dev/null; then
    log "warning: OpenAPI rule-violation report differs from api/api-rules/violation_exceptions.list"
  fi

  # 5. build
  local ver=${KTB_K8S_VERSION#v} ldf="-s -w" p
  for p in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldf+=" -X $p.gitVersion=$KTB_K8S_VERSION -X $p.gitMajor=${ver%%.*} -X $p.gitMinor=$(cut -d. -f2 <<<"$ver") -X $p.gitTreeState=clean"
  done
  mkdir -p "$KTB_BIN"
  for b in "${KTB_BINARIES[@]}"; do
    local tb=$SECONDS
    log "go build ./cmd/$b"
    "$KTB_GO" build -trimpath -ldflags "$ldf" -o "$KTB_BIN/$b.new" "./cmd/$b"
    mv -f "$KTB_BIN/$b.new" "$KTB_BIN/$b"
    log "built $b in $((SECONDS - tb))s"
  done
  cd /
  printf '%s source=%s go=%s\n' "$want" "$(basename "$dsc")" "$("$KTB_GO" env GOVERSION)" >"$stamp"
  if [[ ${KTB_KEEP_BUILD:-0} != 1 ]]; then
    chmod -R u+w "$gopath" "$GOCACHE" 2>/dev/null || true
    rm -rf "$gopath" "$GOCACHE" "$work" "$KTB_CACHE/apt"
  fi
  log "done in $((SECONDS - t0))s: $KTB_BIN"
}

# ---------------------------------------------------------------- up / down

need_built() {
  local b
  for b in kube-apiserver kube-controller-manager; do
    [[ -x $KTB_BIN/$b ]] || die "$KTB_BIN/$b missing: run '$0 build' first"
  done
  command -v etcd >/dev/null || die "etcd not found (apt-get install etcd-server, or run '$0 build' as root)"
  command -v openssl >/dev/null || die "openssl not found"
  command -v curl >/dev/null || die "curl not found"
}

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd -P); }

# free_port VAR: set VAR to a port on 127.0.0.1 that nothing answers on now and
# that this run has not handed out yet.
KTB_USED_PORTS=" "
free_port() {
  local p i
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + RANDOM % 12000))
    [[ $KTB_USED_PORTS == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      KTB_USED_PORTS+="$p "
      printf -v "$1" '%s' "$p"; return 0
    fi
  done
  die "no free port found"
}

# pid alive and started by us for this DIR (guards against pid reuse)
ours() {
  local pid=$1 dir=$2
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir/"
}

gen_pki() {
  local pki=$1/pki
  [[ -f $pki/done && $(cat "$pki/done") == "pki-v2" ]] && return 0
  rm -rf "$pki"; mkdir -p "$pki"; chmod 700 "$pki"
  log "generating certificates in $pki"
  (
    cd "$pki"
    umask 077
    openssl genrsa -out ca.key 2048 2>/dev/null
    printf '[req]\ndistinguished_name=dn\nx509_extensions=v3\nprompt=no\n[dn]\nCN=vk-provider-cp-ca\n[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\n' >ca.cnf
    openssl req -x509 -new -key ca.key -days 3650 -sha256 -config ca.cnf -out ca.crt
    # name subject extendedKeyUsage [subjectAltName]
    leaf() {
      openssl genrsa -out "$1.key" 2048 2>/dev/null
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
      {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$3"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid:always"
        [[ -n ${4:-} ]] && echo "subjectAltName=$4"
      } >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA "${CA:-ca}.crt" -CAkey "${CA:-ca}.key" -CAcreateserial -days 3650 -sha256 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    printf '[req]\ndistinguished_name=dn\nx509_extensions=v3\nprompt=no\n[dn]\nCN=vk-provider-cp-front-proxy-ca\n[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\n' >fp-ca.cnf
    openssl genrsa -out front-proxy-ca.key 2048 2>/dev/null
    openssl req -x509 -new -key front-proxy-ca.key -days 3650 -sha256 -config fp-ca.cnf -out front-proxy-ca.crt
    leaf apiserver "/CN=kube-apiserver" serverAuth \
      "IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    leaf admin "/O=system:masters/CN=kubernetes-admin" clientAuth
    leaf kcm "/CN=system:kube-controller-manager" clientAuth
    leaf scheduler "/CN=system:kube-scheduler" clientAuth
    leaf apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
    leaf node "/O=system:nodes/CN=system:node:$KTB_NODE_NAME" clientAuth
    CA=front-proxy-ca leaf front-proxy-client "/CN=front-proxy-client" clientAuth
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    printf '%s,admin,admin,system:masters\n' "$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')" >tokens.csv
    echo pki-v2 >"done"
  )
}

write_kubeconfig() { # file server cert key
  local b64='base64 -w0'
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vk-provider-cp
  cluster:
    server: $2
    certificate-authority-data: $($b64 <"$KTB_DIR/pki/ca.crt")
users:
- name: user
  user:
    client-certificate-data: $($b64 <"$3")
    client-key-data: $($b64 <"$4")
contexts:
- name: vk-provider-cp
  context: {cluster: vk-provider-cp, user: user, namespace: default}
current-context: vk-provider-cp
EOF
  chmod 600 "$1"
}

start_bg() { # name cmd...
  local name=$1; shift
  setsid "$@" >"$KTB_DIR/logs/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$name $pid" >>"$KTB_DIR/pids"
  log "started $name (pid $pid), log: $KTB_DIR/logs/$name.log"
  LAST_PID=$pid
}

wait_for() { # name pid description command...
  local name=$1 pid=$2 what=$3 t0=$SECONDS; shift 3
  while ! "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$KTB_DIR/logs/$name.log" >&2 || true
      die "$name exited before $what"
    fi
    if ((SECONDS - t0 > KTB_TIMEOUT)); then
      tail -n 30 "$KTB_DIR/logs/$name.log" >&2 || true
      die "$name: no $what after ${KTB_TIMEOUT}s"
    fi
    sleep 0.2
  done
  log "$name: $what after $((SECONDS - t0))s"
}

all_alive() {
  local n p any=0
  [[ -f $KTB_DIR/pids ]] || return 1
  while read -r n p; do any=1; ours "$p" "$KTB_DIR" || return 1; done <"$KTB_DIR/pids"
  [[ $any == 1 ]]
}

stop_all() {
  local pids=() n p i
  [[ -f $KTB_DIR/pids ]] || return 0
  mapfile -t pids < <(tac "$KTB_DIR/pids")
  for i in "${pids[@]}"; do
    read -r n p <<<"$i"
    if ours "$p" "$KTB_DIR"; then
      kill -TERM "$p" 2>/dev/null || true
      for ((k = 0; k < 100; k++)); do ours "$p" "$KTB_DIR" || break; sleep 0.1; done
      if ours "$p" "$KTB_DIR"; then kill -KILL "$p" 2>/dev/null || true; fi
      log "stopped $n (pid $p)"
    fi
  done
  rm -f "$KTB_DIR/pids"
}

curl_ok() { # url expected-body [curl args...]
  local url=$1 want=$2; shift 2
  [[ $(curl -fsS --max-time 3 "$@" "$url" 2>/dev/null) == "$want" ]]
}

cmd_up() {
  [[ -n ${1:-} ]] || die "usage: $0 up DIR"
  need_built
  KTB_DIR=$(abs_dir "$1")
  if all_alive; then
    log "already up: $KTB_DIR/pids"
    echo "$KTB_DIR/kubeconfig"; return 0
  fi
  stop_all  # leftovers of a half-started or half-dead testbed
  local t0=$SECONDS
  mkdir -p "$KTB_DIR/logs" "$KTB_DIR/etcd" "$KTB_DIR/kcm-certs" "$KTB_DIR/scheduler-certs"
  chmod 700 "$KTB_DIR/etcd"
  gen_pki "$KTB_DIR"
  local pki=$KTB_DIR/pki
  KTB_UP_DONE=0
  trap '[[ $KTB_UP_DONE == 1 ]] || { log "up failed; stopping what was started"; stop_all; }' EXIT
  local etcd_port etcd_peer api_port kcm_port sch_port
  # A DIR that was up before gets the same ports back, so clients (an agent that kept running
  # across `down`/`up`, a kubeconfig already handed out) reconnect to the same address.
  if [[ -f $KTB_DIR/ports ]]; then
    read -r etcd_port etcd_peer api_port kcm_port sch_port <"$KTB_DIR/ports"
    local p
    for p in "$etcd_port" "$etcd_peer" "$api_port" "$kcm_port" "$sch_port"; do
      if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p (kept in $KTB_DIR/ports) is in use; rm $KTB_DIR/ports to pick new ones"; fi
    done
  else
    free_port etcd_port; free_port etcd_peer; free_port api_port; free_port kcm_port; free_port sch_port
    echo "$etcd_port $etcd_peer $api_port $kcm_port $sch_port" >"$KTB_DIR/ports"
  fi
  local api=https://127.0.0.1:$api_port
  : >"$KTB_DIR/pids"

  start_bg etcd etcd --name testbed --data-dir "$KTB_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "testbed=http://127.0.0.1:$etcd_peer" --logger zap --log-outputs stderr
  wait_for etcd "$LAST_PID" "/health" curl_ok "http://127.0.0.1:$etcd_port/health" '{"health":"true"}'

  # shellcheck disable=SC2086
  start_bg kube-apiserver "$KTB_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --secure-port "$api_port" --insecure-port 0 \
    --advertise-address 127.0.0.1 --endpoint-reconciler-type none \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
    --requestheader-client-ca-file "$pki/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key" \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=true --profiling=false \
    ${KTB_APISERVER_ARGS:-}
  local api_pid=$LAST_PID
  wait_for kube-apiserver "$api_pid" "/readyz" curl_ok "$api/readyz" ok --cacert "$pki/ca.crt"

  write_kubeconfig "$KTB_DIR/kubeconfig" "$api" "$pki/admin.crt" "$pki/admin.key"
  write_kubeconfig "$KTB_DIR/kcm.kubeconfig" "$api" "$pki/kcm.crt" "$pki/kcm.key"
  write_kubeconfig "$KTB_DIR/scheduler.kubeconfig" "$api" "$pki/scheduler.crt" "$pki/scheduler.key"
  write_kubeconfig "$KTB_DIR/node.kubeconfig" "$api" "$pki/node.crt" "$pki/node.key"

  # shellcheck disable=SC2086
  start_bg kube-controller-manager "$KTB_BIN/kube-controller-manager" \
    --kubeconfig "$KTB_DIR/kcm.kubeconfig" \
    --authentication-kubeconfig "$KTB_DIR/kcm.kubeconfig" --authorization-kubeconfig "$KTB_DIR/kcm.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --port 0 --cert-dir "$KTB_DIR/kcm-certs" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --profiling=false \
    ${KTB_KCM_ARGS:-}
  local kcm_pid=$LAST_PID
  wait_for kube-controller-manager "$kcm_pid" "/healthz" curl_ok "https://127.0.0.1:$kcm_port/healthz" ok -k

  if [[ ${KTB_SCHEDULER:-0} == 1 ]]; then
    [[ -x $KTB_BIN/kube-scheduler ]] || die "$KTB_BIN/kube-scheduler missing"
    # shellcheck disable=SC2086
    start_bg kube-scheduler "$KTB_BIN/kube-scheduler" \
      --kubeconfig "$KTB_DIR/scheduler.kubeconfig" \
      --authentication-kubeconfig "$KTB_DIR/scheduler.kubeconfig" --authorization-kubeconfig "$KTB_DIR/scheduler.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$sch_port" --port 0 --cert-dir "$KTB_DIR/scheduler-certs" \
      --leader-elect=false --profiling=false \
      ${KTB_SCHEDULER_ARGS:-}
    wait_for kube-scheduler "$LAST_PID" "/healthz" curl_ok "https://127.0.0.1:$sch_port/healthz" ok -k
  fi

  # The ServiceAccount admission plugin rejects pods until the namespace's "default"
  # ServiceAccount exists; wait for the controller-manager to create it in "default".
  wait_for kube-controller-manager "$kcm_pid" "default/default ServiceAccount" \
    curl -fsS --max-time 3 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "$api/api/v1/namespaces/default/serviceaccounts/default"
  KTB_UP_DONE=1

  cat >"$KTB_DIR/env" <<EOF
export KUBECONFIG=$KTB_DIR/kubeconfig
export KTB_DIR=$KTB_DIR
export KTB_API_URL=$api
export KTB_ADMIN_TOKEN=$(cut -d, -f1 "$pki/tokens.csv")
export KTB_CA_FILE=$pki/ca.crt
export KTB_NODE_KUBECONFIG=$KTB_DIR/node.kubeconfig
export KTB_ETCD_URL=http://127.0.0.1:$etcd_port
export PATH=$KTB_BIN:\$PATH
EOF
  log "ready in $((SECONDS - t0))s: $api (source $KTB_DIR/env for KUBECONFIG and kubectl)"
  echo "$KTB_DIR/kubeconfig"
}

cmd_down() {
  [[ -n ${1:-} ]] || die "usage: $0 down DIR"
  [[ -d $1 ]] || { log "no such dir $1; nothing to stop"; return 0; }
  KTB_DIR=$(cd "$1" && pwd -P)
  [[ -f $KTB_DIR/pids ]] || { log "no $KTB_DIR/pids; nothing to stop"; return 0; }
  stop_all
}

cmd_status() {
  [[ -n ${1:-} && -f $1/pids ]] || { echo "down"; return 1; }
  KTB_DIR=$(cd "$1" && pwd -P)
  local n p rc=0
  while read -r n p; do
    if ours "$p" "$KTB_DIR"; then echo "$n $p alive"; else echo "$n $p dead"; rc=1; fi
  done <"$KTB_DIR/pids"
  if [[ -f $KTB_DIR/env ]]; then
    # shellcheck disable=SC1091
    (source "$KTB_DIR/env"; echo "readyz: $(curl -fsS --max-time 3 --cacert "$KTB_CA_FILE" "$KTB_API_URL/readyz" 2>&1 || true)")
  fi
  return $rc
}

cmd_env() {
  [[ -n ${1:-} && -f $1/env ]] || die "no $1/env: run '$0 up $1' first"
  cat "$1/env"
}

case "${1:-}" in
  build) shift; cmd_build "$@" ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  env) shift; cmd_env "$@" ;;
  *) sed -n "2,28p" "$0" | sed "s|^# \{0,1\}||"; exit 2 ;;
esac
