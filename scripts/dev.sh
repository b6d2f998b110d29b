#!/usr/bin/env bash
# Runs raftkv locally: installs what the build needs, builds the release binary, and starts
# `raftkv dev` (a secure 3-member cluster on loopback). Extra arguments go to `raftkv dev`,
# e.g. ./scripts/dev.sh --nodes 5 --data-dir /tmp/raftkv
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
install_packages
# The dev profile (dependencies optimized) shares its build with the test suite.
cargo build -p raftkv -p raftkv-client
exec "$CARGO_TARGET_DIR/debug/raftkv" dev "$@"
