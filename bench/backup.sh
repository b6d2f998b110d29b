#!/usr/bin/env bash
# What a backup costs: raftkv and etcd 3.6 loaded with the same keyspace (SIZE_MIB, 16 KiB
# values), then write throughput and p99 under etcd's benchmark tool alone and while
# `etcdctl snapshot save` runs; snapshot size, time and MiB/s. Auth on for both.
#
#   bench/backup.sh                      # 1 GiB keyspace
#   SIZE_MIB=256 TOTAL=10000 bench/backup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
export ROUNDS=1 TOTAL="${TOTAL:-20000}" VALUE_SIZE="${VALUE_SIZE:-256}"
export CLIENTS=16 WORKLOADS=put SIZE_MIB="${SIZE_MIB:-1024}"
exec python3 bench/backup_bench.py
