"""Processes and measurements shared by the examples: a redis-server and a stormwall on
ephemeral loopback ports, each started and stopped by its own pid (never by name), Redis's
own counters, stormwall's /metrics, percentiles and side-by-side tables.

Only the standard library and redis-py are used, so the harness runs in each example's venv.
"""

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import redis


def stop_on_signals():
    """SIGTERM and SIGHUP end the run like Ctrl-C does, so the `finally` blocks stop every
    process this run started (by pid) instead of leaving them behind."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def free_port():
    """A port the kernel considers free right now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_pid(proc, sig=signal.SIGTERM, timeout=10.0):
    """Stops one process we started, by its pid: the signal, then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class RedisServer:
    """One redis-server in its own directory. `extra` are more config arguments, e.g.
    ["--appendonly", "yes"]; the default keeps no data on disk."""

    def __init__(self, workdir, port=None, extra=None, rdb=None):
        self.dir = workdir
        os.makedirs(self.dir, exist_ok=True)
        self.port = port or free_port()
        self.extra = list(extra or ["--save", "", "--appendonly", "no"])
        self.rdb = rdb
        self.proc = None
        self.log = os.path.join(self.dir, "redis.log")

    def start(self, timeout=60.0):
        if self.rdb:
            # Start from a snapshot: Redis loads dir/dbfilename at startup whatever `save` says.
            subprocess.run(["cp", self.rdb, os.path.join(self.dir, "dump.rdb")], check=True)
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.dir, "--dbfilename", "dump.rdb", "--logfile", self.log,
            "--daemonize", "no",
        ] + self.extra
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start, see {self.log}")
            try:
                # PING answers -LOADING while a snapshot loads: wait until it says PONG.
                if self.client().ping():
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {timeout} s")
            time.sleep(0.05)

    def client(self, db=0):
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=30)

    def kill(self):
        """SIGKILL: a crash, nothing saved at shutdown."""
        _stop_pid(self.proc, signal.SIGKILL)

    def stop(self):
        _stop_pid(self.proc)

    def url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"


class Stormwall:
    """stormwall in front of `upstream_port`, with `config` (a TOML file) and the addresses
    given as flags (flags override the file)."""

    def __init__(self, binary, upstream_port, config, workdir):
        self.binary = binary
        self.upstream_port = upstream_port
        self.config = config
        self.port = free_port()
        self.admin_port = free_port()
        self.log = os.path.join(workdir, "stormwall.log")
        self.proc = None

    def start(self, timeout=30.0):
        args = [
            self.binary, "--config", self.config,
            "--listen", f"127.0.0.1:{self.port}",
            "--upstream", f"127.0.0.1:{self.upstream_port}",
            "--admin", f"127.0.0.1:{self.admin_port}",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stormwall exited at start, see {self.log}")
            try:
                with urllib.request.urlopen(self.admin_url("/readyz"), timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"stormwall not ready within {timeout} s, see {self.log}")
            time.sleep(0.05)

    def admin_url(self, path):
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def metrics(self):
        """{(name, labels-string): value} from /metrics."""
        with urllib.request.urlopen(self.admin_url("/metrics"), timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if m:
                out[(m.group(1), m.group(2) or "")] = float(m.group(3))
        return out

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        _stop_pid(self.proc)

    def url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"


def metric(metrics, name, **labels):
    """Sum of a metric's series whose labels include `labels`."""
    total = 0.0
    for (n, lab), v in metrics.items():
        if n != name:
            continue
        if all(f'{k}="{val}"' in lab for k, val in labels.items()):
            total += v
    return total


def commandstat(client, command):
    """(calls, usec) of one command from INFO commandstats; (0, 0) if it never ran."""
    stats = client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}")
    if not entry:
        return 0, 0
    return int(entry["calls"]), int(entry["usec"])


def percentile(values, p):
    """Nearest-rank percentile of a list (None when empty)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def fmt_ms(seconds, digits=None):
    """Seconds as milliseconds, with precision that suits the size."""
    if seconds is None:
        return "–"
    ms = seconds * 1000.0
    if digits is None:
        digits = 2 if ms < 10 else (1 if ms < 100 else 0)
    return f"{ms:,.{digits}f}"


def print_table(title, header, rows, markdown=False):
    """Rows of strings, first column left-aligned, the others right-aligned."""
    if markdown:
        print(f"| {' | '.join(header)} |")
        print("| --- |" + " ---: |" * (len(header) - 1))
        for row in rows:
            print(f"| {' | '.join(row)} |")
        return
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(title)
    line = "  ".join(
        h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
