#!/usr/bin/env bash
# Runs every test: installs what the build and the tests need (Debian packages, Go tools for
# the Kubernetes control plane), then the whole suite with one test runner. Exits non-zero if
# any test fails. Caches live under ~/.cache/raftkv so repeated runs are warm.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
install_packages
started=$(date +%s)
echo "==> building the Kubernetes control plane for the e2e tests (Go modules, cached)"
bash e2e/cluster.sh build
echo "==> building"
cargo build --workspace --all-targets
echo "==> build took $(( $(date +%s) - started ))s"
exec cargo test --workspace --no-fail-fast "$@"
