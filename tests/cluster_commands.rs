//! Commands a plain client sends to "one Redis" that, in front of a Redis Cluster, concern
//! several masters: multi-key commands split by slot (`DEL`, `UNLINK`, `EXISTS`, `TOUCH`,
//! `MGET`) and commands about the whole dataset run on every master (`FLUSHDB`, `DBSIZE`,
//! `KEYS`, `SCAN`, `RANDOMKEY`, `INFO`, `SCRIPT`, `FUNCTION`). Every answer is checked
//! against what the masters themselves hold, asked directly.

mod common;

use std::collections::BTreeSet;

use common::cluster::{Cluster, proxy};
use common::*;

/// `DBSIZE` of each master, asked directly.
fn sizes(cluster: &Cluster) -> Vec<i64> {
    cluster
        .masters()
        .iter()
        .map(|m| as_int(&m.raw().call(&[b"DBSIZE"])))
        .collect()
}

fn strings(frame: &Frame) -> Vec<String> {
    match frame {
        Frame::Array { data, .. } => data.iter().map(text).collect(),
        other => panic!("not an array: {other:?}"),
    }
}

#[test]
fn multi_key_commands_split_by_slot_count_and_order_like_one_redis() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let slots: BTreeSet<u16> = keys.iter().map(|k| cluster.slot_of(k.as_bytes())).collect();
    assert!(slots.len() > 30, "keys over many slots");
    for k in &keys {
        c.call(&[b"SET", k.as_bytes(), format!("v-{k}").as_bytes()]);
    }
    // MGET of keys on every master, with missing ones and a repeat: the client's order.
    let mut mget: Vec<&[u8]> = vec![b"MGET"];
    let asked = ["k3", "nope1", "k17", "k3", "k0", "nope2", "k39"];
    mget.extend(asked.iter().map(|k| k.as_bytes()));
    let got = c.call(&mget);
    let want: Vec<Frame> = asked
        .iter()
        .map(|k| {
            if k.starts_with("nope") {
                Frame::Null
            } else {
                blob(format!("v-{k}").as_bytes())
            }
        })
        .collect();
    assert_eq!(got, array(&want));
    // EXISTS counts repeats, as Redis does; TOUCH counts existing keys.
    let got = c.call(&[b"EXISTS", b"k1", b"k2", b"k1", b"missing", b"k30"]);
    assert_eq!(as_int(&got), 4);
    let got = c.call(&[b"TOUCH", b"k1", b"k2", b"missing", b"k30"]);
    assert_eq!(as_int(&got), 3);
    // DEL and UNLINK remove exactly what they name, on every master, and count it.
    let total: i64 = sizes(&cluster).iter().sum();
    assert_eq!(total, 40);
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(keys[..20].iter().map(|k| k.as_bytes()));
    del.push(b"missing");
    assert_eq!(as_int(&c.call(&del)), 20);
    assert_eq!(sizes(&cluster).iter().sum::<i64>(), 20);
    let mut unlink: Vec<&[u8]> = vec![b"UNLINK"];
    unlink.extend(keys[15..30].iter().map(|k| k.as_bytes()));
    assert_eq!(as_int(&c.call(&unlink)), 10);
    assert_eq!(sizes(&cluster).iter().sum::<i64>(), 10);
    for k in &keys[30..] {
        let owner = cluster.node_for_key(k.as_bytes());
        assert_eq!(
            text(&owner.raw().call(&[b"GET", k.as_bytes()])),
            format!("v-{k}")
        );
    }
    // A pipeline mixing split commands and plain ones keeps its order.
    let mut input = Vec::new();
    for i in 0..50 {
        let (a, b) = (format!("p{i}a"), format!("p{i}b"));
        input.extend(encode_cmd(&[b"SET", a.as_bytes(), b"1"]));
        input.extend(encode_cmd(&[b"SET", b.as_bytes(), b"2"]));
        input.extend(encode_cmd(&[b"MGET", a.as_bytes(), b.as_bytes()]));
        input.extend(encode_cmd(&[b"DEL", a.as_bytes(), b.as_bytes()]));
        input.extend(encode_cmd(&[b"EXISTS", a.as_bytes(), b.as_bytes()]));
    }
    c.send(&input);
    for i in 0..50 {
        assert_eq!(text(&c.read_frame()), "OK", "{i}");
        assert_eq!(text(&c.read_frame()), "OK", "{i}");
        assert_eq!(c.read_frame(), array(&[blob(b"1"), blob(b"2")]), "{i}");
        assert_eq!(as_int(&c.read_frame()), 2, "{i}");
        assert_eq!(as_int(&c.read_frame()), 0, "{i}");
    }
    // Across slots, what splitting would make non-atomic is refused, as by the cluster.
    let got = c.call(&[b"MSET", b"k30", b"x", b"k31", b"y"]);
    assert_eq!(
        error_text(&got),
        "CROSSSLOT Keys in request don't hash to the same slot"
    );
}

#[test]
fn whole_dataset_commands_run_on_every_master() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    let mut all = BTreeSet::new();
    for i in 0..300 {
        let k = format!("d{i}");
        c.call(&[b"SET", k.as_bytes(), b"v"]);
        all.insert(k);
    }
    for i in 0..30 {
        let k = format!("e{i}");
        c.call(&[b"SET", k.as_bytes(), b"v", b"EX", b"1000"]);
        all.insert(k);
    }
    assert!(
        sizes(&cluster).iter().all(|&n| n > 50),
        "{:?}",
        sizes(&cluster)
    );
    // DBSIZE summed, KEYS merged.
    assert_eq!(as_int(&c.call(&[b"DBSIZE"])), 330);
    let keys: BTreeSet<String> = strings(&c.call(&[b"KEYS", b"*"])).into_iter().collect();
    assert_eq!(keys, all);
    let some: BTreeSet<String> = strings(&c.call(&[b"KEYS", b"e*"])).into_iter().collect();
    assert_eq!(some.len(), 30);
    assert!(!text(&c.call(&[b"RANDOMKEY"])).is_empty());
    // INFO's keyspace section is the cluster's; the rest is a master's own.
    let info = text(&c.call(&[b"INFO", b"keyspace"]));
    assert!(info.contains("db0:keys=330,expires=30,"), "{info}");
    let info = text(&c.call(&[b"INFO"]));
    assert!(info.contains("redis_version:"), "{info}");
    assert!(info.contains("db0:keys=330,expires=30,"), "{info}");
    // Scripts and functions are loaded on (and flushed from) every master, so a script
    // runs on whichever master its keys are on.
    let sha = text(&c.call(&[b"SCRIPT", b"LOAD", b"return redis.call('GET', KEYS[1])"]));
    assert_eq!(sha.len(), 40);
    for master in cluster.masters() {
        let exists = master.raw().call(&[b"SCRIPT", b"EXISTS", sha.as_bytes()]);
        assert_eq!(exists, array(&[number(1)]), "on {}", master.port);
    }
    for i in 0..30 {
        let k = format!("d{i}");
        let got = c.call(&[b"EVALSHA", sha.as_bytes(), b"1", k.as_bytes()]);
        assert_eq!(text(&got), "v");
    }
    let got = c.call(&[b"SCRIPT", b"EXISTS", sha.as_bytes(), b"0000"]);
    assert_eq!(got, array(&[number(1), number(0)]));
    // Loaded on one master only: not usable everywhere, so not "existing".
    let lone = "return 'lone'";
    let lone_sha = text(
        &cluster.masters()[0]
            .raw()
            .call(&[b"SCRIPT", b"LOAD", lone.as_bytes()]),
    );
    assert_eq!(
        c.call(&[b"SCRIPT", b"EXISTS", lone_sha.as_bytes()]),
        array(&[number(0)])
    );
    assert_eq!(text(&c.call(&[b"SCRIPT", b"FLUSH"])), "OK");
    for master in cluster.masters() {
        let exists = master.raw().call(&[b"SCRIPT", b"EXISTS", sha.as_bytes()]);
        assert_eq!(exists, array(&[number(0)]));
    }
    assert!(error_text(&c.call(&[b"SCRIPT", b"KILL"])).starts_with("NOTBUSY"));
    let library = "#!lua name=stormlib\nredis.register_function('getit', function(keys) return redis.call('GET', keys[1]) end)";
    assert_eq!(
        text(&c.call(&[b"FUNCTION", b"LOAD", library.as_bytes()])),
        "stormlib"
    );
    for master in cluster.masters() {
        let list = master
            .raw()
            .call(&[b"FUNCTION", b"LIST", b"LIBRARYNAME", b"stormlib"]);
        assert_ne!(list, array(&[]), "on {}", master.port);
    }
    for i in 0..30 {
        let k = format!("d{i}");
        assert_eq!(
            text(&c.call(&[b"FCALL", b"getit", b"1", k.as_bytes()])),
            "v"
        );
    }
    // Loading it again is refused by every master: the client gets that refusal.
    let again = c.call(&[b"FUNCTION", b"LOAD", library.as_bytes()]);
    assert!(error_text(&again).contains("already exists"), "{again:?}");
    assert_eq!(text(&c.call(&[b"FUNCTION", b"DELETE", b"stormlib"])), "OK");
    for master in cluster.masters() {
        let list = master.raw().call(&[b"FUNCTION", b"LIST"]);
        assert_eq!(list, array(&[]));
    }
    // FLUSHDB empties every master, and is answered once all have.
    assert_eq!(text(&c.call(&[b"FLUSHDB"])), "OK");
    assert_eq!(sizes(&cluster), vec![0, 0, 0]);
    assert_eq!(as_int(&c.call(&[b"DBSIZE"])), 0);
    assert_eq!(c.call(&[b"KEYS", b"*"]), array(&[]));
    assert_eq!(c.call(&[b"RANDOMKEY"]), Frame::Null);
    c.call(&[b"SET", b"again", b"1"]);
    assert_eq!(text(&c.call(&[b"FLUSHALL", b"ASYNC"])), "OK");
    assert_eq!(as_int(&c.call(&[b"DBSIZE"])), 0);
}

#[test]
fn a_full_scan_returns_every_key_once_across_masters() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    let mut input = Vec::new();
    for i in 0..3000 {
        input.extend(encode_cmd(&[b"SET", format!("s{i}").as_bytes(), b"v"]));
    }
    c.send(&input);
    for _ in 0..3000 {
        assert_eq!(text(&c.read_frame()), "OK");
    }
    for (pattern, count, expected) in [("*", "100", 3000), ("s1*", "50", 1111)] {
        let mut seen = Vec::new();
        let mut cursor = "0".to_owned();
        let mut calls = 0;
        loop {
            let reply = c.call(&[
                b"SCAN",
                cursor.as_bytes(),
                b"MATCH",
                pattern.as_bytes(),
                b"COUNT",
                count.as_bytes(),
            ]);
            let Frame::Array { data, .. } = reply else {
                panic!("SCAN: {reply:?}");
            };
            cursor = text(&data[0]);
            seen.extend(strings(&data[1]));
            calls += 1;
            assert!(calls < 10_000, "SCAN never ended");
            if cursor == "0" {
                break;
            }
        }
        let distinct: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(distinct.len(), seen.len(), "a key was returned twice");
        assert_eq!(seen.len(), expected, "{pattern}");
    }
    // Cursors stormwall did not make are judged as Redis judges them.
    let got = c.call(&[b"SCAN", b"abc"]);
    assert_eq!(error_text(&got), "ERR invalid cursor");
    // A position past the last master.
    let got = c.call(&[b"SCAN", b"7"]);
    assert_eq!(error_text(&got), "ERR invalid cursor");
    // TYPE passes through to each master.
    c.call(&[b"LPUSH", b"a-list", b"x"]);
    let mut cursor = "0".to_owned();
    let mut lists = Vec::new();
    loop {
        let Frame::Array { data, .. } = c.call(&[
            b"SCAN",
            cursor.as_bytes(),
            b"TYPE",
            b"list",
            b"COUNT",
            b"1000",
        ]) else {
            panic!("SCAN");
        };
        cursor = text(&data[0]);
        lists.extend(strings(&data[1]));
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(lists, vec!["a-list".to_owned()]);
}
