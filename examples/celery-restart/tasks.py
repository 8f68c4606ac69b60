"""A Celery app with Redis as broker and result backend, both from the environment
(BROKER_URL, RESULT_URL), so the same worker runs against Redis directly and through
stormwall. Everything else is Celery's defaults: the prefork pool, gossip, mingle,
heartbeats, the result backend's pub/sub — all of which touch Redis across a restart."""

import os
import time

from celery import Celery

app = Celery(
    "restart",
    broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("RESULT_URL", "redis://127.0.0.1:6379/1"),
)
# Keep retrying the broker at startup too (Celery 5's default warns about it otherwise).
app.conf.broker_connection_retry_on_startup = True


@app.task
def double(i):
    """A short task, so some are always in flight when Redis goes away."""
    time.sleep(0.02)
    return 2 * i


@app.task(acks_late=True)
def double_late(i):
    """The same, acknowledged only after it ran (acks_late) and slower: the worker always
    holds unacknowledged messages, so a restart always finds some (restart.py --unacked)."""
    time.sleep(0.5)
    return 2 * i
