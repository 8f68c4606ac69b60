"""The incident's traffic, as Django code: readers serving cached account pages (read-through:
on a miss, query sqlite, render, cache.set) and savers saving accounts (each save's post_save
clears the whole cache: FLUSHDB). Also the one-off setup steps (database, warm cache).

Run by replay.py, one process per worker:
    workload.py setup-db --accounts N       create the schema and N accounts
    workload.py preload --accounts N ...    fill the cache with every account's pages
    workload.py reader|saver ...            print "ready", read the start time from stdin,
                                            run for --duration seconds, print one JSON line
The database and the cache come from INCIDENT_DB and CACHE_URL (see incident/settings.py).
"""

import argparse
import bisect
import json
import os
import random
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# The settings pages of an account: each is one cache entry, "account:<id>:<section>".
SECTIONS = ("profile", "billing", "notifications", "security", "team",
            "integrations", "api", "privacy", "language", "appearance")

PAGE_TEMPLATE = """<section id="{{ section }}">
<h1>{{ account.name }} &middot; {{ section|title }}</h1>
<dl><dt>Email</dt><dd>{{ account.email }}</dd>
<dt>Theme</dt><dd>{{ account.theme }}</dd><dt>Language</dt><dd>{{ account.language }}</dd>
<dt>Time zone</dt><dd>{{ account.timezone }}</dd>
<dt>Notifications</dt><dd>{{ account.notifications|yesno:"on,off" }}</dd>
<dt>Last change</dt><dd>{{ account.updated|date:"Y-m-d H:i:s" }}</dd></dl>
{% for tip in tips %}<p class="tip">{{ tip }}</p>{% endfor %}
</section>"""

TIPS = ("Changes to these settings apply to every member of the account.",
        "Contact support to transfer ownership of this account.")


def setup_django():
    sys.path.insert(0, HERE)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "incident.settings")
    import django

    django.setup()


def page_key(account_id, section):
    return f"account:{account_id}:{section}"


class Pages:
    """Renders an account's settings page with Django's template engine (what a miss costs
    besides the database query)."""

    def __init__(self):
        from django.template import Context, Engine

        self._context = Context
        self._template = Engine().from_string(PAGE_TEMPLATE)

    def render(self, account, section):
        return self._template.render(
            self._context({"account": account, "section": section, "tips": TIPS}))

    def render_many(self, account, sections):
        """The same pages as render(), for the preload of a whole cache (hundreds of
        thousands of pages): each section is rendered once by the template with placeholder
        field values, then the account's own (escaped) values are put in. preload checks
        the two agree."""
        from django.utils import dateformat, html
        from django.utils.safestring import mark_safe

        if not hasattr(self, "_shapes"):
            self._shapes = {}
        values = {
            "@@NAME@@": html.escape(account.name), "@@EMAIL@@": html.escape(account.email),
            "@@THEME@@": html.escape(account.theme),
            "@@LANGUAGE@@": html.escape(account.language),
            "@@TIMEZONE@@": html.escape(account.timezone),
            "@@UPDATED@@": dateformat.format(account.updated, "Y-m-d H:i:s"),
        }
        out = {}
        for section in sections:
            shape = self._shapes.get((section, account.notifications))
            if shape is None:
                from accounts.models import Account

                placeholder = Account(
                    name="@@NAME@@", email="@@EMAIL@@", theme="@@THEME@@",
                    language="@@LANGUAGE@@", timezone="@@TIMEZONE@@",
                    notifications=account.notifications, updated=account.updated)
                shape = self.render(placeholder, section).replace(
                    dateformat.format(account.updated, "Y-m-d H:i:s"), "@@UPDATED@@")
                self._shapes[(section, account.notifications)] = shape
            page = shape
            for token, value in values.items():
                page = page.replace(token, value)
            out[section] = mark_safe(page)
        return out


class Zipf:
    """Ranks 1..n drawn with probability proportional to 1 / rank**s: a few pages (and
    accounts) are very popular, most are rarely seen — how real cache traffic looks."""

    def __init__(self, n, s):
        total, self.cum = 0.0, []
        for rank in range(1, n + 1):
            total += rank ** -s
            self.cum.append(total)

    def draw(self, rng):
        return bisect.bisect_left(self.cum, rng.random() * self.cum[-1]) + 1


def page_of_rank(rank, sections):
    """Page rank 1 is account 1's first section, rank 2 its second, ..."""
    return (rank - 1) // sections + 1, SECTIONS[(rank - 1) % sections]


def warm_up():
    """What a long-running web worker already has: the cache client imported and connected,
    the database connection open. Otherwise each worker's first read would include imports
    and connects, all of them at the start of the measured window."""
    from django.core.cache import cache

    from accounts.models import Account

    cache.get("warm-up")
    Account.objects.filter(pk=1).exists()


def wait_for_start():
    """Tells the orchestrator this process is set up, then waits for the common start time,
    so Django's import time never eats into the measured window."""
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    return start_at


def cmd_setup_db(args):
    setup_django()
    from django.core.management import call_command
    from django.db import connection

    from accounts.models import Account

    call_command("migrate", verbosity=0)
    rng = random.Random(1)
    Account.objects.bulk_create(
        [Account(name=f"Account {i}", email=f"owner{i}@example.com",
                 theme=rng.choice(("light", "dark")),
                 language=rng.choice(("en", "de", "fr", "ja")),
                 timezone=rng.choice(("UTC", "Europe/Berlin", "Asia/Tokyo")))
         for i in range(1, args.accounts + 1)],
        batch_size=2000)
    with connection.cursor() as c:
        # Everything into the main file, so a copy of it is the whole database.
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def cmd_preload(args):
    """The warm cache before the incident: every page of every account, as the app itself
    would have cached it (django-redis's own key and value encoding)."""
    setup_django()
    from django.core.cache import cache

    from accounts.models import Account

    pages = Pages()
    sections = SECTIONS[: args.sections]
    batch = {}
    for account in Account.objects.order_by("id").iterator(chunk_size=2000):
        rendered = pages.render_many(account, sections)
        if account.id <= 50:
            for section in sections:
                assert rendered[section] == pages.render(account, section), (account.id, section)
        for section in sections:
            batch[page_key(account.id, section)] = rendered[section]
        if len(batch) >= 5000:
            cache.set_many(batch, timeout=args.ttl)
            batch = {}
    if batch:
        cache.set_many(batch, timeout=args.ttl)


def cmd_reader(args):
    setup_django()
    from django.core.cache import cache
    from django.db import connection

    from accounts.models import Account

    pages = Pages()
    rng = random.Random(args.seed)
    popularity = Zipf(args.accounts * args.sections, args.zipf)
    get_times, page_times = [], []
    hits = misses = errors = 0
    warm_up()
    start = wait_for_start()
    end = start + args.duration
    interval = 1.0 / args.rate
    n = 0
    while True:
        # Open schedule: a read is due at start + n * interval whatever happened before, and
        # its page latency counts from when it was due, so a stall delays (and counts) every
        # read that fell due during it, not just the one in flight.
        due = start + n * interval
        if due >= end:
            break
        n += 1
        now = time.time()
        if due > now:
            time.sleep(due - now)
        account_id, section = page_of_rank(popularity.draw(rng), args.sections)
        key = page_key(account_id, section)
        try:
            t0 = time.perf_counter()
            page = cache.get(key)
            get_times.append(time.perf_counter() - t0)
            if page is None:
                misses += 1
                # A miss falls through to the database, as in the incident.
                account = Account.objects.get(pk=account_id)
                cache.set(key, pages.render(account, section))
            else:
                hits += 1
            page_times.append(time.time() - due)
        except Exception as e:  # counted, and the reader goes on as a web worker would
            errors += 1
            if errors <= 3:
                print(f"reader {args.seed}: {type(e).__name__}: {e}", file=sys.stderr)
    connection.close()
    print(json.dumps({"kind": "reader", "due": n, "get": get_times, "page": page_times,
                      "hits": hits, "misses": misses, "errors": errors}))


def cmd_saver(args):
    setup_django()
    from django.core.cache import cache
    from django.db import connection

    from accounts.models import Account

    lock = threading.Lock()
    popularity = Zipf(args.accounts, args.zipf)  # active accounts change settings more
    result = {"kind": "saver", "due": 0, "save": [], "late": [], "errors": 0, "stale": 0}
    warmed = threading.Barrier(args.threads + 1)
    go = threading.Event()
    clock = {}

    def worker(i):
        # Each thread is one web worker saving accounts on its own fixed schedule, together
        # --rate saves per second, spread evenly. A save that returns after its thread's
        # next slot makes that next save go at once (the achieved rate is reported).
        warm_up()  # its own database connection, and one more cache connection in the pool
        warmed.wait()
        go.wait()
        start = clock["start"]
        end = start + args.duration
        period = args.threads / args.rate
        rng = random.Random(args.seed * 1000 + i)
        marker = f"saver-marker:{args.seed}:{i}"
        n = 0
        while True:
            due = start + i / args.rate + n * period
            if due >= end:
                break
            n += 1
            now = time.time()
            if due > now:
                time.sleep(due - now)
            try:
                account = Account.objects.get(pk=popularity.draw(rng))
                account.theme = "dark" if account.theme == "light" else "light"
                cache.set(marker, 1)
                t0 = time.perf_counter()
                account.save()  # post_save: cache.clear(), i.e. FLUSHDB
                took = time.perf_counter() - t0
                # The save's flush must have run by the time save() returned: the marker
                # written before it is gone (a stale read here would be a broken promise).
                stale = cache.get(marker) is not None
                with lock:
                    result["save"].append(took)
                    result["late"].append(time.time() - due - took)
                    result["stale"] += stale
            except Exception as e:
                with lock:
                    result["errors"] += 1
                    if result["errors"] <= 3:
                        print(f"saver {i}: {type(e).__name__}: {e}", file=sys.stderr)
            with lock:
                result["due"] += 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    warmed.wait()
    clock["start"] = wait_for_start()
    go.set()
    for t in threads:
        t.join()
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("setup-db", "preload", "reader", "saver"))
    p.add_argument("--accounts", type=int, default=20000)
    p.add_argument("--sections", type=int, default=len(SECTIONS))
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--ttl", type=int, default=3600)
    p.add_argument("--duration", type=float, default=25.0)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--threads", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    {"setup-db": cmd_setup_db, "preload": cmd_preload, "reader": cmd_reader,
     "saver": cmd_saver}[args.command](args)


if __name__ == "__main__":
    main()
