#!/usr/bin/env bash
# raftkv against etcd the way etcd's own docs measure: etcd's `benchmark` tool (built from Go
# modules by e2e/cluster.sh build, as `etcd-benchmark`), 3 members each on loopback, auth on for
# every system (password login, as `benchmark --user` does), rows alternated between systems,
# several rounds. Reports ops/s, p50/p99/p99.9, server CPU seconds per 1 000 operations
# (utime+stime of the member processes) and RSS per member.
#
#   bench/etcd-benchmark.sh                              # raftkv and etcd 3.6, 2 rounds
#   SYSTEMS="raftkv etcd-3.6 etcd-3.4" ROUNDS=3 TOTAL=20000 bench/etcd-benchmark.sh
#   OUT=bench/RESULTS-etcd-benchmark.md bench/etcd-benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
export ROUNDS="${ROUNDS:-2}" TOTAL="${TOTAL:-20000}" VALUE_SIZE="${VALUE_SIZE:-256}"
export CLIENTS="${CLIENTS:-16 256}" WORKLOADS="${WORKLOADS:-put range-l range-s txn-put}"
export OUT="${OUT:-}"
exec python3 bench/etcd_benchmark.py
