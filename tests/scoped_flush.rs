//! Scoped flush rules (`[[flush.rules]]`) against a real Redis: a matched client's `FLUSHDB`
//! deletes only its rule's keys (two applications sharing one database of a million keys),
//! clients no rule matches get a real `FLUSHDB`, rules by database and by ACL user, the
//! permission check (G5), coalescing with G2, G3 on the same connection, live reload, bad
//! rules, and the deadline.
//!
//! Read latency during the big scoped flush is measured and printed (run with
//! `--nocapture`), never asserted: timing belongs to benchmarks.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{Raw, Redis, Stormwall, as_int, error_text, is_error, metric, text};
use redis::Commands;

/// Keys matching `pattern`, counted with `SCAN` directly on Redis.
fn count(redis: &Redis, pattern: &str) -> usize {
    let mut con = redis.client();
    let keys: Vec<String> = con
        .scan_match(pattern)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    keys.len()
}

fn dbsize(redis: &Redis) -> i64 {
    redis::cmd("DBSIZE").query(&mut redis.client()).unwrap()
}

/// Sets `n` keys `prefix:0..n` directly on Redis, pipelined.
fn fill(redis: &Redis, prefix: &str, n: usize) {
    let mut con = redis.client();
    for start in (0..n).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 1000).min(n) {
            pipe.set(format!("{prefix}:{i}"), i).ignore();
        }
        pipe.query::<()>(&mut con).unwrap();
    }
}

/// A raw connection through stormwall named `name`.
fn named(sw: &Stormwall, name: &str) -> Raw {
    let mut raw = sw.raw();
    assert_eq!(
        text(&raw.call(&[b"CLIENT", b"SETNAME", name.as_bytes()])),
        "OK"
    );
    raw
}

/// Percentiles of `samples` (sorted in place), in milliseconds.
fn percentiles(samples: &mut [Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
    format!(
        "n={} p50={:.3} ms p99={:.3} ms max={:.3} ms",
        samples.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// Two applications share one database of a million keys; app A's `cache.clear()`
/// (`FLUSHDB`, its connection named by `CLIENT SETNAME`) removes every key of app A and none
/// of app B's, and answers `+OK` once done. A `SET` pipelined right after it survives (G3).
/// Another connection reads app B's keys directly from Redis all along; its latency is
/// printed.
#[test]
fn one_apps_clear_leaves_every_key_of_the_other() {
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let sw = Stormwall::start(
        &redis.addr(),
        "[flush]\n[[flush.rules]]\nclient_name = \"appA-*\"\npattern = \"appA:*\"\n",
    );
    const HALF: i64 = 500_000;
    let mut direct = redis.client();
    for prefix in ["appA", "appB"] {
        let _: () = redis::cmd("DEBUG")
            .arg("POPULATE")
            .arg(HALF)
            .arg(prefix)
            .query(&mut direct)
            .unwrap();
    }
    assert_eq!(dbsize(&redis), 2 * HALF);

    // Reads of app B's keys, straight to Redis, before and during the scoped flush.
    let reading = Arc::new(AtomicBool::new(true));
    let during = Arc::new(AtomicBool::new(false));
    let reader = {
        let (reading, during) = (reading.clone(), during.clone());
        let mut con = redis.client();
        thread::spawn(move || {
            let (mut before, mut while_flushing) = (Vec::new(), Vec::new());
            let mut i = 0u64;
            while reading.load(Ordering::Relaxed) {
                i = (i + 7919) % HALF as u64;
                let t = Instant::now();
                let v: Option<String> = con.get(format!("appB:{i}")).unwrap();
                let took = t.elapsed();
                assert!(v.is_some(), "appB:{i} vanished");
                if during.load(Ordering::Relaxed) {
                    while_flushing.push(took);
                } else {
                    before.push(took);
                }
                thread::sleep(Duration::from_millis(1));
            }
            (before, while_flushing)
        })
    };
    thread::sleep(Duration::from_millis(500));

    let mut app_a = named(&sw, "appA-web");
    during.store(true, Ordering::Relaxed);
    let started = Instant::now();
    // cache.clear(), then a write of the app's own key in the same pipeline.
    app_a.send(&common::encode_cmd(&[b"FLUSHDB"]));
    app_a.send(&common::encode_cmd(&[b"SET", b"appA:after", b"1"]));
    app_a
        .stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let reply = app_a.read_frame();
    let took = started.elapsed();
    during.store(false, Ordering::Relaxed);
    assert_eq!(text(&reply), "OK", "{}", sw.log());
    assert_eq!(text(&app_a.read_frame()), "OK");
    reading.store(false, Ordering::Relaxed);
    let (mut before, mut while_flushing) = reader.join().expect("reader failed");

    assert_eq!(count(&redis, "appB:*"), HALF as usize, "app B lost keys");
    let left: Vec<String> = direct
        .scan_match("appA:*")
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        left,
        vec!["appA:after".to_string()],
        "G3: the SET after it survives"
    );
    assert_eq!(dbsize(&redis), HALF + 1);
    let removed = metric(&sw, "stormwall_scoped_flush_keys_deleted_total", &[]);
    assert_eq!(removed, HALF as f64);
    assert_eq!(
        metric(&sw, "stormwall_scoped_flushes_executed_total", &[]),
        1.0
    );
    let scans = metric(&sw, "stormwall_scoped_flush_scan_calls_total", &[]);
    eprintln!(
        "scoped FLUSHDB of {HALF} of {} keys: {:.2} s, {scans} SCAN calls\n\
         GET appB:* directly, before: {}\n\
         GET appB:* directly, during: {}",
        2 * HALF,
        took.as_secs_f64(),
        percentiles(&mut before),
        percentiles(&mut while_flushing)
    );
}

/// A client no rule matches (unnamed, or named otherwise) gets a real `FLUSHDB`; `FLUSHALL`
/// is never scoped.
#[test]
fn unmatched_clients_flush_the_whole_database() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[flush]\nmin_interval = \"0s\"\n[[flush.rules]]\nclient_name = \"appA\"\npattern = \"appA:*\"\n",
    );
    for raw in [sw.raw(), named(&sw, "appB"), named(&sw, "appAA")] {
        let mut raw = raw;
        fill(&redis, "appA", 100);
        fill(&redis, "appB", 100);
        assert_eq!(text(&raw.call(&[b"FLUSHDB"])), "OK");
        assert_eq!(dbsize(&redis), 0);
    }
    fill(&redis, "appA", 100);
    fill(&redis, "appB", 100);
    let mut a = named(&sw, "appA");
    assert_eq!(text(&a.call(&[b"FLUSHDB", b"ASYNC"])), "OK");
    assert_eq!((count(&redis, "appA:*"), dbsize(&redis)), (0, 100));
    assert_eq!(text(&a.call(&[b"FLUSHALL"])), "OK");
    assert_eq!(dbsize(&redis), 0);
    // A name removed (set to "") no longer matches.
    fill(&redis, "appA", 10);
    fill(&redis, "appB", 10);
    assert_eq!(text(&a.call(&[b"CLIENT", b"SETNAME", b""])), "OK");
    assert_eq!(text(&a.call(&[b"FLUSHDB"])), "OK");
    assert_eq!(dbsize(&redis), 0);
}

/// Names set by `HELLO … SETNAME` count, on a connection of its own as well as a shared one
/// (a transaction first moves a shared client to a private connection); a name set inside
/// a transaction is not known, so a rule that depends on it refuses the `FLUSHDB` rather
/// than guess.
#[test]
fn names_are_followed_in_every_connection_state() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[flush]\nmin_interval = \"0s\"\n[[flush.rules]]\nclient_name = \"appA\"\npattern = \"appA:*\"\n",
    );
    let mut hello = sw.raw();
    let reply = hello.call(&[b"HELLO", b"2", b"SETNAME", b"appA"]);
    assert!(!is_error(&reply));
    fill(&redis, "appA", 50);
    fill(&redis, "appB", 50);
    assert_eq!(text(&hello.call(&[b"FLUSHDB"])), "OK");
    assert_eq!((count(&redis, "appA:*"), dbsize(&redis)), (0, 50));

    // After a transaction (which pins a shared client), then named.
    let mut pinned = sw.raw();
    assert_eq!(text(&pinned.call(&[b"MULTI"])), "OK");
    assert_eq!(text(&pinned.call(&[b"PING"])), "QUEUED");
    assert!(!is_error(&pinned.call(&[b"EXEC"])));
    assert_eq!(text(&pinned.call(&[b"CLIENT", b"SETNAME", b"appA"])), "OK");
    fill(&redis, "appA", 50);
    assert_eq!(text(&pinned.call(&[b"FLUSHDB"])), "OK");
    assert_eq!((count(&redis, "appA:*"), dbsize(&redis)), (0, 50));

    // Named by EXEC: unknown to stormwall, so not applied at all.
    fill(&redis, "appA", 50);
    assert_eq!(text(&pinned.call(&[b"MULTI"])), "OK");
    assert_eq!(
        text(&pinned.call(&[b"CLIENT", b"SETNAME", b"other"])),
        "QUEUED"
    );
    assert!(!is_error(&pinned.call(&[b"EXEC"])));
    let reply = pinned.call(&[b"FLUSHDB"]);
    assert!(error_text(&reply).contains("not applied"), "{reply:?}");
    assert_eq!(dbsize(&redis), 100, "nothing deleted");
    // Named again: known again.
    assert_eq!(text(&pinned.call(&[b"CLIENT", b"SETNAME", b"appA"])), "OK");
    assert_eq!(text(&pinned.call(&[b"FLUSHDB"])), "OK");
    assert_eq!((count(&redis, "appA:*"), dbsize(&redis)), (0, 50));
    assert_eq!(
        metric(
            &sw,
            "stormwall_invalidation_rejected_total",
            &[("reason", "unscoped")]
        ),
        1.0
    );
}

/// Rules by database and by ACL user; the user's `FLUSHDB` is refused exactly as Redis would
/// refuse it (G5), and nothing is deleted for it.
#[test]
fn rules_by_database_and_by_acl_user() {
    let redis = Redis::start();
    let mut admin = redis.client();
    for (user, rules) in [
        ("billing", &["+@all"][..]),
        ("noflush", &["+@all", "-flushdb"]),
        ("noscan", &["+@all", "-scan"]),
    ] {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(user)
            .arg("on")
            .arg(">pw")
            .arg("~*")
            .arg(rules)
            .query(&mut admin)
            .unwrap();
    }
    let sw = Stormwall::start(
        &redis.addr(),
        "[flush]\nmin_interval = \"0s\"\n\
         [[flush.rules]]\nuser = \"billing\"\npattern = \"bill:*\"\n\
         [[flush.rules]]\nuser = \"noflush\"\npattern = \"bill:*\"\n\
         [[flush.rules]]\nuser = \"noscan\"\npattern = \"bill:*\"\n\
         [[flush.rules]]\ndb = 2\npattern = \"tmp:*\"\n",
    );
    fill(&redis, "bill", 30);
    fill(&redis, "other", 30);
    let mut billing = sw.raw();
    assert_eq!(text(&billing.call(&[b"AUTH", b"billing", b"pw"])), "OK");
    assert_eq!(text(&billing.call(&[b"FLUSHDB"])), "OK");
    assert_eq!((count(&redis, "bill:*"), dbsize(&redis)), (0, 30));

    // Allowed to delete and scan, not to flush: Redis's own refusal, nothing deleted.
    fill(&redis, "bill", 30);
    for user in [&b"noflush"[..], b"noscan"] {
        let mut refused = sw.raw();
        assert_eq!(text(&refused.call(&[b"AUTH", user, b"pw"])), "OK");
        let reply = refused.call(&[b"FLUSHDB"]);
        assert!(error_text(&reply).starts_with("NOPERM"), "{reply:?}");
        assert_eq!(dbsize(&redis), 60);
    }

    // Database 2: the rule by database; database 0 of the same user is flushed whole.
    let mut db2 = redis.client();
    let _: () = redis::cmd("SELECT").arg(2).query(&mut db2).unwrap();
    for k in ["tmp:1", "tmp:2", "keep:1"] {
        let _: () = db2.set(k, 1).unwrap();
    }
    let mut client = sw.raw();
    assert_eq!(text(&client.call(&[b"SELECT", b"2"])), "OK");
    assert_eq!(text(&client.call(&[b"FLUSHDB"])), "OK");
    let left: Vec<String> = db2.scan().unwrap().map(Result::unwrap).collect();
    assert_eq!(left, vec!["keep:1".to_string()]);
    assert_eq!(text(&client.call(&[b"SELECT", b"0"])), "OK");
    assert_eq!(text(&client.call(&[b"FLUSHDB"])), "OK");
    assert_eq!(dbsize(&redis), 0);
    assert_eq!(as_int(&client.call(&[b"DBSIZE"])), 0);
}

/// Concurrent scoped flushes of one scope are coalesced: fewer scans than requests, and
/// each request answered by a scan that started after it arrived — a key of app A set right
/// before a client's `FLUSHDB` is gone when that client hears `+OK`.
#[test]
fn concurrent_scoped_flushes_coalesce_and_each_sees_its_own_keys_gone() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[flush]\nmin_interval = \"50ms\"\nburst = 1\n\
         [[flush.rules]]\nclient_name = \"appA\"\npattern = \"appA:*\"\n",
    );
    fill(&redis, "appA:bulk", 20_000);
    fill(&redis, "appB", 1000);
    const CLIENTS: usize = 12;
    const ROUNDS: usize = 4;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut raw = named(&sw, "appA");
            let mut direct = redis.client();
            let barrier = barrier.clone();
            thread::spawn(move || {
                for round in 0..ROUNDS {
                    barrier.wait();
                    // Staggered, so that some arrive while a scan runs.
                    thread::sleep(Duration::from_millis((c as u64 * 13) % 40));
                    let marker = format!("appA:marker:{c}:{round}");
                    let _: () = direct.set(&marker, 1).unwrap();
                    let reply = raw.call(&[b"FLUSHDB"]);
                    assert_eq!(text(&reply), "OK", "client {c} round {round}");
                    let exists: bool = direct.exists(&marker).unwrap();
                    assert!(!exists, "{marker} survived the flush that answered it");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client failed");
    }
    let requested = metric(&sw, "stormwall_scoped_flushes_requested_total", &[]);
    let executed = metric(&sw, "stormwall_scoped_flushes_executed_total", &[]);
    eprintln!("{requested} scoped flushes requested, {executed} scans");
    assert_eq!(requested, (CLIENTS * ROUNDS) as f64);
    assert!(executed < requested, "{executed} scans for {requested}");
    assert_eq!(count(&redis, "appB:*"), 1000);
    assert_eq!(count(&redis, "appA:*"), 0);
}

/// Rules change on reload, for connected clients too; a file with a bad rule is rejected
/// and the running rules stay.
#[test]
fn reload_changes_the_rules_and_keeps_them_on_a_bad_file() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[flush]\nmin_interval = \"0s\"\n");
    let original = std::fs::read_to_string(&sw.config_path).unwrap();
    let mut a = named(&sw, "appA");
    fill(&redis, "appA", 20);
    fill(&redis, "appB", 20);
    assert_eq!(text(&a.call(&[b"FLUSHDB"])), "OK");
    assert_eq!(dbsize(&redis), 0, "no rule yet: a real FLUSHDB");

    let rule = "[[flush.rules]]\nclient_name = \"appA\"\npattern = \"appA:*\"\n";
    std::fs::write(&sw.config_path, format!("{original}{rule}")).unwrap();
    sw.signal("HUP");
    common::eventually("reload applied", Duration::from_secs(5), || {
        metric(&sw, "stormwall_config_reloads_total", &[("result", "ok")]) == 1.0
    });
    fill(&redis, "appA", 20);
    fill(&redis, "appB", 20);
    assert_eq!(text(&a.call(&[b"FLUSHDB"])), "OK");
    assert_eq!((count(&redis, "appA:*"), dbsize(&redis)), (0, 20));

    let bad = "[[flush.rules]]\nclient_name = \"appA\"\npattern = \"\"\n";
    std::fs::write(&sw.config_path, format!("{original}{bad}")).unwrap();
    sw.signal("HUP");
    common::eventually("reload rejected", Duration::from_secs(5), || {
        metric(
            &sw,
            "stormwall_config_reloads_total",
            &[("result", "failed")],
        ) == 1.0
    });
    assert!(sw.log().contains("flush.rules.pattern"), "{}", sw.log());
    fill(&redis, "appA", 20);
    assert_eq!(text(&a.call(&[b"FLUSHDB"])), "OK");
    assert_eq!(
        (count(&redis, "appA:*"), dbsize(&redis)),
        (0, 20),
        "the running rule stays"
    );
}

/// `stormwall --check-config` rejects bad rules naming the key.
#[test]
fn bad_rules_are_rejected_at_load() {
    let dir = tempfile::tempdir().unwrap();
    for (file, key) in [
        ("[[flush.rules]]\npattern = \"a:*\"\n", "flush.rules"),
        ("[[flush.rules]]\ndb = 1\n", "pattern"),
        (
            "[[flush.rules]]\ndb = 1\npattern = \"\"\n",
            "flush.rules.pattern",
        ),
        (
            "[[flush.rules]]\nclient_nam = \"a\"\npattern = \"a\"\n",
            "client_nam",
        ),
        (
            "[flush]\nscoped_max_wait = \"0s\"\n",
            "flush.scoped_max_wait",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, file).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stormwall"))
            .arg("--check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "accepted {file:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{file:?}: {err}");
    }
}

/// A scoped flush that cannot finish within `flush.scoped_max_wait` (a tiny key budget) has
/// deleted some keys: the client cannot be told so in a reply, so its connection is closed,
/// as for a command whose fate is unknown; the scan stops once nobody waits for it.
#[test]
fn a_scoped_flush_past_its_deadline_closes_the_connection() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[invalidation]\nkeys_per_second = 2000\nkeys_burst = 500\n\
         [flush]\nmin_interval = \"0s\"\nscoped_max_wait = \"1s\"\n\
         [[flush.rules]]\nclient_name = \"appA\"\npattern = \"appA:*\"\n",
    );
    fill(&redis, "appA", 20_000);
    fill(&redis, "appB", 100);
    let mut a = named(&sw, "appA");
    a.cmd(&[b"FLUSHDB"]);
    assert!(a.closed(), "expected a closed connection");
    let left = count(&redis, "appA:*");
    assert!(left > 0 && left < 20_000, "{left} appA keys left");
    assert_eq!(count(&redis, "appB:*"), 100);
    assert!(metric(&sw, "stormwall_invalidation_unknown_total", &[]) >= 1.0);
    // Stopped: nothing more is deleted for nobody.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&redis, "appA:*"), left);
}
