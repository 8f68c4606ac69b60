//! A plain client's transactions, blocking commands and pub/sub in front of a real Redis
//! Cluster: each on a private connection to the one master that owns their keys, the
//! client routed as usual before and after. Outcomes are checked on the masters.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, proxy};
use common::*;

/// Keys on every master, one per master, none sharing a slot.
fn spread(cluster: &Cluster) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for i in 0..1000 {
        let k = format!("spread:{i}").into_bytes();
        let port = cluster.node_for_key(&k).port;
        if out.iter().all(|o| cluster.node_for_key(o).port != port) {
            out.push(k);
        }
    }
    assert_eq!(out.len(), 3);
    out
}

#[test]
fn transactions_run_on_the_master_of_their_keys() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    let keys = spread(&cluster);
    // Whatever master the previous command went to, a pipelined transaction goes to its
    // keys' master, and routing resumes after it.
    for k in &keys {
        c.call(&[b"SET", k, b"before"]);
        let mut input = encode_cmd(&[b"MULTI"]);
        input.extend(encode_cmd(&[b"SET", b"{t}a", b"1"]));
        input.extend(encode_cmd(&[b"INCR", b"{t}n"]));
        input.extend(encode_cmd(&[b"GET", b"{t}a"]));
        input.extend(encode_cmd(&[b"EXEC"]));
        input.extend(encode_cmd(&[b"GET", k]));
        c.send(&input);
        assert_eq!(text(&c.read_frame()), "OK");
        for _ in 0..3 {
            assert_eq!(text(&c.read_frame()), "QUEUED");
        }
        let Frame::Array { data, .. } = c.read_frame() else {
            panic!("EXEC");
        };
        assert_eq!(text(&data[0]), "OK");
        assert_eq!(text(&data[2]), "1");
        assert_eq!(text(&c.read_frame()), "before");
    }
    assert_eq!(
        text(&cluster.node_for_key(b"{t}n").raw().call(&[b"GET", b"{t}n"])),
        "3"
    );
    // The redis crate's atomic pipeline, as an app would use it.
    let mut app = sw.client();
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .incr("{app}x", 1)
        .incr("{app}x", 10)
        .query(&mut app)
        .unwrap();
    assert_eq!((a, b), (1, 11));
    // A key on another master: refused (MOVED) by the transaction's master, as a cluster
    // node refuses it, which aborts the transaction; nothing runs.
    let mut input = encode_cmd(&[b"MULTI"]);
    input.extend(encode_cmd(&[b"SET", &keys[0], b"x"]));
    input.extend(encode_cmd(&[b"SET", &keys[1], b"y"]));
    input.extend(encode_cmd(&[b"EXEC"]));
    c.send(&input);
    assert_eq!(text(&c.read_frame()), "OK");
    assert_eq!(text(&c.read_frame()), "QUEUED");
    let refused = c.read_frame();
    assert!(error_text(&refused).starts_with("MOVED"), "{refused:?}");
    assert!(error_text(&c.read_frame()).starts_with("EXECABORT"));
    assert_eq!(text(&c.call(&[b"GET", &keys[0]])), "before");
    // Two slots of one master: EXEC is refused with CROSSSLOT, as by the cluster.
    let a = b"same:0".to_vec();
    let b = (1..1000)
        .map(|i| format!("same:{i}").into_bytes())
        .find(|k| {
            cluster.node_for_key(k).port == cluster.node_for_key(&a).port
                && cluster.slot_of(k) != cluster.slot_of(&a)
        })
        .expect("another slot of the same master");
    let mut input = encode_cmd(&[b"MULTI"]);
    input.extend(encode_cmd(&[b"SET", &a, b"x"]));
    input.extend(encode_cmd(&[b"SET", &b, b"y"]));
    input.extend(encode_cmd(&[b"EXEC"]));
    c.send(&input);
    assert_eq!(text(&c.read_frame()), "OK");
    assert_eq!(text(&c.read_frame()), "QUEUED");
    assert_eq!(text(&c.read_frame()), "QUEUED");
    let refused = c.read_frame();
    assert!(error_text(&refused).starts_with("CROSSSLOT"), "{refused:?}");
    assert_eq!(c.call(&[b"GET", &a]), Frame::Null);
    // MULTI on its own (an interactive client waits for its +OK): it goes to the master the
    // previous command went to, so a transaction on that master's keys runs.
    c.call(&[b"GET", b"{i}x"]);
    assert_eq!(text(&c.call(&[b"MULTI"])), "OK");
    assert_eq!(text(&c.call(&[b"SET", b"{i}x", b"1"])), "QUEUED");
    assert_eq!(text(&c.call(&[b"DISCARD"])), "OK");
    assert_eq!(c.call(&[b"GET", b"{i}x"]), Frame::Null);
    // WATCH: another client's write aborts the transaction; without one it runs.
    for interfere in [true, false] {
        assert_eq!(text(&c.call(&[b"WATCH", b"{w}k"])), "OK");
        let seen = c.call(&[b"GET", b"{w}k"]);
        if interfere {
            let mut other = sw.raw();
            assert_eq!(text(&other.call(&[b"SET", b"{w}k", b"other"])), "OK");
        }
        let mut input = encode_cmd(&[b"MULTI"]);
        input.extend(encode_cmd(&[b"SET", b"{w}k", b"mine"]));
        input.extend(encode_cmd(&[b"EXEC"]));
        c.send(&input);
        assert_eq!(text(&c.read_frame()), "OK");
        assert_eq!(text(&c.read_frame()), "QUEUED");
        let exec = c.read_frame();
        if interfere {
            assert_eq!(exec, Frame::Null, "aborted (it saw {seen:?})");
            assert_eq!(text(&c.call(&[b"GET", b"{w}k"])), "other");
        } else {
            assert_eq!(
                exec,
                array(&[Frame::SimpleString {
                    data: "OK".into(),
                    attributes: None
                }])
            );
            assert_eq!(text(&c.call(&[b"GET", b"{w}k"])), "mine");
        }
    }
    // An identity command inside a transaction is refused, and the transaction aborted.
    let mut input = encode_cmd(&[b"MULTI"]);
    input.extend(encode_cmd(&[b"SET", b"{t}z", b"1"]));
    input.extend(encode_cmd(&[b"AUTH", b"nobody", b"pw"]));
    input.extend(encode_cmd(&[b"EXEC"]));
    c.send(&input);
    assert_eq!(text(&c.read_frame()), "OK");
    assert_eq!(text(&c.read_frame()), "QUEUED");
    let refused = c.read_frame();
    assert!(
        error_text(&refused).contains("inside-MULTI-unsupported"),
        "{refused:?}"
    );
    assert!(error_text(&c.read_frame()).starts_with("EXECABORT"));
    assert_eq!(c.call(&[b"GET", b"{t}z"]), Frame::Null);
    // EXEC without MULTI is Redis's error; routing goes on.
    assert!(error_text(&c.call(&[b"EXEC"])).contains("EXEC without MULTI"));
    for k in &keys {
        assert_eq!(text(&c.call(&[b"GET", k])), "before");
    }
}

#[test]
fn blocking_commands_wait_on_their_master_and_what_follows_waits_for_them() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let keys = spread(&cluster);
    let mut c = sw.raw();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    c.call(&[b"SET", &keys[1], b"v1"]);
    // BLPOP, then commands for other masters, in one write: they are answered after it.
    let mut input = encode_cmd(&[b"BLPOP", b"queue", b"0"]);
    input.extend(encode_cmd(&[b"GET", &keys[1]]));
    input.extend(encode_cmd(&[b"SET", &keys[2], b"after"]));
    c.send(&input);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        c.try_read_frame_now().is_none(),
        "BLPOP blocks, and what follows waits"
    );
    let mut pusher = sw.raw();
    assert_eq!(as_int(&pusher.call(&[b"LPUSH", b"queue", b"job"])), 1);
    assert_eq!(c.read_frame(), array(&[blob(b"queue"), blob(b"job")]));
    assert_eq!(text(&c.read_frame()), "v1");
    assert_eq!(text(&c.read_frame()), "OK");
    assert_eq!(
        text(
            &cluster
                .node_for_key(&keys[2])
                .raw()
                .call(&[b"GET", &keys[2]])
        ),
        "after"
    );
    // A timeout is Redis's own.
    assert_eq!(c.call(&[b"BLPOP", b"empty", b"0.1"]), Frame::Null);
    // BLMOVE between keys of one slot.
    pusher.call(&[b"RPUSH", b"{q}src", b"a"]);
    assert_eq!(
        text(&c.call(&[b"BLMOVE", b"{q}src", b"{q}dst", b"LEFT", b"RIGHT", b"1"])),
        "a"
    );
    // WAIT counts the replica's acknowledgement of the client's earlier write.
    c.call(&[b"SET", &keys[0], b"replicated"]);
    assert_eq!(as_int(&c.call(&[b"WAIT", b"1", b"5000"])), 1);
    // A client that leaves while blocked takes its blocked command with it.
    let mut leaver = sw.raw();
    leaver.cmd(&[b"BLPOP", b"nothing", b"0"]);
    let owner = cluster.node_for_key(b"nothing");
    eventually("the BLPOP to block", Duration::from_secs(10), || {
        text(&owner.raw().call(&[b"INFO", b"clients"])).contains("blocked_clients:1")
    });
    drop(leaver);
    eventually("the blocked BLPOP to end", Duration::from_secs(10), || {
        text(&owner.raw().call(&[b"INFO", b"clients"])).contains("blocked_clients:0")
    });
}

#[test]
fn pubsub_works_cluster_wide_and_sharded_channels_by_slot() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut sub = sw.raw();
    let subscribed = sub.call(&[b"SUBSCRIBE", b"news"]);
    assert_eq!(
        subscribed,
        array(&[blob(b"subscribe"), blob(b"news"), number(1)])
    );
    // Published through stormwall, and on each master directly: the cluster carries it.
    let mut publisher = sw.raw();
    publisher.call(&[b"PUBLISH", b"news", b"via-stormwall"]);
    assert_eq!(
        sub.read_frame(),
        array(&[blob(b"message"), blob(b"news"), blob(b"via-stormwall")])
    );
    for master in cluster.masters() {
        master.raw().call(&[b"PUBLISH", b"news", b"direct"]);
        assert_eq!(
            sub.read_frame(),
            array(&[blob(b"message"), blob(b"news"), blob(b"direct")])
        );
    }
    // Sharded: the channel's slot's master.
    let mut ssub = sw.raw();
    let got = ssub.call(&[b"SSUBSCRIBE", b"orders"]);
    assert_eq!(
        got,
        array(&[blob(b"ssubscribe"), blob(b"orders"), number(1)])
    );
    assert_eq!(as_int(&publisher.call(&[b"SPUBLISH", b"orders", b"o1"])), 1);
    assert_eq!(
        ssub.read_frame(),
        array(&[blob(b"smessage"), blob(b"orders"), blob(b"o1")])
    );
    // RESET after logging in: back to the default user, routed as before.
    for node in cluster.live() {
        node.raw()
            .call(&[b"ACL", b"SETUSER", b"app", b"on", b">pw", b"~*", b"+@all"]);
    }
    let mut c = sw.raw();
    assert_eq!(text(&c.call(&[b"AUTH", b"app", b"pw"])), "OK");
    assert_eq!(text(&c.call(&[b"ACL", b"WHOAMI"])), "app");
    assert_eq!(text(&c.call(&[b"RESET"])), "RESET");
    assert_eq!(text(&c.call(&[b"ACL", b"WHOAMI"])), "default");
    for k in spread(&cluster) {
        assert_eq!(text(&c.call(&[b"SET", &k, b"1"])), "OK");
    }
}
