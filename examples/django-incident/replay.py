"""The incident, replayed with a real Django app: readers and account saves for a fixed time,
first straight to Redis, then through stormwall, each side on a fresh redis-server started
from the same warm-cache snapshot and a fresh copy of the same sqlite database. Prints the
two sides next to each other, then the same table in Markdown.

Started by ./run (which builds stormwall and the venv); run `./run --help` for the knobs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))

from harness import (RedisServer, Stormwall, commandstat, fmt_ms, metric,  # noqa: E402
                     percentile, print_table, stop_on_signals)


SLOWLOG_USEC = 100


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def workload(args, command, env, *extra):
    return [sys.executable, os.path.join(HERE, "workload.py"), command,
            "--accounts", str(args.accounts), "--sections", str(args.sections),
            "--zipf", str(args.zipf), *extra]


def proc_cpu_seconds(pid):
    """utime + stime of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(client):
    cpu = client.info("cpu")
    return (cpu["used_cpu_user"] + cpu["used_cpu_sys"],
            cpu.get("used_cpu_user_main_thread", 0) + cpu.get("used_cpu_sys_main_thread", 0))


def prepare(args, workdir):
    """The sqlite database with its accounts, and a Redis snapshot of the warm cache."""
    base_db = os.path.join(workdir, "accounts.sqlite3")
    env = dict(os.environ, INCIDENT_DB=base_db)
    log(f"creating {args.accounts:,} accounts in sqlite")
    subprocess.run(workload(args, "setup-db", env), env=env, check=True)
    snap = RedisServer(os.path.join(workdir, "snapshot")).start()
    try:
        log(f"warming the cache: {args.accounts * args.sections:,} pages")
        env["CACHE_URL"] = snap.url()
        subprocess.run(workload(args, "preload", env), env=env, check=True)
        client = snap.client()
        keys = client.dbsize()
        memory = client.info("memory")["used_memory"]
        client.save()  # dump.rdb in the snapshot's directory: every side starts from it
    finally:
        snap.stop()
    log(f"warm cache: {keys:,} keys, {memory / 2**20:.0f} MiB in Redis")
    return base_db, os.path.join(snap.dir, "dump.rdb"), keys, memory


def run_side(args, workdir, side, base_db, rdb):
    sidedir = os.path.join(workdir, side)
    os.makedirs(sidedir)
    db = os.path.join(sidedir, "accounts.sqlite3")
    shutil.copy(base_db, db)
    # Commands that take Redis 0.1 ms or more land in the slow log with their duration (the
    # longest FLUSHDB is reported; a lower threshold would make Redis copy every command).
    redis_srv = RedisServer(os.path.join(sidedir, "redis"), rdb=rdb, extra=[
        "--save", "", "--appendonly", "no",
        "--slowlog-log-slower-than", str(SLOWLOG_USEC), "--slowlog-max-len", "100000"])
    sw = None
    procs = []
    try:
        redis_srv.start()
        admin = redis_srv.client()
        url = redis_srv.url()
        if side == "stormwall":
            sw = Stormwall(os.environ["STORMWALL_BIN"], redis_srv.port, args.config, sidedir)
            sw.start()
            url = sw.url()
        env = dict(os.environ, INCIDENT_DB=db, CACHE_URL=url)
        for i in range(args.readers):
            procs.append(subprocess.Popen(
                workload(args, "reader", env, "--duration", str(args.duration),
                         "--rate", str(args.read_rate), "--seed", str(i + 1)),
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        procs.append(subprocess.Popen(
            workload(args, "saver", env, "--duration", str(args.duration),
                     "--rate", str(args.save_rate), "--threads", str(args.save_threads),
                     "--seed", "100"),
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a worker failed to start (see above)")
        # Everyone is set up: counters from zero, then one common start time.
        admin.config_resetstat()
        admin.slowlog_reset()
        cpu0 = redis_cpu(admin)
        sw_cpu0 = proc_cpu_seconds(sw.proc.pid) if sw else 0.0
        m0 = sw.metrics() if sw else {}
        start_at = time.time() + 0.5
        for p in procs:
            p.stdin.write(f"{start_at}\n")
            p.stdin.flush()
        log(f"{side}: {args.readers} readers x {args.read_rate:g} reads/s, "
            f"{args.save_rate:g} saves/s for {args.duration:g} s")

        sizes = []
        stop = threading.Event()

        flush_timeline = []

        def sample_size():
            # How full the cache is over the run (what every FLUSHDB has to free), and when
            # the flushes reached Redis (for --dump).
            sampler = redis_srv.client()
            while not stop.wait(0.25):
                if time.time() >= start_at:
                    sizes.append(sampler.dbsize())
                    flush_timeline.append((round(time.time() - start_at, 2),
                                           commandstat(sampler, "flushdb")[0]))

        sampler = threading.Thread(target=sample_size, daemon=True)
        sampler.start()
        results = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"a worker exited with {p.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        stop.set()
        sampler.join()

        flush_calls, flush_usec = commandstat(admin, "flushdb")
        flush_longest = max((e["duration"] for e in admin.slowlog_get(100000)
                             if e["command"].split()[0].lower() == b"flushdb"), default=0)
        cpu1 = redis_cpu(admin)
        out = {
            "readers": [r for r in results if r["kind"] == "reader"],
            "saver": next(r for r in results if r["kind"] == "saver"),
            "flushdb_calls": flush_calls, "flushdb_usec": flush_usec,
            "flushdb_longest_usec": flush_longest,
            "redis_cpu": cpu1[0] - cpu0[0], "redis_cpu_main": cpu1[1] - cpu0[1],
            "lazyfreed": admin.info("stats").get("lazyfreed_objects", 0),
            "cache_keys_median": percentile(sizes, 50) or 0,
            "flush_timeline": flush_timeline,
        }
        if sw:
            m1 = sw.metrics()
            out["sw_cpu"] = proc_cpu_seconds(sw.proc.pid) - sw_cpu0
            for name, key in (("stormwall_flushes_requested_total", "sw_requested"),
                              ("stormwall_flushes_executed_total", "sw_executed"),
                              ("stormwall_invalidation_rejected_total", "sw_rejected")):
                out[key] = metric(m1, name) - metric(m0, name)
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if sw:
            sw.stop()
        redis_srv.stop()


def table(args, sides, data):
    def reads(d, key):
        return [x for r in d["readers"] for x in r[key]]

    def total(d, key):
        return sum(r[key] for r in d["readers"])

    rows = []

    def row(label, fn):
        rows.append([label] + [fn(data[s]) for s in sides])

    def p50_99(values):
        return f"{fmt_ms(percentile(values, 50))} / {fmt_ms(percentile(values, 99))}"

    row("reads done (due)", lambda d: f"{total(d, 'hits') + total(d, 'misses'):,} "
        f"({total(d, 'due'):,})")
    row("page read p50 / p99 / max (ms)", lambda d: (
        f"{p50_99(reads(d, 'page'))} / {fmt_ms(max(reads(d, 'page'), default=None))}"))
    row("cache.get p50 / p99 (ms)", lambda d: p50_99(reads(d, "get")))
    row("cache hit ratio", lambda d: "{:.1%}".format(
        total(d, "hits") / max(1, total(d, "hits") + total(d, "misses"))))
    row("read errors", lambda d: f"{total(d, 'errors'):,}")
    row("saves done (due)", lambda d: f"{len(d['saver']['save']):,} ({d['saver']['due']:,})")
    row("save() wait p50 / p99 / max (ms)", lambda d: (
        f"{fmt_ms(percentile(d['saver']['save'], 50))} / "
        f"{fmt_ms(percentile(d['saver']['save'], 99))} / "
        f"{fmt_ms(max(d['saver']['save'], default=None))}"))
    row("save errors", lambda d: f"{d['saver']['errors']:,}")
    row("stale cache after save()", lambda d: f"{d['saver']['stale']:,}")
    row("FLUSHDB reached Redis", lambda d: f"{d['flushdb_calls']:,}")
    def longest(usec):
        return fmt_ms(usec / 1e6) if usec else f"< {SLOWLOG_USEC / 1000:g}"

    row("Redis time in FLUSHDB: total / longest (ms)",
        lambda d: f"{fmt_ms(d['flushdb_usec'] / 1e6)} / {longest(d['flushdb_longest_usec'])}")
    row("Redis CPU: main thread / all (s)",
        lambda d: f"{d['redis_cpu_main']:.2f} / {d['redis_cpu']:.2f}")
    row("keys in cache, median", lambda d: f"{d['cache_keys_median']:,.0f}")
    row("stormwall: flushes asked / run", lambda d: (
        f"{d['sw_requested']:,.0f} / {d['sw_executed']:,.0f}" if "sw_requested" in d else "–"))
    row("stormwall CPU (s)", lambda d: f"{d['sw_cpu']:.2f}" if "sw_cpu" in d else "–")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=25.0, help="seconds per side (25)")
    p.add_argument("--readers", type=int, default=4, help="reader processes (4)")
    p.add_argument("--read-rate", type=float, default=100.0,
                   help="page reads per second per reader (100)")
    p.add_argument("--save-rate", type=float, default=20.0,
                   help="account saves per second, all savers together (20)")
    p.add_argument("--save-threads", type=int, default=40,
                   help="saving web workers: threads in the saver process (40)")
    p.add_argument("--accounts", type=int, default=20000, help="accounts in sqlite (20000)")
    p.add_argument("--sections", type=int, default=10,
                   help="cached settings pages per account, at most 10 (10)")
    p.add_argument("--zipf", type=float, default=1.0,
                   help="popularity skew of pages (reads) and accounts (saves): page of rank "
                        "r is read with probability ~ 1/r^zipf (1.0)")
    p.add_argument("--sides", default="direct,stormwall",
                   help="which sides to run, in order (direct,stormwall)")
    p.add_argument("--config", default=os.path.join(HERE, "stormwall.toml"),
                   help="stormwall's config file (stormwall.toml: the default flush settings)")
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    p.add_argument("--dump", metavar="FILE",
                   help="also write every sample (per side, per worker) to FILE as JSON")
    args = p.parse_args()
    sides = args.sides.split(",")

    stop_on_signals()
    workdir = tempfile.mkdtemp(prefix="django-incident-")
    began = time.time()
    try:
        base_db, rdb, keys, memory = prepare(args, workdir)
        data = {side: run_side(args, workdir, side, base_db, rdb) for side in sides}
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    finally:
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if args.dump:
        with open(args.dump, "w") as f:
            json.dump({"args": vars(args), "sides": data}, f)
    rows = table(args, sides, data)
    names = {"direct": "direct", "stormwall": "through stormwall"}
    header = [""] + [names.get(s, s) for s in sides]
    load = os.getloadavg()
    print()
    print_table(
        f"Django incident replay: {args.duration:g} s per side, {args.readers} readers x "
        f"{args.read_rate:g} page reads/s, {args.save_rate:g} account saves/s "
        f"({args.save_threads} threads), each save = cache.clear() = FLUSHDB; warm cache "
        f"{keys:,} keys ({memory / 2**20:.0f} MiB); {os.cpu_count()} cores, "
        f"load average {load[0]:.1f}",
        header, rows)
    print()
    print_table(None, header, rows, markdown=True)
    print()
    print(f"(page read: cache.get, and on a miss the sqlite query, the template and cache.set, "
          f"timed from when the read was due; total run time {time.time() - began:.0f} s)")


if __name__ == "__main__":
    main()
