"""A Celery worker across a Redis restart, straight to Redis and then through stormwall.

Each side: a fresh redis-server (AOF, appendfsync everysec) as broker (db 0) and result
backend (db 1); for the stormwall side a stormwall in front of it, used by the worker and the
producer alike. A Celery worker (prefork, 2 processes) starts; the producer sends --tasks
tasks at --rate per second; at --restart-at seconds Redis is killed (SIGKILL, by its pid),
and --down seconds later started again on the same port and data directory. After the last
task, a canary task is sent and waited for through the result backend's pub/sub (the way
AsyncResult.get() waits), and every task's result is collected until --wait passes.

Started by ./run; `./run --help` for the knobs.
"""

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))

from celery import Celery  # noqa: E402

from harness import RedisServer, Stormwall, print_table, stop_on_signals  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def children(pid):
    """Direct children of a process (the worker's pool processes), from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class Worker:
    """`celery -A tasks worker`, kept running the way systemd or Kubernetes would keep it:
    when it exits, the exit is recorded (with the worker's own last words) and a new one is
    started. All of them log to one file."""

    def __init__(self, env, logfile, name):
        self.env, self.logfile, self.name = env, logfile, name
        self.exits = []  # one reason per exit
        self.procs = []  # every worker process started, and its pool processes
        self.pools = {}
        self._stop = threading.Event()
        self._start()
        self._watch = None

    def _start(self):
        celery = os.path.join(os.path.dirname(sys.executable), "celery")
        self.mark = len(self.text()) if os.path.exists(self.logfile) else 0
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(
                [celery, "-A", "tasks", "worker", "--loglevel=INFO", "--concurrency=2",
                 f"--hostname={self.name}@%h"],
                cwd=HERE, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.procs.append(self.proc)

    def wait_ready(self, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited at start, see {self.logfile}")
            if " ready." in self.text()[self.mark:]:
                self.pools[self.proc.pid] = children(self.proc.pid)
                return
            time.sleep(0.2)
        raise RuntimeError(f"the worker was not ready within {timeout} s, see {self.logfile}")

    def supervise(self):
        def watch():
            while not self._stop.wait(0.2):
                if self.proc.poll() is None:
                    continue
                found = re.findall(r"Unrecoverable error: (.*)", self.text()[self.mark:])
                reason = found[-1] if found else f"exit status {self.proc.returncode}"
                self.exits.append(reason)
                log(f"{self.name}: the worker exited ({reason}); starting a new one")
                self._start()
                try:
                    self.wait_ready()
                except RuntimeError as e:
                    log(str(e))

        self._watch = threading.Thread(target=watch, daemon=True)
        self._watch.start()

    def text(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def stop(self):
        """Warm shutdown (SIGTERM: finish running tasks), then SIGKILL by pid for any worker
        or pool process started here that lingers."""
        self._stop.set()
        if self._watch:
            self._watch.join()
        for proc in self.procs:
            pool = self.pools.get(proc.pid, []) + children(proc.pid)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
            for pid in pool:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def run_side(args, workdir, side):
    sidedir = os.path.join(workdir, side)
    os.makedirs(sidedir)
    # Persistence: an append-only file, so what Redis acknowledged before the kill is there
    # after the restart (a killed process loses nothing the kernel already has).
    redis_srv = RedisServer(os.path.join(sidedir, "redis"), extra=[
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
    sw = worker = app = restarter = None
    aborted = threading.Event()
    try:
        redis_srv.start()
        target = redis_srv
        if side == "stormwall":
            sw = Stormwall(os.environ["STORMWALL_BIN"], redis_srv.port,
                           os.path.join(HERE, "stormwall.toml"), sidedir).start()
            target = sw
        broker, backend = target.url(0), target.url(1)
        env = dict(os.environ, BROKER_URL=broker, RESULT_URL=backend)
        worker = Worker(env, os.path.join(sidedir, "worker.log"), f"restart-{side}")
        worker.wait_ready()
        worker.supervise()
        app = Celery("producer", broker=broker, backend=backend)

        events = {}

        def restart():
            # aborted: the run is ending early (Ctrl-C); never start a Redis after that.
            if aborted.wait(args.restart_at):
                return
            log(f"{side}: killing redis-server (pid {redis_srv.proc.pid})")
            events["killed"] = time.time()
            redis_srv.kill()
            if aborted.wait(args.down):
                return
            redis_srv.start()
            events["back"] = time.time()
            log(f"{side}: redis-server is back (pid {redis_srv.proc.pid})")

        task = "tasks.double_late" if args.unacked else "tasks.double"
        log(f"{side}: sending {args.tasks} x {task} at {args.rate:g}/s; Redis restarts at "
            f"{args.restart_at:g} s for {args.down:g} s")
        sent, publish_errors, error_kinds = [], 0, {}
        restarter = threading.Thread(target=restart)
        start = time.time()
        restarter.start()
        for i in range(args.tasks):
            due = start + i / args.rate
            if due > time.time():
                time.sleep(due - time.time())
            try:
                sent.append((i, app.send_task(task, args=(i,))))
            except Exception as e:  # the producer's view: this task was not sent
                publish_errors += 1
                kind = type(e).__name__
                error_kinds[kind] = error_kinds.get(kind, 0) + 1
        restarter.join()

        # Tasks still flow after the restart: a canary, waited for the way an app waits
        # (AsyncResult.get: the result backend's pub/sub).
        canary_ok, canary_error = False, ""
        try:
            canary_ok = app.send_task("tasks.double", args=(-1,)).get(timeout=args.wait) == -2
        except Exception as e:
            canary_error = f"{type(e).__name__}: {e}"

        completed, wrong, failed, done_at, failures = 0, 0, 0, [], {}
        pending = dict(sent)
        deadline = time.time() + args.wait
        while pending and time.time() < deadline:
            for i, result in list(pending.items()):
                try:
                    state = result.state
                except Exception:
                    continue  # asked again on the next pass
                if state == "SUCCESS":
                    completed += 1
                    wrong += result.result != 2 * i
                    done_at.append(result.date_done)
                    del pending[i]
                elif state in ("FAILURE", "REVOKED"):
                    failed += 1
                    kind = type(result.result).__name__
                    failures[kind] = failures.get(kind, 0) + 1
                    del pending[i]
            if pending:
                time.sleep(0.5)

        back = datetime.datetime.fromtimestamp(events["back"], datetime.timezone.utc)
        after = sorted(d.replace(tzinfo=datetime.timezone.utc) if d.tzinfo is None else d
                       for d in done_at if d is not None)
        after = [d for d in after if d >= back]
        # The producer's own result consumer (pub/sub) may have given up during the outage;
        # it says so when a pending result is dropped. Counted here, per side, rather than
        # printed at exit.
        sent_count = len(sent)
        producer_errors = {}
        for _, result in sent:
            try:
                result.backend.remove_pending_result(result)
            except Exception as e:
                kind = type(e).__name__
                producer_errors[kind] = producer_errors.get(kind, 0) + 1
        sent.clear()
        text = worker.text()
        workers_ok = worker.proc.poll() is None
        out = {
            "sent": sent_count, "publish_errors": publish_errors, "error_kinds": error_kinds,
            "completed": completed, "wrong": wrong, "failed": failed, "failures": failures,
            "lost": len(pending), "producer_errors": producer_errors,
            "canary": canary_ok, "canary_error": canary_error,
            "resumed": (after[0] - back).total_seconds() if after else None,
            "worker_exits": list(worker.exits), "worker_alive": workers_ok,
            "worker_lost_broker": len(re.findall(r"Connection to broker lost", text)),
            "worker_errors": len(re.findall(r": (?:ERROR|CRITICAL)/", text)),
        }
        if sw:
            out["stormwall_alive"] = sw.alive()
        return out
    finally:
        aborted.set()
        if restarter is not None:
            restarter.join()
        if app is not None:
            app.close()
        if worker:
            worker.stop()
        if sw:
            sw.stop()
        redis_srv.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=300, help="tasks to send (300)")
    p.add_argument("--rate", type=float, default=20.0, help="tasks sent per second (20)")
    p.add_argument("--restart-at", type=float, default=5.0,
                   help="seconds after the first task when Redis is killed (5)")
    p.add_argument("--down", type=float, default=1.0,
                   help="seconds Redis stays down before it is started again (1)")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for the results after the last task (30)")
    p.add_argument("--unacked", action="store_true",
                   help="send acks_late tasks of 0.5 s, so the worker always holds "
                        "unacknowledged messages when Redis goes (see README: Celery's "
                        "worker then exits, directly and through stormwall alike)")
    p.add_argument("--sides", default="direct,stormwall")
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = p.parse_args()
    sides = args.sides.split(",")

    stop_on_signals()
    workdir = tempfile.mkdtemp(prefix="celery-restart-")
    began = time.time()
    try:
        data = {side: run_side(args, workdir, side) for side in sides}
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    finally:
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    def yes(v):
        return "yes" if v else "NO"

    rows = [
        ["tasks sent", lambda d: f"{d['sent']} of {args.tasks}"],
        ["publish errors", lambda d: (f"{d['publish_errors']}" + (
            f" ({', '.join(f'{k} x{v}' for k, v in d['error_kinds'].items())})"
            if d["error_kinds"] else ""))],
        ["completed (result in the backend)", lambda d: f"{d['completed']}"],
        ["wrong results", lambda d: f"{d['wrong']}"],
        ["failed", lambda d: f"{d['failed']}" + (
            f" ({', '.join(f'{k} x{v}' for k, v in d['failures'].items())})"
            if d["failures"] else "")],
        ["lost (sent, no result)", lambda d: f"{d['lost']}"],
        ["first task done after Redis was back (s)",
         lambda d: f"{d['resumed']:.2f}" if d["resumed"] is not None else "–"],
        ["canary after the restart (AsyncResult.get)",
         lambda d: "ok" if d["canary"] else f"NO: {d['canary_error']}"],
        ["producer: result consumer errors at the end", lambda d: ", ".join(
            f"{k} x{v}" for k, v in d["producer_errors"].items()) or "0"],
        ["worker exits (restarted by the supervisor)", lambda d: (
            f"{len(d['worker_exits'])}" + (f" ({'; '.join(d['worker_exits'])})"
                                          if d["worker_exits"] else ""))],
        ["a worker running at the end", lambda d: yes(d["worker_alive"])],
        ["worker: 'Connection to broker lost'", lambda d: f"{d['worker_lost_broker']}"],
        ["worker: ERROR/CRITICAL log lines", lambda d: f"{d['worker_errors']}"],
        ["stormwall still running", lambda d: yes(d["stormwall_alive"])
         if "stormwall_alive" in d else "–"],
    ]
    table = [[label] + [fn(data[s]) for s in sides] for label, fn in rows]
    names = {"direct": "direct", "stormwall": "through stormwall"}
    header = [""] + [names.get(s, s) for s in sides]
    print()
    print_table(
        f"Celery across a Redis restart: {args.tasks} tasks at {args.rate:g}/s, Redis killed "
        f"at {args.restart_at:g} s and back {args.down:g} s later; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}", header, table)
    print()
    print_table(None, header, table, markdown=True)
    print(f"\n(total run time {time.time() - began:.0f} s)")


if __name__ == "__main__":
    main()
