# Shared by the bench scripts: what etcd's benchmark tool and a release raftkv need.
. scripts/lib.sh
install_packages
[ -x "$RAFTKV_BIN_CACHE/etcd-benchmark" ] || bash e2e/cluster.sh build
cargo build --release -q -p raftkv
export RAFTKV="$CARGO_TARGET_DIR/release/raftkv"
export BENCHMARK="$RAFTKV_BIN_CACHE/etcd-benchmark"
export SYSTEMS="${SYSTEMS:-raftkv etcd-3.6}"
