#!/usr/bin/env bash
# Runs the same closed-loop workloads against a 3-member raftkv cluster and a 3-member etcd
# cluster (Debian's etcd-server), both on loopback on this machine, in one run, and prints a
# table with the raftkv/etcd ratio per row.
#
#   bench/compare.sh                     # 10s per measurement, 1/16/256 clients
#   DURATION=5s CLIENTS="16 256" bench/compare.sh
#   OUT=bench/RESULTS-kvctl.md bench/compare.sh   # also write the results file
#   ROUNDS=3 bench/compare.sh            # repeat the sweep; each row reports the median round
#
# Timing on a small shared machine drifts by tens of percent over minutes, so every row measures
# both systems back to back, alternating which goes first from round to round, and with ROUNDS > 1
# the table shows each system's median round and the ratio of every round.
#
# Both clusters fsync their logs (raftkv always does; etcd does by default). raftkv runs as
# `raftkv dev` does: JWT on every request and AES-256-GCM values; etcd runs without auth.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
install_packages

DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
CLIENTS="${CLIENTS:-1 16 256}"
WORKLOADS="${WORKLOADS:-put get get-serializable mixed}"
KEY_SPACE="${KEY_SPACE:-100000}"
VALUE_SIZE="${VALUE_SIZE:-256}"
OUT="${OUT:-}"
ROUNDS="${ROUNDS:-1}"

cargo build --release -q -p raftkv -p raftkv-client
RAFTKV="$CARGO_TARGET_DIR/release/raftkv"
KVCTL="$CARGO_TARGET_DIR/release/kvctl"

work="$(mktemp -d /tmp/raftkv-bench.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "==> starting raftkv (3 members)"
"$RAFTKV" dev --nodes 3 --data-dir "$work/raftkv" --base-port 23379 --no-sample >"$work/raftkv-dev.log" 2>&1 &
pids+=($!)
raftkv_eps="127.0.0.1:23379,127.0.0.1:23479,127.0.0.1:23579"

echo "==> starting etcd (3 members)"
initial="e1=http://127.0.0.1:33380,e2=http://127.0.0.1:33480,e3=http://127.0.0.1:33580"
for i in 1 2 3; do
    c=$((33379 + (i - 1) * 100)); p=$((c + 1))
    etcd --name "e$i" --data-dir "$work/etcd$i" \
        --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
        --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
        --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token bench \
        --log-level error >"$work/etcd$i.log" 2>&1 &
    pids+=($!)
done
etcd_eps="127.0.0.1:33379,127.0.0.1:33479,127.0.0.1:33579"

for _ in $(seq 1 120); do
    if [ -f "$work/raftkv/secrets/root-token" ] && ETCDCTL_API=3 etcdctl --endpoints="$etcd_eps" endpoint health >/dev/null 2>&1; then
        break
    fi
    sleep 0.5
done
token="$(cat "$work/raftkv/secrets/root-token")"

results="$work/results.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="raftkv etcd"; else order="etcd raftkv"; fi
    for workload in $WORKLOADS; do
        for n in $CLIENTS; do
            for system in $order; do
                if [ "$system" = raftkv ]; then eps="$raftkv_eps"; auth=(--token "$token"); else eps="$etcd_eps"; auth=(); fi
                echo "==> round $round/$ROUNDS: $system $workload, $n clients" >&2
                line="$("$KVCTL" --endpoints "$eps" "${auth[@]}" bench --workload "$workload" --clients "$n" \
                    --duration "$DURATION" --warmup "$WARMUP" --key-space "$KEY_SPACE" --value-size "$VALUE_SIZE" --json --quiet)"
                echo "{\"round\":$round,\"system\":\"$system\",\"result\":$line}" >>"$results"
            done
        done
    done
done

python3 - "$results" "$OUT" "$ROUNDS" "$DURATION" <<'PY'
import json, sys, platform, os, subprocess
rows = [json.loads(l) for l in open(sys.argv[1])]
rounds, duration = int(sys.argv[3]), sys.argv[4]
# (workload, clients) -> round -> system -> result
runs = {}
for r in rows:
    res = r["result"]
    runs.setdefault((res["workload"], res["clients"]), {}).setdefault(r["round"], {})[r["system"]] = res

def median_run(results):
    ordered = sorted(results, key=lambda x: x["ops_per_sec"])
    return ordered[(len(ordered) - 1) // 2]

def ratio(a, b):
    return a / b if b else float("inf")

by = {}
per_round = {}
for key, rs in runs.items():
    complete = [s for s in rs.values() if "raftkv" in s and "etcd" in s]
    if not complete:
        continue
    by[key] = {sys_: median_run([s[sys_] for s in complete]) for sys_ in ("raftkv", "etcd")}
    per_round[key] = [ratio(s["raftkv"]["ops_per_sec"], s["etcd"]["ops_per_sec"]) for s in complete]
cpu = ""
try:
    cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
except Exception:
    pass
lines = []
lines.append(f"Machine: {os.cpu_count()} CPUs ({cpu}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.platform()}")
etcd_v = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
lines.append(f"raftkv: 3 members, JWT auth + AES-256-GCM at rest, fsync on. etcd: {etcd_v}, 3 members, no auth, fsync on. Same machine, loopback, one run.")
lines.append(f"{duration} per measurement, {rounds} round(s); each row shows each system's median round (by ops/s), and the ops ratio of every round.")
lines.append("")
lines.append("| workload | clients | raftkv ops/s | etcd ops/s | ops ratio | ratio per round | raftkv p50 ms | etcd p50 ms | raftkv p99 ms | etcd p99 ms | p99 ratio | raftkv p999 ms | etcd p999 ms |")
lines.append("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for (w, c), s in sorted(by.items(), key=lambda kv: (["put","get","getserializable","mixed"].index(kv[0][0]) if kv[0][0] in ["put","get","getserializable","mixed"] else 9, kv[0][1])):
    r, e = s["raftkv"], s["etcd"]
    ops_ratio = ratio(r["ops_per_sec"], e["ops_per_sec"])
    p99r = ratio(r["p99_ms"], e["p99_ms"])
    each = " ".join(f"{x:.2f}" for x in per_round[(w, c)])
    lines.append(f"| {w} | {c} | {r['ops_per_sec']:.0f} | {e['ops_per_sec']:.0f} | {ops_ratio:.2f} | {each} | {r['p50_ms']:.2f} | {e['p50_ms']:.2f} | {r['p99_ms']:.2f} | {e['p99_ms']:.2f} | {p99r:.2f} | {r['p999_ms']:.2f} | {e['p999_ms']:.2f} |")
lines.append("")
lines.append("ops ratio = raftkv/etcd throughput (higher is better for raftkv); p99 ratio = raftkv/etcd p99 latency (lower is better for raftkv).")
text = "\n".join(lines)
print(text)
if sys.argv[2]:
    with open(sys.argv[2], "w") as f:
        f.write(f"# raftkv vs etcd: same machine, same run\n\nReproduce with `ROUNDS={rounds} OUT=bench/RESULTS-kvctl.md bench/compare.sh`.\n\n" + text + "\n")
PY
