#!/usr/bin/env bash
# The end-to-end tests' Kubernetes control plane on loopback:
#   e2e/cluster.sh build        build kube-apiserver, kube-controller-manager, kubectl, helm and the
#                               process kubelet from pinned Go modules (cached, warm = seconds)
#   e2e/cluster.sh up DIR       start the API server's store (a 3-member raftkv with client TLS
#                               and client-certificate identity; E2E_STORE=etcd for Debian's
#                               etcd instead), kube-apiserver (RBAC, service-account tokens,
#                               default admission), kube-controller-manager and the process
#                               kubelet; write DIR/kubeconfig; wait until healthy
#   e2e/cluster.sh down DIR     stop everything started by `up DIR`
# Binaries: $RAFTKV_CACHE/bin (default ~/.cache/raftkv/bin). Ports: $E2E_PORT_BASE (default
# 16443) for the API server, +1.. for etcd and the controller manager, +10.. for the raftkv
# store's members (client, peer, metrics per member).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${RAFTKV_CACHE:-$HOME/.cache/raftkv}"
bin="$cache/bin"
export GOPATH="$cache/go" GOMODCACHE="$cache/go/pkg/mod" GOCACHE="$cache/go-build" GOFLAGS=-mod=mod
base="${E2E_PORT_BASE:-16443}"
api_port=$base
etcd_port=$((base + 1))
etcd_peer=$((base + 2))
kcm_port=$((base + 3))
store="${E2E_STORE:-raftkv}"

log() { echo "e2e: $*" >&2; }

build() {
  mkdir -p "$bin"
  # The version the API server reports (helm checks charts' kubeVersion against it).
  local v=k8s.io/component-base/version
  local ld="-X $v.gitVersion=v1.36.3 -X $v.gitMajor=1 -X $v.gitMinor=36 -X $v.gitTreeState=clean"
  (cd "$here/tools" && go build -ldflags "$ld" -o "$bin/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl)
  (cd "$here/tools/helm" && go build -o "$bin/" helm.sh/helm/v3/cmd/helm)
  (cd "$here" && go build -o "$bin/e2e-kubelet" ./kubelet)
  (cd "$here/s3server" && go build -o "$bin/e2e-s3" .)
  # etcd 3.6, its etcdctl and etcd's benchmark tool, for the comparison tests and bench/ (Debian ships 3.4).
  (cd "$here/../bench/etcd" && go build -o "$bin/etcd-3.6" ./cmd/etcd && go build -o "$bin/etcdctl-3.6" ./cmd/etcdctl && go build -o "$bin/etcd-benchmark" ./cmd/benchmark)
}

certs() {
  local d=$1
  mkdir -p "$d/pki"
  cd "$d/pki"
  [ -f ca.crt ] && return 0
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj "/CN=e2e-ca" 2>/dev/null
  cat > san.cnf <<EOF
[req]
distinguished_name=dn
[dn]
[ext]
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
[client]
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 2 -extfile san.cnf -extensions ext 2>/dev/null
  for who in "admin:/O=system:masters/CN=e2e-admin" "kcm:/CN=system:kube-controller-manager" "kubelet:/O=system:masters/CN=e2e-kubelet"; do
    local name=${who%%:*} subj=${who#*:}
    openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$name.crt" -days 2 -extfile san.cnf -extensions client 2>/dev/null
  done
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cd - >/dev/null
}

kubeconfig() {
  local d=$1 name=$2
  cat > "$d/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $d/pki/ca.crt
users:
- name: $name
  user:
    client-certificate: $d/pki/$name.crt
    client-key: $d/pki/$name.key
contexts:
- name: e2e
  context: {cluster: e2e, user: $name}
current-context: e2e
EOF
}

start() {
  local d=$1 name=$2
  shift 2
  "$@" > "$d/logs/$name.log" 2>&1 &
  echo $! > "$d/pids/$name"
}

# The raftkv store: 3 members on loopback, TLS on client and peer ports with certificates from
# their own CA, the API server identified by its client certificate (CN kube-apiserver, a user
# with the root role), values encrypted at rest. Prints the --etcd-* flags for the API server.
raftkv_port() { echo $((base + 10 + 3 * ($1 - 1) + $2)); }

raftkv_store() {
  local d=$1 raftkv=${RAFTKV_BIN:?set RAFTKV_BIN to the raftkv binary}
  local pki="$d/store-pki" initial="" eps=""
  mkdir -p "$pki"
  if [ ! -f "$pki/ca.crt" ]; then
    "$raftkv" certs ca --dir "$pki" --name "e2e store CA" >/dev/null
    for i in 1 2 3; do
      "$raftkv" certs member --dir "$pki" --name "member-$i" --host 127.0.0.1 --host localhost >/dev/null
    done
    "$raftkv" certs client --dir "$pki" --user kube-apiserver >/dev/null
    "$raftkv" certs client --dir "$pki" --user root >/dev/null
    head -c 32 /dev/urandom | base64 > "$pki/jwt-secret"
    head -c 18 /dev/urandom | base64 > "$pki/root-password"
    "$raftkv" keyring new "$pki/keyring.json" >/dev/null
  fi
  for i in 1 2 3; do
    initial="$initial${initial:+,}$i=https://127.0.0.1:$(raftkv_port $i 1)"
    eps="$eps${eps:+,}https://127.0.0.1:$(raftkv_port $i 0)"
  done
  echo "$eps" > "$d/store-endpoints"
  for i in 1 2 3; do
    start_raftkv_member "$d" "$i" "$initial"
  done
  local t=0
  # The root user exists once the cluster formed; then the API server's user is made.
  until etcdctl_store "$pki" "$eps" user get root >/dev/null 2>&1; do
    t=$((t + 1))
    if [ $t -gt 60 ]; then log "the raftkv store did not come up; see $d/logs/raftkv-*.log"; tail -5 "$d"/logs/raftkv-*.log >&2; exit 1; fi
    sleep 0.5
  done
  if ! etcdctl_store "$pki" "$eps" user get kube-apiserver >/dev/null 2>&1; then
    etcdctl_store "$pki" "$eps" user add "kube-apiserver:$(head -c 18 /dev/urandom | base64)" --interactive=false >/dev/null
    etcdctl_store "$pki" "$eps" user grant-role kube-apiserver root >/dev/null
  fi
  echo "--etcd-servers $eps --etcd-cafile $pki/ca.crt --etcd-certfile $pki/kube-apiserver.crt --etcd-keyfile $pki/kube-apiserver.key"
}

start_raftkv_member() {
  local d=$1 i=$2 initial=$3 pki="$1/store-pki" raftkv=${RAFTKV_BIN:?set RAFTKV_BIN to the raftkv binary}
  start "$d" "raftkv-$i" "$raftkv" serve --id "$i" --name "store-$i" --data-dir "$d/raftkv-$i" \
    --listen-client "127.0.0.1:$(raftkv_port $i 0)" --listen-peer "127.0.0.1:$(raftkv_port $i 1)" \
    --listen-metrics "127.0.0.1:$(raftkv_port $i 2)" \
    --advertise-client "https://127.0.0.1:$(raftkv_port $i 0)" --advertise-peer "https://127.0.0.1:$(raftkv_port $i 1)" \
    --initial-cluster "$initial" --cluster-token e2e-store \
    --client-cert-file "$pki/member-$i.crt" --client-key-file "$pki/member-$i.key" --client-trusted-ca-file "$pki/ca.crt" \
    --peer-cert-file "$pki/member-$i.crt" --peer-key-file "$pki/member-$i.key" --peer-trusted-ca-file "$pki/ca.crt" \
    --jwt-secret-file "$pki/jwt-secret" --encryption-keyring-file "$pki/keyring.json" \
    --initial-root-password-file "$pki/root-password"
}

# etcdctl as raftkv's root, identified by its client certificate.
etcdctl_store() {
  local pki=$1 eps=$2
  shift 2
  ETCDCTL_API=3 etcdctl --endpoints "$eps" --cacert "$pki/ca.crt" --cert "$pki/root.crt" --key "$pki/root.key" \
    --dial-timeout 2s --command-timeout 3s "$@"
}

up() {
  local d
  d=$(mkdir -p "$1" && cd "$1" && pwd)
  mkdir -p "$d/logs" "$d/pids"
  for b in kube-apiserver kube-controller-manager kubectl e2e-kubelet helm; do
    [ -x "$bin/$b" ] || { log "missing $bin/$b: run e2e/cluster.sh build"; exit 1; }
  done
  certs "$d"
  for n in admin kcm kubelet; do kubeconfig "$d" $n; done
  cp "$d/admin.kubeconfig" "$d/kubeconfig"
  local store_flags
  if [ "$store" = etcd ]; then
    start "$d" etcd etcd --name e2e --data-dir "$d/etcd" \
      --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
      --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
      --initial-cluster "e2e=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync
    store_flags="--etcd-servers http://127.0.0.1:$etcd_port"
  else
    store_flags=$(raftkv_store "$d")
  fi
  echo "$store" > "$d/store"
  # shellcheck disable=SC2086
  start "$d" kube-apiserver "$bin/kube-apiserver" \
    $store_flags \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode RBAC \
    --client-ca-file "$d/pki/ca.crt" \
    --tls-cert-file "$d/pki/apiserver.crt" --tls-private-key-file "$d/pki/apiserver.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$d/pki/sa.pub" --service-account-signing-key-file "$d/pki/sa.key" \
    --allow-privileged=false --profiling=false --event-ttl 45s \
    --watch-cache-sizes podtemplates#0
  local t=0
  until "$bin/kubectl" --kubeconfig "$d/kubeconfig" get --raw /readyz >/dev/null 2>&1; do
    t=$((t + 1))
    if [ $t -gt 120 ]; then log "kube-apiserver did not become ready; see $d/logs/kube-apiserver.log"; tail -20 "$d/logs/kube-apiserver.log" >&2; exit 1; fi
    sleep 0.5
  done
  start "$d" kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$d/kcm.kubeconfig" --authentication-kubeconfig "$d/kcm.kubeconfig" --authorization-kubeconfig "$d/kcm.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
    --use-service-account-credentials \
    --service-account-private-key-file "$d/pki/sa.key" --root-ca-file "$d/pki/ca.crt" \
    --cluster-signing-cert-file "$d/pki/ca.crt" --cluster-signing-key-file "$d/pki/ca.key" \
    --controllers '*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller' \
    --node-monitor-grace-period 60s
  start "$d" kubelet "$bin/e2e-kubelet" --kubeconfig "$d/kubelet.kubeconfig" --state-dir "$d/node" \
    --apiserver-port "$api_port" \
    --bin "raftkv=${RAFTKV_BIN:?set RAFTKV_BIN to the raftkv binary}" \
    --bin "raftkv-operator=${RAFTKV_OPERATOR_BIN:?set RAFTKV_OPERATOR_BIN to the operator binary}"
  t=0
  until "$bin/kubectl" --kubeconfig "$d/kubeconfig" get serviceaccount default -n default >/dev/null 2>&1 \
     && "$bin/kubectl" --kubeconfig "$d/kubeconfig" get node e2e-node >/dev/null 2>&1; do
    t=$((t + 1))
    if [ $t -gt 120 ]; then log "control plane not ready; see $d/logs"; exit 1; fi
    sleep 0.5
  done
  log "control plane up: KUBECONFIG=$d/kubeconfig"
}

down() {
  local d=$1
  [ -d "$d/pids" ] || return 0
  for n in kubelet kube-controller-manager kube-apiserver etcd raftkv-1 raftkv-2 raftkv-3; do
    [ -f "$d/pids/$n" ] || continue
    local pid
    pid=$(cat "$d/pids/$n")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$d/pids/$n"
  done
}

# Stops (SIGKILL) or starts again one member of the raftkv store, for scenarios that take a
# member away from under the API server.
store_member() {
  local d=$1 i=$2 action=$3
  case "$action" in
    kill)
      [ -f "$d/pids/raftkv-$i" ] && kill -9 "$(cat "$d/pids/raftkv-$i")" 2>/dev/null || true
      rm -f "$d/pids/raftkv-$i" ;;
    start)
      local pki="$d/store-pki" initial=""
      for j in 1 2 3; do initial="$initial${initial:+,}$j=https://127.0.0.1:$(raftkv_port $j 1)"; done
      start_raftkv_member "$d" "$i" "$initial" ;;
  esac
}

case "${1:-}" in
  build) build ;;
  up) up "${2:?directory}" ;;
  down) down "${2:?directory}" ;;
  store-member) store_member "${2:?directory}" "${3:?member 1-3}" "${4:?kill|start}" ;;
  etcdctl) d=${2:?directory}; shift 2; etcdctl_store "$d/store-pki" "$(cat "$d/store-endpoints")" "$@" ;;
  *) echo "usage: $0 build | up DIR | down DIR | store-member DIR N kill|start | etcdctl DIR ARGS..." >&2; exit 2 ;;
esac
