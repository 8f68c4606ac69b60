//! The invalidation shield in front of a real Redis Cluster: governed `DEL`/`UNLINK`/
//! `FLUSHDB`/`FLUSHALL` split by slot, batched and coalesced per master, each client told
//! exactly what its request did (G2), nothing acknowledged before the masters applied it,
//! commands after an invalidation run after it (G3), and the rate budget bounding the
//! whole cluster. What the masters hold is checked on the masters.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, proxy};
use common::*;

/// Whether `key` exists, asked of its master.
fn exists(cluster: &Cluster, key: &[u8]) -> bool {
    as_int(&cluster.node_for_key(key).raw().call(&[b"EXISTS", key])) == 1
}

#[test]
fn deletes_are_batched_per_master_with_exact_counts() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let keys: Vec<String> = (0..30).map(|i| format!("inv:{i}")).collect();
    let masters: BTreeSet<u16> = keys
        .iter()
        .map(|k| cluster.node_for_key(k.as_bytes()).port)
        .collect();
    assert_eq!(masters.len(), 3);
    let mut c = sw.raw();
    for k in &keys {
        c.call(&[b"SET", k.as_bytes(), b"v"]);
    }
    // 24 clients at once, each deleting an overlapping third of the keys (on every
    // master), and a key that never existed: every key is removed once, so the counts add
    // up to exactly the keys there were, whatever the order.
    let start = Arc::new(Barrier::new(24));
    let threads: Vec<_> = (0..24)
        .map(|t| {
            let port = sw.port;
            let start = start.clone();
            let mine: Vec<String> = keys.iter().skip(t % 3).step_by(3).cloned().collect();
            let half = mine.len() / 2;
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                let mut del: Vec<&[u8]> = vec![b"DEL"];
                del.extend(mine[..half].iter().map(|k| k.as_bytes()));
                del.push(b"never-existed");
                let mut unlink: Vec<&[u8]> = vec![b"UNLINK"];
                unlink.extend(mine[half..].iter().map(|k| k.as_bytes()));
                start.wait();
                let a = as_int(&c.call(&del));
                let b = as_int(&c.call(&unlink));
                (a + b, mine)
            })
        })
        .collect();
    let mut total = 0;
    for t in threads {
        let (count, mine) = t.join().expect("a client thread");
        total += count;
        // Applied before acknowledged: its keys are gone from their masters now.
        for k in &mine {
            assert!(!exists(&cluster, k.as_bytes()), "{k} still exists");
        }
    }
    assert_eq!(total, 30, "each key counted once");
    assert!(
        metric(
            &sw,
            "stormwall_invalidation_requests_total",
            &[("command", "delete")]
        ) >= 48.0
    );
    // A pipeline of deletes of the same keys: one batch per slot, the repeats coalesced,
    // and the counts those of a sequential order.
    for k in &keys {
        c.call(&[b"SET", k.as_bytes(), b"v"]);
    }
    let mut input = Vec::new();
    for _ in 0..3 {
        for k in &keys {
            input.extend(encode_cmd(&[b"DEL", k.as_bytes()]));
        }
    }
    c.send(&input);
    let counts: Vec<i64> = (0..90).map(|_| as_int(&c.read_frame())).collect();
    assert_eq!(counts[..30], [1; 30]);
    assert_eq!(counts[30..], [0; 60]);
    assert!(metric(&sw, "stormwall_invalidation_coalesced_keys_total", &[]) >= 1.0);
    // Read your invalidations: what follows a delete runs after it.
    let mut input = Vec::new();
    for k in &keys {
        input.extend(encode_cmd(&[b"SET", k.as_bytes(), b"again"]));
        input.extend(encode_cmd(&[b"DEL", k.as_bytes(), b"inv:0", b"{x}y"]));
        input.extend(encode_cmd(&[b"GET", k.as_bytes()]));
        input.extend(encode_cmd(&[b"EXISTS", k.as_bytes()]));
    }
    c.send(&input);
    for k in &keys {
        assert_eq!(text(&c.read_frame()), "OK", "{k}");
        assert!(as_int(&c.read_frame()) >= 1, "{k}");
        assert_eq!(c.read_frame(), Frame::Null, "{k}");
        assert_eq!(as_int(&c.read_frame()), 0, "{k}");
    }
}

#[test]
fn flush_storms_are_coalesced_and_reach_every_master() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    for i in 0..60 {
        c.call(&[b"SET", format!("f{i}").as_bytes(), b"v"]);
    }
    let start = Arc::new(Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let port = sw.port;
            let start = start.clone();
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                let mine = format!("written-before-{i}");
                c.call(&[b"SET", mine.as_bytes(), b"v"]);
                start.wait();
                let reply = c.call(&[b"FLUSHDB"]);
                (text(&reply), mine)
            })
        })
        .collect();
    for t in threads {
        let (reply, mine) = t.join().expect("a client thread");
        assert_eq!(reply, "OK");
        // Applied before acknowledged, on the master of its own key too.
        assert!(
            !exists(&cluster, mine.as_bytes()),
            "{mine} survived its FLUSHDB"
        );
    }
    for master in cluster.masters() {
        assert_eq!(as_int(&master.raw().call(&[b"DBSIZE"])), 0);
    }
    let requested = metric(
        &sw,
        "stormwall_flushes_requested_total",
        &[("command", "flushdb")],
    );
    let executed = metric(
        &sw,
        "stormwall_flushes_executed_total",
        &[("command", "flushdb")],
    );
    assert_eq!(
        requested, 60.0,
        "each request reaches each of the 3 masters"
    );
    assert!(executed < requested, "{executed} flushes for {requested}");
    assert!(executed >= 3.0);
    // FLUSHALL too.
    c.call(&[b"SET", b"last", b"v"]);
    assert_eq!(text(&c.call(&[b"FLUSHALL"])), "OK");
    assert_eq!(as_int(&c.call(&[b"DBSIZE"])), 0);
}

#[test]
fn the_rate_budget_bounds_the_whole_cluster() {
    let cluster = Cluster::start(3, 1);
    // 20 keys a second, 5 at once, for the whole cluster; a request may wait 500 ms.
    let sw = proxy(
        &cluster,
        "[invalidation]\nkeys_per_second = 20\nkeys_burst = 5\nmax_wait = \"500ms\"\nadaptive = false\n\
         [flush]\nmin_interval = \"100ms\"\n",
    );
    let mut c = sw.raw();
    let keys: Vec<String> = (0..60).map(|i| format!("b{i}")).collect();
    for k in &keys {
        c.call(&[b"SET", k.as_bytes(), b"v"]);
    }
    let start = Arc::new(Barrier::new(keys.len()));
    let began = Instant::now();
    let threads: Vec<_> = keys
        .iter()
        .map(|k| {
            let port = sw.port;
            let start = start.clone();
            let k = k.clone();
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                start.wait();
                (c.call(&[b"DEL", k.as_bytes()]), k)
            })
        })
        .collect();
    let mut applied = 0;
    let mut refused = 0;
    for t in threads {
        let (reply, k) = t.join().expect("a client thread");
        match reply {
            // Every request ends in its real result or a refusal saying it was not applied.
            Frame::Number { data: 1, .. } => {
                applied += 1;
                assert!(
                    !exists(&cluster, k.as_bytes()),
                    "{k} acknowledged, still there"
                );
            }
            other => {
                let e = error_text(&other);
                assert!(e.contains("not applied"), "{e}");
                refused += 1;
                assert!(exists(&cluster, k.as_bytes()), "{k} refused, yet deleted");
            }
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    eprintln!("{applied} deletes applied, {refused} refused, in {elapsed:.2}s");
    assert_eq!(applied + refused, 60);
    // One budget for every master together: a budget per master would have let up to
    // three times as many through.
    let bound = 5.0 + 20.0 * elapsed + 1.0;
    assert!(
        f64::from(applied) <= bound,
        "{applied} applied in {elapsed:.2}s (budget allows {bound:.0})"
    );
    assert!(refused > 0);
    // The budget recovers: a later delete is applied.
    std::thread::sleep(Duration::from_millis(300));
    let leftover = keys
        .iter()
        .find(|k| exists(&cluster, k.as_bytes()))
        .expect("a refused key");
    assert_eq!(as_int(&c.call(&[b"DEL", leftover.as_bytes()])), 1);
}

/// `invalidation.delete_command = "unlink"` (the default) reaches every master: the check
/// that the client may run both forms asks each master about a key of the batch's own slot
/// (a key of another slot would be answered `MOVED`, and the client's `DEL` sent as it was,
/// blocking the master on a large value).
#[test]
fn deletes_reach_every_master_as_unlink() {
    let cluster = Cluster::start(3, 0);
    let sw = proxy(&cluster, "");
    let keys: Vec<String> = (0..30).map(|i| format!("big:{i}")).collect();
    let mut c = sw.raw();
    for k in &keys {
        assert_eq!(text(&c.call(&[b"SET", k.as_bytes(), b"v"])), "OK");
    }
    for k in &keys {
        assert_eq!(as_int(&c.call(&[b"DEL", k.as_bytes()])), 1, "{k}");
    }
    for master in cluster.masters() {
        assert!(master.calls("unlink") > 0, "{}: no UNLINK", master.addr());
        assert_eq!(master.calls("del"), 0, "{}: DEL sent", master.addr());
    }
}

/// A storm of deletes over many slots is batched across slots: each master runs a batch's
/// slots as one script, so Redis gets far fewer commands than there are slots, and every
/// client still gets its exact count.
#[test]
fn a_delete_storm_over_many_slots_is_batched_across_slots() {
    let cluster = Cluster::start(3, 0);
    let sw = proxy(&cluster, "");
    let keys: Vec<String> = (0..2000).map(|i| format!("storm:{i}")).collect();
    let mut c = sw.raw();
    let mut input = Vec::new();
    for k in keys.iter().step_by(2) {
        input.extend(encode_cmd(&[b"SET", k.as_bytes(), b"v"]));
    }
    c.send(&input);
    for _ in keys.iter().step_by(2) {
        assert_eq!(text(&c.read_frame()), "OK");
    }
    let slots: BTreeSet<u16> = keys.iter().map(|k| cluster.slot_of(k.as_bytes())).collect();
    assert!(slots.len() > 1500, "{} slots", slots.len());
    // Four clients, each a pipeline of single-key deletes: half the keys exist.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let mut c = sw.raw();
            let mine: Vec<String> = keys.iter().skip(t).step_by(4).cloned().collect();
            std::thread::spawn(move || {
                let mut input = Vec::new();
                for k in &mine {
                    input.extend(encode_cmd(&[b"DEL", k.as_bytes()]));
                }
                c.send(&input);
                mine.iter().map(|_| as_int(&c.read_frame())).sum::<i64>()
            })
        })
        .collect();
    let deleted: i64 = threads.into_iter().map(|t| t.join().expect("client")).sum();
    assert_eq!(deleted, 1000, "exactly the keys that existed");
    for master in cluster.masters() {
        assert_eq!(
            as_int(&master.raw().call(&[b"DBSIZE"])),
            0,
            "{}",
            master.addr()
        );
    }
    let sent = metric(&sw, "stormwall_invalidation_commands_sent_total", &[]);
    let evals: u64 = cluster.masters().iter().map(|m| m.calls("eval")).sum();
    eprintln!(
        "{sent} commands ({evals} scripts) for {} slots",
        slots.len()
    );
    eprintln!(
        "refreshes {}, keys sent {}, batches {}",
        metric(&sw, "stormwall_cluster_refreshes_total", &[]),
        metric(&sw, "stormwall_invalidation_keys_sent_total", &[]),
        metric(&sw, "stormwall_invalidation_batches_total", &[])
    );
    assert!(evals > 0, "the batch script ran");
    assert!(
        sent < slots.len() as f64 / 2.0,
        "{sent} commands sent for {} slots",
        slots.len()
    );
}
