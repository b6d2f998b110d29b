# Shared by the project's scripts: cache locations outside the clone, and system packages.
# Sourced, not run.

export RAFTKV_CACHE="${RAFTKV_CACHE:-$HOME/.cache/raftkv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$RAFTKV_CACHE/target}"
export RAFTKV_BIN_CACHE="${RAFTKV_BIN_CACHE:-$RAFTKV_CACHE/bin}"
export GOPATH="$RAFTKV_CACHE/go"
export GOMODCACHE="$GOPATH/pkg/mod"
export GOCACHE="$RAFTKV_CACHE/go-build"
export GOFLAGS="${GOFLAGS:--mod=mod}"
export PATH="$HOME/.cargo/bin:$RAFTKV_BIN_CACHE:$PATH"
mkdir -p "$RAFTKV_CACHE" "$RAFTKV_BIN_CACHE"

# Debian packages the build and the tests need:
#   libclang-dev, clang   RocksDB's bindings are generated with libclang
#   protobuf-compiler     protoc, for the .proto files
#   etcd-server/-client   real etcd and etcdctl for compatibility tests and benchmarks
#   prometheus            promtool and a real Prometheus server for the observability tests
#   openssl, util-linux   certificates and mount namespaces for the e2e Kubernetes control plane
#   curl                  raw HTTP/2 requests in the edge tests
#   iproute2              network namespaces for the robustness suite's partitions
RAFTKV_APT_PACKAGES="libclang-dev clang protobuf-compiler etcd-server etcd-client prometheus openssl util-linux curl iproute2"

need_packages() {
    local missing=""
    for p in $RAFTKV_APT_PACKAGES; do
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
    done
    echo "$missing"
}

install_packages() {
    local missing
    missing="$(need_packages)"
    if [ -n "$missing" ]; then
        echo "==> installing Debian packages:$missing"
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        export DEBIAN_FRONTEND=noninteractive
        $sudo apt-get update -qq
        # shellcheck disable=SC2086
        $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
}
