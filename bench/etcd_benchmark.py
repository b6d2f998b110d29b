"""Driver for bench/etcd-benchmark.sh: starts each system's 3 members, runs etcd's benchmark
tool against them row by row (systems alternated, several rounds) and prints a markdown table
of medians with raftkv/etcd ratios."""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RAFTKV = os.environ["RAFTKV"]
BENCHMARK = os.environ["BENCHMARK"]
SYSTEMS = os.environ["SYSTEMS"].split()
ROUNDS = int(os.environ["ROUNDS"])
TOTAL = int(os.environ["TOTAL"])
VALUE_SIZE = int(os.environ["VALUE_SIZE"])
CLIENTS = [int(c) for c in os.environ["CLIENTS"].split()]
WORKLOADS = os.environ["WORKLOADS"].split()
OUT = os.environ.get("OUT", "")
PASSWORD = "bench-root-pw"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def rss_mib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait_for(cond, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise SystemExit(f"timed out waiting for {what}")


class Raftkv:
    name = "raftkv"

    def __init__(self, work):
        self.dir = os.path.join(work, "raftkv")
        self.log = open(os.path.join(work, "raftkv.log"), "w")
        self.proc = subprocess.Popen(
            [RAFTKV, "dev", "--nodes", "3", "--data-dir", self.dir, "--base-port", "23379", "--no-sample"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.endpoints = "127.0.0.1:23379,127.0.0.1:23479,127.0.0.1:23579"
        token = os.path.join(self.dir, "secrets", "root-token")
        wait_for(lambda: os.path.exists(token), "raftkv dev")
        self.password = open(os.path.join(self.dir, "secrets", "root-password")).read().strip()
        wait_for(lambda: subprocess.run(
            ["etcdctl", "--endpoints", self.endpoints, "--user", f"root:{self.password}", "put", "ready", "1"],
            env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True).returncode == 0, "raftkv writes")

    def pids(self):
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def disk_mib(self):
        return du_mib(self.dir, self.name)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Etcd:
    def __init__(self, work, binary, ctl, name, base):
        self.name = name
        self.work = work
        self.password = PASSWORD
        self.procs = []
        initial = ",".join(f"e{i}=http://127.0.0.1:{base + i * 100 + 1}" for i in range(3))
        self.endpoints = ",".join(f"127.0.0.1:{base + i * 100}" for i in range(3))
        for i in range(3):
            c, p = base + i * 100, base + i * 100 + 1
            log = open(os.path.join(work, f"{name}-{i}.log"), "w")
            self.procs.append(subprocess.Popen(
                [binary, "--name", f"e{i}", "--data-dir", os.path.join(work, f"{name}-{i}"),
                 "--listen-client-urls", f"http://127.0.0.1:{c}", "--advertise-client-urls", f"http://127.0.0.1:{c}",
                 "--listen-peer-urls", f"http://127.0.0.1:{p}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
                 "--initial-cluster", initial, "--initial-cluster-state", "new", "--initial-cluster-token", name,
                 "--log-level", "error"], stdout=log, stderr=subprocess.STDOUT))
        env = {**os.environ, "ETCDCTL_API": "3"}
        ctl = [ctl, "--endpoints", self.endpoints]
        wait_for(lambda: subprocess.run(ctl + ["endpoint", "health"], env=env, capture_output=True).returncode == 0, name)
        for args in (["user", "add", f"root:{PASSWORD}"], ["user", "grant-role", "root", "root"], ["auth", "enable"]):
            subprocess.run(ctl + args, env=env, check=True, capture_output=True)

    def pids(self):
        return [p.pid for p in self.procs]

    def disk_mib(self):
        return du_mib(self.work, self.name)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=30)


# The big keyspace: the put-1m row writes over this many keys, after they were all written once.
BIG_KEYSPACE = int(os.environ.get("BIG_KEYSPACE", "1000000"))
# The watch row: 1000 watchers (10 streams of 100) on 10 keys, each key watched 100 times, so
# every put is 100 events delivered.
WATCH_ARGS = ["--streams", "10", "--watch-per-stream", "100", "--watched-key-total", "10",
              "--key-space-size", "10"]


def benchmark_base(system, clients):
    conns = min(clients, 100)
    return [BENCHMARK, "--endpoints", system.endpoints, "--user", f"root:{system.password}",
            "--conns", str(conns), "--clients", str(clients)]


def put_args(keyspace, total, sequential=False):
    return (["put", "--key-size", "8", "--key-space-size", str(keyspace), "--total", str(total),
             "--val-size", str(VALUE_SIZE)] + (["--sequential-keys"] if sequential else []))


def run_benchmark(system, workload, clients):
    base = benchmark_base(system, clients)
    if workload == "put":
        args = put_args(100000, TOTAL, sequential=True)
    elif workload == "put-10k":
        args = put_args(10000, TOTAL)
    elif workload == "put-1m":
        fill_keyspace(system)
        args = put_args(BIG_KEYSPACE, TOTAL)
    elif workload in ("range-l", "range-s"):
        args = ["range", "bench-range-key", "--consistency", workload[-1], "--total", str(TOTAL)]
    elif workload == "txn-put":
        args = ["txn-put", "--key-size", "8", "--key-space-size", "100000",
                "--total", str(TOTAL), "--val-size", str(VALUE_SIZE)]
    elif workload == "watch":
        # TOTAL events: a hundredth of that in puts, each delivered to 100 watchers.
        args = ["watch"] + WATCH_ARGS + ["--put-total", str(max(TOTAL // 100, 10))]
    else:
        raise SystemExit(f"unknown workload {workload}")
    pids = system.pids()
    cpu0 = cpu_seconds(pids)
    out = subprocess.run(base + args, capture_output=True, text=True)
    cpu = cpu_seconds(pids) - cpu0
    text = out.stdout + out.stderr
    if workload == "watch":
        # Two summaries: watch creation, then events received (what the row reports).
        text = text.split("Watch events received summary", 1)[-1]
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    took = re.search(r"Total:\s+([\d.]+) secs", text)
    if out.returncode != 0 or not rps:
        raise SystemExit(f"benchmark failed on {system.name} {workload}:\n{text[-2000:]}")
    done = float(rps.group(1)) * float(took.group(1)) if took else TOTAL
    lat = {m.group(1): float(m.group(2)) * 1000 for m in re.finditer(r"([\d.]+)% in ([\d.]+) secs", text)}
    return {"ops": float(rps.group(1)), "p50": lat.get("50", 0), "p99": lat.get("99", 0),
            "p999": lat.get("99.9", 0), "cpu_per_1k": cpu / max(done, 1) * 1000,
            "cpu": cpu, "done": done}


def login_cpu(system, clients):
    """The members' CPU for what every row starts with: each of the benchmark's connections
    logging in (a bcrypt check each, unless the server remembers the password), measured as a
    run of one serializable read per client. The second of two such runs is what counts: the
    first login of a password may cost more than the ones every later row makes."""
    pids = system.pids()
    for _ in range(2):
        cpu0 = cpu_seconds(pids)
        out = subprocess.run(benchmark_base(system, clients) +
                             ["range", "bench-range-key", "--consistency", "s", "--total", str(clients)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"login run failed on {system.name}:\n{(out.stdout + out.stderr)[-2000:]}")
        cpu = cpu_seconds(pids) - cpu0
    return cpu


FILLED = {}


def fill_keyspace(system):
    """Writes every key of the big keyspace once (256 clients), the first time a system needs it;
    records how fast, and the data on disk afterwards."""
    if system.name in FILLED:
        return
    print(f"==> {system.name}: writing {BIG_KEYSPACE} keys", file=sys.stderr)
    started = time.time()
    out = subprocess.run(benchmark_base(system, 256) + put_args(BIG_KEYSPACE, BIG_KEYSPACE, sequential=True),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"filling {system.name} failed:\n{(out.stdout + out.stderr)[-2000:]}")
    took = time.time() - started
    time.sleep(5)  # let flushes settle before sizing
    FILLED[system.name] = {"ops": BIG_KEYSPACE / took, "disk": system.disk_mib(),
                           "rss": [round(rss_mib(p)) for p in system.pids()]}


def seed(system):
    env = {**os.environ, "ETCDCTL_API": "3"}
    subprocess.run(["etcdctl", "--endpoints", system.endpoints.split(",")[0], "--user", f"root:{system.password}",
                    "put", "bench-range-key", "x" * VALUE_SIZE], env=env, check=True, capture_output=True)


def main():
    work = tempfile.mkdtemp(prefix="raftkv-etcd-bench-")
    systems = []
    try:
        for s in SYSTEMS:
            if s == "raftkv":
                systems.append(Raftkv(work))
            elif s == "etcd-3.6":
                systems.append(Etcd(work, "etcd-3.6", "etcdctl-3.6", s, 33379))
            elif s == "etcd-3.4":
                systems.append(Etcd(work, "etcd", "etcdctl", s, 43379))
            else:
                raise SystemExit(f"unknown system {s}")
        for s in systems:
            seed(s)
        results = {}
        logins = {}
        for rnd in range(ROUNDS):
            order = systems if rnd % 2 == 0 else list(reversed(systems))
            for c in CLIENTS:
                for s in order:
                    logins.setdefault((c, s.name), []).append(login_cpu(s, c))
            for w in WORKLOADS:
                for c in CLIENTS:
                    for s in order:
                        print(f"==> round {rnd + 1}/{ROUNDS}: {s.name} {w} {c} clients", file=sys.stderr)
                        results.setdefault((w, c, s.name), []).append(run_benchmark(s, w, c))
        rss = {s.name: [round(rss_mib(p)) for p in s.pids()] for s in systems}
        sizes = {s.name: s.disk_mib() for s in systems}
        report(results, systems, rss, sizes, logins)
    finally:
        stop_all(systems, work)


def stop_all(systems, work):
    for s in systems:
        try:
            s.stop()
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            print(f"stopping {s.name}: {e}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)


def du_mib(path, name):
    total = 0
    for root, _, files in os.walk(path):
        if name != "raftkv" and name not in root:
            continue
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return round(total / (1 << 20))


def median(rs, key):
    return statistics.median(r[key] for r in rs)


def report(results, systems, rss, sizes, logins):
    names = [s.name for s in systems]
    others = [n for n in names if n != "raftkv"]
    lines = [f"etcd's benchmark tool, {TOTAL} requests per row, {VALUE_SIZE}-byte values, 3 members per system on "
             f"loopback, auth on (password login), median of {ROUNDS} rounds; CPU is the members' utime+stime "
             "per 1 000 operations, first as measured (each row starts with every connection logging in: "
             f"{', '.join(str(min(c, 100)) for c in CLIENTS)} logins), then without those logins (a run of one "
             "read per client, measured separately, subtracted).", ""]
    head = "| workload | clients | " + " | ".join(
        f"{n} ops/s | {n} p50/p99/p99.9 ms | {n} CPU s/1k ops | {n} CPU excl. logins" for n in names)
    head += "".join(f" | raftkv/{o} ops/s | raftkv/{o} CPU/op | raftkv/{o} CPU/op excl. logins" for o in others) + " |"
    lines += [head, "|" + "---|" * (2 + 4 * len(names) + 3 * len(others))]

    def net(rs, n, c):
        login = statistics.median(logins[(c, n)])
        return statistics.median(max(r["cpu"] - login, 0) / max(r["done"], 1) * 1000 for r in rs)

    for w in WORKLOADS:
        for c in CLIENTS:
            row = f"| {w} | {c} |"
            med = {n: results[(w, c, n)] for n in names}
            for n in names:
                row += (f" {median(med[n], 'ops'):.0f} | {median(med[n], 'p50'):.1f}/{median(med[n], 'p99'):.1f}/"
                        f"{median(med[n], 'p999'):.1f} | {median(med[n], 'cpu_per_1k'):.3f} | {net(med[n], n, c):.3f} |")
            for o in others:
                if "raftkv" in med:
                    net_o = net(med[o], o, c)
                    row += (f" {median(med['raftkv'], 'ops') / median(med[o], 'ops'):.2f} |"
                            f" {median(med['raftkv'], 'cpu_per_1k') / median(med[o], 'cpu_per_1k'):.2f} |"
                            f" {net(med['raftkv'], 'raftkv', c) / net_o if net_o else float('nan'):.2f} |")
            lines.append(row)
    lines += ["", "CPU of the logins alone (s, median): " + "; ".join(
        f"{n} {c} clients {statistics.median(logins[(c, n)]):.2f}" for n in names for c in CLIENTS)]
    lines += ["", "Resident memory per member after the run (MiB): " +
              "; ".join(f"{n} {rss[n]}" for n in names),
              "Data on disk after the run (MiB): " + "; ".join(f"{n} {sizes[n]}" for n in names)]
    if FILLED:
        lines += ["", f"Writing the {BIG_KEYSPACE} keys of the put-1m row once ({VALUE_SIZE}-byte values, 256 clients): " +
                  "; ".join(f"{n} {f['ops']:.0f} puts/s, {f['disk']} MiB on disk after, RSS {f['rss']} MiB"
                            for n, f in FILLED.items())]
    if "watch" in WORKLOADS:
        lines += ["", "The watch row counts events delivered per second (1000 watchers on 10 keys, 100 per key); "
                  "its CPU is per 1k events."]
    text = "\n".join(lines)
    print(text)
    if OUT:
        with open(OUT, "w") as f:
            f.write("# raftkv and etcd under etcd's benchmark tool\n\n")
            f.write("Reproduce: `" + " ".join(f"{k}={os.environ[k]!r}" for k in ("SYSTEMS", "ROUNDS", "TOTAL", "CLIENTS"))
                    + " bench/etcd-benchmark.sh`\n\n")
            f.write(text + "\n")


if __name__ == "__main__":
    main()
