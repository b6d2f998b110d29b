"""Driver for bench/backup.sh: what a backup costs, measured the way an operator would see it.
Loads the same keyspace into raftkv and etcd 3.6 (3 members each, auth on), then per system:
write latency under etcd's benchmark tool alone, and again while `etcdctl snapshot save` runs;
the snapshot's size, time and MiB/s. Prints a markdown table."""

import os
import subprocess
import sys
import tempfile
import threading
import time

import etcd_benchmark as eb

SIZE_MIB = int(os.environ.get("SIZE_MIB", "1024"))
LOAD_VALUE = 16 << 10
ETCDCTL = {"raftkv": "etcdctl-3.6", "etcd-3.6": "etcdctl-3.6"}


def load(system):
    """SIZE_MIB of 16 KiB values under distinct keys, written by etcd's own tool."""
    n = SIZE_MIB * (1 << 20) // LOAD_VALUE
    base = [eb.BENCHMARK, "--endpoints", system.endpoints, "--user", f"root:{system.password}",
            "--conns", "16", "--clients", "16"]
    args = ["put", "--key-size", "16", "--sequential-keys", "--key-space-size", str(n),
            "--total", str(n), "--val-size", str(LOAD_VALUE)]
    t = time.time()
    out = subprocess.run(base + args, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loading {system.name} failed:\n{(out.stdout + out.stderr)[-2000:]}")
    print(f"==> {system.name}: loaded {SIZE_MIB} MiB in {time.time() - t:.0f}s", file=sys.stderr)


def snapshot(system, path, result):
    first = system.endpoints.split(",")[0]
    t = time.time()
    out = subprocess.run([ETCDCTL[system.name], "--endpoints", first, "--user", f"root:{system.password}",
                          "--command-timeout", "3600s", "snapshot", "save", path],
                         env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, text=True)
    result["seconds"] = time.time() - t
    result["ok"] = out.returncode == 0
    result["text"] = (out.stdout + out.stderr)[-1000:]
    result["bytes"] = os.path.getsize(path) if os.path.exists(path) else 0


def main():
    work = tempfile.mkdtemp(prefix="raftkv-backup-bench-")
    systems = []
    rows = []
    try:
        for s in eb.SYSTEMS:
            if s == "raftkv":
                systems.append(eb.Raftkv(work))
            elif s == "etcd-3.6":
                systems.append(eb.Etcd(work, "etcd-3.6", "etcdctl-3.6", s, 33379))
            else:
                raise SystemExit(f"unknown system {s}")
        for s in systems:
            load(s)
        for s in systems:
            quiet = eb.run_benchmark(s, "put", 16)
            result = {}
            path = os.path.join(work, f"{s.name}.snapshot")
            pids = s.pids()
            cpu0 = eb.cpu_seconds(pids)
            t = threading.Thread(target=snapshot, args=(s, path, result))
            t.start()
            busy = eb.run_benchmark(s, "put", 16)
            t.join()
            cpu = eb.cpu_seconds(pids) - cpu0
            if not result["ok"]:
                raise SystemExit(f"{s.name} snapshot failed: {result['text']}")
            rss = max(eb.rss_mib(p) for p in pids)
            rows.append((s.name, quiet, busy, result, cpu, rss))
            os.remove(path)
    finally:
        eb.stop_all(systems, work)
    lines = [f"{SIZE_MIB} MiB keyspace ({LOAD_VALUE >> 10} KiB values), 3 members on loopback, auth on. "
             f"Writes: etcd's benchmark put, {eb.TOTAL} requests, 16 clients, {eb.VALUE_SIZE}-byte values, "
             "alone and while `etcdctl snapshot save` streams from the first member. CPU: all members, "
             "during the loaded run (writes and snapshot together).", "",
             "| system | snapshot MiB | snapshot s | MiB/s | put ops/s alone | put ops/s during | "
             "p99 ms alone | p99 ms during | CPU s | max RSS MiB |", "|" + "---|" * 10]
    for name, quiet, busy, r, cpu, rss in rows:
        mib = r["bytes"] / (1 << 20)
        lines.append(f"| {name} | {mib:.0f} | {r['seconds']:.1f} | {mib / r['seconds']:.0f} | {quiet['ops']:.0f} | "
                     f"{busy['ops']:.0f} | {quiet['p99']:.1f} | {busy['p99']:.1f} | {cpu:.1f} | {rss:.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
