//! The invalidation shield against a real Redis: one test (at least) per guarantee G2–G5 and
//! G7, a concurrent stress test with a checker, and proof that storms are coalesced.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Frame, Raw, Redis, Stormwall, as_int, is_error, text};
use redis::Commands;

/// G2: concurrent DELs of overlapping keys; every request gets the count it really removed
/// under some sequential order, so the counts add up to the keys that existed.
#[test]
fn g2_delete_counts_add_up_under_concurrency() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    const KEYS: usize = 300;
    const CLIENTS: usize = 40;
    for round in 0..5 {
        let mut direct = redis.client();
        for k in 0..KEYS {
            let _: () = direct.set(format!("k{k}"), round).unwrap();
        }
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let barrier = barrier.clone();
                let mut con = sw.client();
                thread::spawn(move || {
                    // Each client deletes an overlapping window of keys, some repeated.
                    let keys: Vec<String> = (0..40)
                        .map(|i| format!("k{}", (c * 7 + i * 3) % KEYS))
                        .collect();
                    barrier.wait();
                    let mut total = 0i64;
                    for chunk in keys.chunks(10) {
                        let mut args = chunk.to_vec();
                        args.push(chunk[0].clone()); // a duplicate within the request
                        total += redis::cmd("DEL").arg(&args).query::<i64>(&mut con).unwrap();
                    }
                    total
                })
            })
            .collect();
        let total: i64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let left: usize = redis::cmd("DBSIZE").query(&mut redis.client()).unwrap();
        let touched = (0..CLIENTS)
            .flat_map(|c| (0..40).map(move |i| (c * 7 + i * 3) % KEYS))
            .collect::<std::collections::HashSet<_>>()
            .len();
        assert_eq!(
            left,
            KEYS - touched,
            "round {round}: keys that should be gone survived"
        );
        assert_eq!(
            total as usize, touched,
            "round {round}: DEL replies must add up to the keys removed"
        );
        let _: () = redis::cmd("FLUSHALL").query(&mut redis.client()).unwrap();
    }
}

/// G2: a deletion that covers a request starts after the request was received: a value
/// written (and acknowledged) before DEL was sent never survives the DEL's acknowledgement.
#[test]
fn g2_delete_never_acknowledged_before_applied() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let handles: Vec<_> = (0..16)
        .map(|c| {
            let mut writer = sw.client();
            let mut deleter = sw.client();
            thread::spawn(move || {
                for i in 0..150 {
                    let key = format!("shared{}", i % 5);
                    let value = format!("c{c}-{i}");
                    let _: () = writer.set(&key, &value).unwrap();
                    let removed: i64 = deleter.del(&key).unwrap();
                    assert!((0..=1).contains(&removed));
                    let now: Option<String> = deleter.get(&key).unwrap();
                    assert_ne!(
                        now.as_deref(),
                        Some(value.as_str()),
                        "value written before DEL survived it"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// G3: on one connection, commands after an invalidation see it applied — also when
/// everything is pipelined in a single write.
#[test]
fn g3_read_your_invalidations_in_a_pipeline() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[flush]\nmin_interval = \"5ms\"\n");
    let mut raw = sw.raw();
    for _ in 0..50 {
        raw.send(
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nDEL\r\n$1\r\nk\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n\
              *3\r\n$3\r\nSET\r\n$1\r\nj\r\n$1\r\nv\r\n*1\r\n$7\r\nFLUSHDB\r\n*2\r\n$6\r\nEXISTS\r\n$1\r\nj\r\n",
        );
        assert_eq!(text(&raw.read_frame()), "OK");
        assert_eq!(as_int(&raw.read_frame()), 1);
        assert!(
            matches!(raw.read_frame(), Frame::Null),
            "GET after DEL must miss"
        );
        assert_eq!(text(&raw.read_frame()), "OK");
        assert_eq!(text(&raw.read_frame()), "OK");
        assert_eq!(
            as_int(&raw.read_frame()),
            0,
            "EXISTS after FLUSHDB must be 0"
        );
    }
}

/// G2 for flushes: a storm of concurrent FLUSHDBs is answered by few real flushes, and every
/// client's own earlier write is gone when its FLUSHDB is acknowledged.
#[test]
fn g2_concurrent_flushes_coalesce_and_cover_every_request() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[flush]\nmin_interval = \"200ms\"\n");
    let before = redis.calls("flushdb");
    let barrier = Arc::new(Barrier::new(100));
    let handles: Vec<_> = (0..100)
        .map(|c| {
            let barrier = barrier.clone();
            let mut con = sw.client();
            thread::spawn(move || {
                let _: () = con.set(format!("mine{c}"), c).unwrap();
                barrier.wait();
                let ok: String = redis::cmd("FLUSHDB").query(&mut con).unwrap();
                assert_eq!(ok, "OK");
                let mine: Option<i64> = con.get(format!("mine{c}")).unwrap();
                assert_eq!(
                    mine, None,
                    "client {c}'s write survived its acknowledged FLUSHDB"
                );
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let flushes = redis.calls("flushdb") - before;
    assert!(
        (1..=10).contains(&flushes),
        "100 concurrent FLUSHDBs reached Redis as {flushes} flushes"
    );
}

/// A steady FLUSHDB storm that has used its burst gets no new one when the flush spacing is
/// rebuilt. The spacing is rebuilt when a reload changes `[flush]`, and at every step of the
/// adaptive budget growing back after a cut; each rebuild used to hand the storm
/// `flush.burst` flushes at once (found with examples/django-incident: 34 flushes reached
/// Redis in 26 s of saves with `min_interval = "1s"`, `burst = 3`).
#[test]
fn a_rebuilt_flush_spacing_gives_a_steady_storm_no_new_burst() {
    let redis = Redis::start();
    let base = "[invalidation]\nadaptive = false\n[flush]\nburst = 3\n";
    let sw = Stormwall::start(&redis.addr(), &format!("{base}min_interval = \"1s\"\n"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            let mut raw = sw.raw();
            thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(text(&raw.call(&[b"FLUSHDB"])), "OK");
                }
            })
        })
        .collect();
    // The burst is used and the spacing holds: flushes come one a second.
    common::eventually("the burst is used", Duration::from_secs(10), || {
        redis.calls("flushdb") >= 4
    });
    let config = std::fs::read_to_string(&sw.config_path).unwrap();
    std::fs::write(
        &sw.config_path,
        config.replace("min_interval = \"1s\"", "min_interval = \"900ms\""),
    )
    .unwrap();
    let before = redis.calls("flushdb");
    sw.signal("HUP");
    common::eventually("the reload is applied", Duration::from_secs(5), || {
        common::metric(&sw, "stormwall_config_reloads_total", &[("result", "ok")]) == 1.0
    });
    thread::sleep(Duration::from_millis(1500));
    let flushes = redis.calls("flushdb") - before;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in storm {
        t.join().unwrap();
    }
    // The old spacing's next turn (within 1 s), then the new one's 0.9 s later: at most 2 in
    // 1.5 s. With a new burst: 4 or more.
    assert!(
        flushes <= 2,
        "{flushes} flushes reached Redis in the 1.5 s after the reload"
    );
}

/// Coalescing: many clients deleting the same keys reach Redis as far fewer commands.
#[test]
fn identical_deletes_from_many_clients_are_coalesced() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    const CLIENTS: usize = 100;
    const LOOPS: usize = 20;
    let keys: Vec<String> = (0..100).map(|i| format!("settings:{i}")).collect();
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let barrier = barrier.clone();
            let keys = keys.clone();
            let mut con = sw.client();
            thread::spawn(move || {
                barrier.wait();
                for _ in 0..LOOPS {
                    let _: i64 = redis::cmd("DEL").arg(&keys).query(&mut con).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let sent = redis.calls("unlink") + redis.calls("del");
    let requested = (CLIENTS * LOOPS) as u64;
    assert!(
        sent < requested,
        "{requested} DEL requests reached Redis as {sent} commands"
    );
    assert_eq!(redis.calls("del"), 0, "deletes must use UNLINK by default");
}

/// G4: with `on_full = "reject"`, an over-full queue answers -BUSY, and a rejected request
/// was really not applied; nothing ends without an answer.
#[test]
fn g4_full_queue_rejects_explicitly_and_applies_nothing() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[invalidation]\non_full = \"reject\"\nmax_pending = 2\nkeys_per_second = 5\nkeys_burst = 1\n",
    );
    let mut direct = redis.client();
    for i in 0..30 {
        let _: () = direct.set(format!("r{i}"), 1).unwrap();
    }
    let handles: Vec<_> = (0..30)
        .map(|i| {
            let port = sw.port;
            thread::spawn(move || {
                let mut raw = Raw::connect(port);
                (i, raw.call(&[b"DEL", format!("r{i}").as_bytes()]))
            })
        })
        .collect();
    let mut rejected = 0;
    for h in handles {
        let (i, reply) = h.join().unwrap();
        let exists: bool = direct.exists(format!("r{i}")).unwrap();
        if is_error(&reply) {
            rejected += 1;
            let msg = text(&reply);
            assert!(
                msg.starts_with("BUSY") && msg.contains("max_pending"),
                "{msg}"
            );
            assert!(exists, "a rejected DEL must not have been applied");
        } else {
            assert_eq!(as_int(&reply), 1);
            assert!(!exists, "an acknowledged DEL must have been applied");
        }
    }
    assert!(
        rejected > 0,
        "30 DELs against a queue of 2 at 5 keys/s must reject some"
    );
}

/// G4: with `on_full = "wait"`, a request that cannot be executed within `max_wait` is answered
/// -TRYAGAIN and was not applied.
#[test]
fn g4_waiting_past_max_wait_is_an_explicit_error() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[invalidation]\nmax_wait = \"300ms\"\nkeys_per_second = 2\nkeys_burst = 1\n\
         [flush]\nmin_interval = \"100ms\"\n",
    );
    let mut direct = redis.client();
    for i in 0..10 {
        let _: () = direct.set(format!("w{i}"), 1).unwrap();
    }
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let port = sw.port;
            thread::spawn(move || {
                (
                    i,
                    Raw::connect(port).call(&[b"UNLINK", format!("w{i}").as_bytes()]),
                )
            })
        })
        .collect();
    let mut timed_out = 0;
    for h in handles {
        let (i, reply) = h.join().unwrap();
        let exists: bool = direct.exists(format!("w{i}")).unwrap();
        if is_error(&reply) {
            timed_out += 1;
            assert!(text(&reply).starts_with("TRYAGAIN"), "{}", text(&reply));
            assert!(exists, "a timed-out UNLINK must not have been applied");
        } else {
            assert_eq!(as_int(&reply), 1);
            assert!(!exists);
        }
    }
    assert!(
        timed_out > 0,
        "10 keys at 2 keys/s cannot all finish within 300ms"
    );
}

/// G4: operators can deny FLUSHALL outright; the data stays.
#[test]
fn g4_denied_flushall_is_refused_with_a_clear_error() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[flush]\ndeny = [\"FLUSHALL\"]\n");
    let mut raw = sw.raw();
    raw.call(&[b"SET", b"precious", b"1"]);
    let reply = raw.call(&[b"FLUSHALL"]);
    assert!(text(&reply).contains("FLUSHALL is denied"), "{reply:?}");
    assert_eq!(as_int(&raw.call(&[b"EXISTS", b"precious"])), 1);
    // FLUSHDB is still allowed.
    assert_eq!(text(&raw.call(&[b"FLUSHDB"])), "OK");
    assert_eq!(as_int(&raw.call(&[b"EXISTS", b"precious"])), 0);
}

/// G5: an unauthenticated client on a password-protected Redis cannot delete through the
/// invalidation path; once authenticated, it can.
#[test]
fn g5_requirepass_is_respected() {
    let redis = Redis::start_with(&["--requirepass", "s3cret"]);
    let sw = Stormwall::start(&redis.addr(), "");
    let mut admin = redis.raw();
    admin.call(&[b"AUTH", b"s3cret"]);
    admin.call(&[b"SET", b"guarded", b"1"]);
    let mut raw = sw.raw();
    let reply = raw.call(&[b"DEL", b"guarded"]);
    assert!(text(&reply).starts_with("NOAUTH"), "{reply:?}");
    let reply = raw.call(&[b"FLUSHALL"]);
    assert!(text(&reply).starts_with("NOAUTH"), "{reply:?}");
    assert_eq!(
        as_int(&admin.call(&[b"EXISTS", b"guarded"])),
        1,
        "unauthenticated DEL was applied"
    );
    assert_eq!(
        text(&raw.call(&[b"AUTH", b"wrong"])).split(' ').next(),
        Some("WRONGPASS")
    );
    assert!(text(&raw.call(&[b"DEL", b"guarded"])).starts_with("NOAUTH"));
    assert_eq!(text(&raw.call(&[b"AUTH", b"s3cret"])), "OK");
    assert_eq!(as_int(&raw.call(&[b"DEL", b"guarded"])), 1);
}

/// G5: an ACL user restricted to a key prefix cannot delete outside it through the shield,
/// even when batched with requests that may; and a user without MULTI still gets exact counts.
#[test]
fn g5_acl_key_prefix_is_respected() {
    let redis = Redis::start();
    let mut admin = redis.raw();
    admin.call(&[
        b"ACL", b"SETUSER", b"app", b"on", b">pw", b"~app:*", b"+@all",
    ]);
    admin.call(&[
        b"ACL", b"SETUSER", b"narrow", b"on", b">pw", b"~app:*", b"+del", b"+unlink", b"+set",
        b"+auth", b"+hello", b"+exists", b"+ping",
    ]);
    let sw = Stormwall::start(&redis.addr(), "");
    for user in [&b"app"[..], b"narrow"] {
        for i in 0..20 {
            admin.call(&[b"SET", format!("app:{i}").as_bytes(), b"1"]);
            admin.call(&[b"SET", format!("other:{i}").as_bytes(), b"1"]);
        }
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let port = sw.port;
                let user = user.to_vec();
                thread::spawn(move || {
                    let mut raw = Raw::connect(port);
                    assert_eq!(text(&raw.call(&[b"AUTH", &user, b"pw"])), "OK");
                    let mixed = raw.call(&[
                        b"DEL",
                        format!("app:{i}").as_bytes(),
                        format!("other:{i}").as_bytes(),
                    ]);
                    let own = raw.call(&[b"DEL", format!("app:{}", (i + 1) % 20).as_bytes()]);
                    (mixed, own)
                })
            })
            .collect();
        let mut own_total = 0;
        for h in handles {
            let (mixed, own) = h.join().unwrap();
            assert!(text(&mixed).starts_with("NOPERM"), "{mixed:?}");
            own_total += as_int(&own);
        }
        assert_eq!(
            own_total,
            20,
            "each permitted key removed exactly once ({})",
            String::from_utf8_lossy(user)
        );
        for i in 0..20 {
            assert_eq!(
                as_int(&admin.call(&[b"EXISTS", format!("other:{i}").as_bytes()])),
                1,
                "other:{i} deleted without permission"
            );
        }
    }
}

/// G5: the selected database is respected.
#[test]
fn g5_selected_database_is_respected() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut admin = redis.raw();
    admin.call(&[b"SET", b"k", b"db0"]);
    let mut raw = sw.raw();
    assert_eq!(text(&raw.call(&[b"SELECT", b"3"])), "OK");
    raw.call(&[b"SET", b"k", b"db3"]);
    assert_eq!(as_int(&raw.call(&[b"DEL", b"k"])), 1);
    assert_eq!(text(&raw.call(&[b"FLUSHDB"])), "OK");
    assert_eq!(
        text(&admin.call(&[b"GET", b"k"])),
        "db0",
        "DEL/FLUSHDB in db 3 touched db 0"
    );
    // A failed SELECT leaves the database as it was.
    assert!(is_error(&raw.call(&[b"SELECT", b"9999"])));
    raw.call(&[b"SET", b"x", b"1"]);
    admin.call(&[b"SELECT", b"3"]);
    assert_eq!(as_int(&raw.call(&[b"DEL", b"x"])), 1);
}

/// G7: inside MULTI, in scripts, and in pub/sub mode, invalidations pass through ungoverned
/// (Redis itself executes DEL, not the shield's UNLINK).
#[test]
fn g7_transactions_scripts_and_pubsub_pass_through() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut raw = sw.raw();
    raw.call(&[b"SET", b"t", b"1"]);
    assert_eq!(text(&raw.call(&[b"MULTI"])), "OK");
    assert_eq!(text(&raw.call(&[b"DEL", b"t"])), "QUEUED");
    assert_eq!(text(&raw.call(&[b"FLUSHDB"])), "QUEUED");
    match raw.call(&[b"EXEC"]) {
        Frame::Array { data, .. } => {
            assert_eq!(as_int(&data[0]), 1);
            assert_eq!(text(&data[1]), "OK");
        }
        other => panic!("EXEC returned {other:?}"),
    }
    assert_eq!(
        redis.calls("del"),
        1,
        "DEL inside MULTI must reach Redis as DEL"
    );
    assert_eq!(redis.calls("unlink"), 0);
    raw.call(&[b"SET", b"s", b"1"]);
    let reply = raw.call(&[b"EVAL", b"return redis.call('del', KEYS[1])", b"1", b"s"]);
    assert_eq!(as_int(&reply), 1);
    // In RESP2 pub/sub mode Redis refuses DEL; through stormwall the refusal is Redis's own.
    let expected = {
        let mut direct = redis.raw();
        direct.call(&[b"SUBSCRIBE", b"ch"]);
        direct.call(&[b"DEL", b"s"])
    };
    let mut sub = sw.raw();
    sub.call(&[b"SUBSCRIBE", b"ch"]);
    assert_eq!(sub.call(&[b"DEL", b"s"]), expected);
}

/// Stress: dozens of clients mixing SET/GET/DEL/FLUSHDB on overlapping keys. After every
/// acknowledged invalidation, no value whose write was acknowledged before the invalidation
/// was sent may be read back.
#[test]
fn stress_mixed_workload_never_reads_invalidated_values() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[flush]\nmin_interval = \"50ms\"\n");
    // value -> when its SET was acknowledged
    let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let deadline = Instant::now() + Duration::from_secs(4);
    let handles: Vec<_> = (0..32)
        .map(|c| {
            let acked = acked.clone();
            let violations = violations.clone();
            let mut con = sw.client();
            thread::spawn(move || {
                let mut i = 0u64;
                let mut x = c as u64 * 2654435761 + 1;
                while Instant::now() < deadline {
                    i += 1;
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key = format!("k{}", x % 16);
                    match x % 10 {
                        0..=4 => {
                            let value = format!("c{c}-{i}");
                            let _: () = con.set(&key, &value).unwrap();
                            acked.lock().unwrap().insert(value, Instant::now());
                        }
                        5..=7 => {
                            let _: Option<String> = con.get(&key).unwrap();
                        }
                        _ => {
                            let flush = x % 50 == 8;
                            let sent = Instant::now();
                            if flush {
                                let _: String = redis::cmd("FLUSHDB").query(&mut con).unwrap();
                            } else {
                                let _: i64 = con.del(&key).unwrap();
                            }
                            let keys: Vec<String> = if flush {
                                (0..16).map(|k| format!("k{k}")).collect()
                            } else {
                                vec![key]
                            };
                            for k in keys {
                                if let Some(v) = con.get::<_, Option<String>>(&k).unwrap() {
                                    let stale =
                                        acked.lock().unwrap().get(&v).is_some_and(|t| *t < sent);
                                    if stale {
                                        violations.lock().unwrap().push(format!(
                                            "{k}={v} survived an invalidation sent after its write"
                                        ));
                                    }
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let v = violations.lock().unwrap();
    assert!(
        v.is_empty(),
        "{} violations, e.g. {:?}",
        v.len(),
        &v[..v.len().min(5)]
    );
}

/// A client that writes a whole pipeline (with invalidations in it) before reading a single
/// reply must not deadlock with stormwall waiting for it to read: every reply arrives, in
/// order, and the invalidation is still applied in its place.
#[test]
fn pipeline_with_invalidations_written_before_reading() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let big = vec![b'x'; 40 * 1024];
    let mut direct = redis.raw();
    direct.call(&[b"SET", b"big", &big]);
    let mut pipeline = Vec::new();
    for _ in 0..500 {
        pipeline.extend(common::encode_cmd(&[b"GET", b"big"]));
    }
    pipeline.extend(common::encode_cmd(&[b"SET", b"gone", b"1"]));
    pipeline.extend(common::encode_cmd(&[b"DEL", b"gone"]));
    pipeline.extend(common::encode_cmd(&[b"GET", b"gone"]));
    // 20 MB more to write after the DEL, while 20 MB of replies wait unread.
    for _ in 0..500 {
        pipeline.extend(common::encode_cmd(&[b"SET", b"big2", &big]));
    }
    let mut raw = sw.raw();
    raw.stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    raw.send(&pipeline);
    for i in 0..500 {
        assert_eq!(raw.read_frame(), common::blob(&big), "reply {i}");
    }
    assert_eq!(text(&raw.read_frame()), "OK");
    assert_eq!(
        as_int(&raw.read_frame()),
        1,
        "DEL removed the key written just before it"
    );
    assert_eq!(raw.read_frame(), Frame::Null, "GET after DEL must miss");
    for _ in 0..500 {
        assert_eq!(text(&raw.read_frame()), "OK");
    }
}

/// G5: the identity the shield acts as follows `HELLO … AUTH` and `RESET` as Redis applied
/// them — including a failed `AUTH`, which changes nothing.
#[test]
fn g5_identity_follows_hello_auth_and_reset() {
    let redis = Redis::start_with(&["--requirepass", "adminpw"]);
    let mut admin = redis.raw();
    admin.call(&[b"AUTH", b"adminpw"]);
    admin.call(&[
        b"ACL", b"SETUSER", b"app", b"on", b">pw", b"~app:*", b"+@all",
    ]);
    admin.call(&[b"SET", b"app:1", b"1"]);
    admin.call(&[b"SET", b"other:1", b"1"]);
    let sw = Stormwall::start(&redis.addr(), "");
    let mut raw = sw.raw();
    raw.call(&[b"HELLO", b"3", b"AUTH", b"app", b"pw"]);
    assert!(
        text(&raw.call(&[b"DEL", b"other:1"])).starts_with("NOPERM"),
        "acted beyond app's ACL"
    );
    // A failed AUTH leaves the connection as `app`.
    assert!(is_error(&raw.call(&[b"AUTH", b"default", b"wrong"])));
    assert!(text(&raw.call(&[b"DEL", b"other:1"])).starts_with("NOPERM"));
    assert_eq!(as_int(&raw.call(&[b"DEL", b"app:1"])), 1);
    // RESET makes it the unauthenticated default user again.
    assert_eq!(text(&raw.call(&[b"RESET"])), "RESET");
    assert!(text(&raw.call(&[b"DEL", b"other:1"])).starts_with("NOAUTH"));
    assert_eq!(
        as_int(&admin.call(&[b"EXISTS", b"other:1"])),
        1,
        "other:1 deleted without permission"
    );
}
