#!/usr/bin/env bash
# raftkv against etcd the way etcd's own docs measure: etcd's `benchmark` tool (built from Go
# modules by e2e/cluster.sh build, as `etcd-benchmark`), 3 members each on loopback, auth on for
# every system (password login, as `benchmark --user` does), rows alternated between systems,
# several rounds. Reports ops/s, p50/p99/p99.9, server CPU seconds per 1 000 operations
# (utime+stime of the member processes) and RSS per member. Rows: put, linearizable and
# serializable range, txn-put, watch (events per second delivered to 1000 watchers), and put
# over a 10 000-key and a 1 000 000-key keyspace (the latter written in full once first, with
# the data on disk reported after).
#
#   bench/etcd-benchmark.sh                              # raftkv and etcd 3.6, 2 rounds
#   SYSTEMS="raftkv etcd-3.6 etcd-3.4" ROUNDS=3 TOTAL=20000 bench/etcd-benchmark.sh
#   OUT=bench/RESULTS.md bench/etcd-benchmark.sh        # also write the results file
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
export ROUNDS="${ROUNDS:-2}" TOTAL="${TOTAL:-20000}" VALUE_SIZE="${VALUE_SIZE:-256}"
export CLIENTS="${CLIENTS:-16 256}" WORKLOADS="${WORKLOADS:-put range-l range-s txn-put watch put-10k put-1m}"
export OUT="${OUT:-}"
exec python3 bench/etcd_benchmark.py
