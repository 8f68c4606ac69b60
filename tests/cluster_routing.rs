//! stormwall in front of a real Redis Cluster (3 masters, a replica each: `common::cluster`),
//! talked to by plain, non-cluster clients: commands go to the master of their keys' slot,
//! replies come back in the client's order, redirections (`MOVED`, `ASK`, `TRYAGAIN`) are
//! followed, the client's identity reaches every master, and a master lost with a command
//! in flight closes the client. What each master holds is checked on the master itself.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, add_app_user, proxy};
use common::*;

/// Keys spread over every master (the `i`th of them).
fn key(i: usize) -> Vec<u8> {
    format!("key:{i}").into_bytes()
}

#[test]
fn commands_go_to_their_slots_master_and_replies_keep_the_clients_order() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    // One pipeline, in one write, for keys on every master: SET, INCR and GET interleaved.
    let mut input = Vec::new();
    for i in 0..300 {
        let k = key(i);
        input.extend(encode_cmd(&[b"SET", &k, format!("v{i}").as_bytes()]));
        input.extend(encode_cmd(&[b"INCR", format!("n:{i}").as_bytes()]));
        input.extend(encode_cmd(&[b"GET", &k]));
        input.extend(encode_cmd(&[b"PING"]));
    }
    c.send(&input);
    for i in 0..300 {
        assert_eq!(text(&c.read_frame()), "OK", "SET {i}");
        assert_eq!(as_int(&c.read_frame()), 1, "INCR {i}");
        assert_eq!(text(&c.read_frame()), format!("v{i}"), "GET {i}");
        assert_eq!(text(&c.read_frame()), "PONG", "PING {i}");
    }
    // Each key is on the master the cluster says serves it, and on no other.
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let mut per_master = vec![0; 3];
    for i in 0..300 {
        let k = key(i);
        let owner = cluster.node_for_key(&k).port;
        for (m, master) in masters.iter().enumerate() {
            let got = master.raw().call(&[b"GET", &k]);
            if master.port == owner {
                assert_eq!(text(&got), format!("v{i}"));
                per_master[m] += 1;
            } else {
                assert!(
                    is_error(&got),
                    "key {i} answered by {}: {got:?}",
                    master.port
                );
            }
        }
    }
    assert!(per_master.iter().all(|&n| n > 50), "{per_master:?}");
    // Each master's series counts what it was sent (keyless PINGs go to one master or
    // another), over a connection of its own.
    let scrape = scrape(&sw);
    let sent: Vec<f64> = masters
        .iter()
        .map(|m| {
            value(
                &scrape,
                "stormwall_cluster_node_commands_total",
                &[("node", &*m.addr())],
            )
        })
        .collect();
    for (m, (&sent, &keys)) in sent.iter().zip(&per_master).enumerate() {
        assert!(
            sent >= 3.0 * keys as f64,
            "master {m}: {sent} commands for {keys} keys"
        );
    }
    assert_eq!(sent.iter().sum::<f64>(), 1200.0, "{sent:?}");
    for m in &masters {
        let open = value(
            &scrape,
            "stormwall_cluster_node_connections",
            &[("node", &*m.addr())],
        );
        assert!(open >= 1.0, "connections to {}: {open}", m.addr());
    }
    assert_eq!(value(&scrape, "stormwall_cluster_masters", &[]), 3.0);
    assert_eq!(
        value(&scrape, "stormwall_cluster_slots_served", &[]),
        16384.0
    );
    // Hash tags keep keys together, so multi-key commands run.
    assert_eq!(
        text(&c.call(&[b"MSET", b"{user:1}:a", b"1", b"{user:1}:b", b"2"])),
        "OK"
    );
    let got = c.call(&[b"MGET", b"{user:1}:a", b"{user:1}:b"]);
    assert_eq!(got, array(&[blob(b"1"), blob(b"2")]));
    // The redis crate, as an app would use it.
    let mut app = sw.client();
    let _: () = redis::cmd("SET")
        .arg("app:x")
        .arg(42)
        .query(&mut app)
        .unwrap();
    let v: i64 = redis::cmd("GET").arg("app:x").query(&mut app).unwrap();
    assert_eq!(v, 42);
}

#[test]
fn what_redis_cluster_refuses_is_refused_in_its_own_words() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    // Two keys in two slots: the master of the first refuses, as any cluster node would.
    let (a, b) = (b"a".as_slice(), b"b".as_slice());
    assert_ne!(cluster.slot_of(a), cluster.slot_of(b));
    let crossslot = "CROSSSLOT Keys in request don't hash to the same slot";
    for cmd in [
        &[&b"MSET"[..], a, b"1", b, b"2"][..],
        &[b"MSETNX", a, b"1", b, b"2"],
        &[b"RENAME", a, b],
        &[b"SMOVE", a, b, b"m"],
        &[b"SUNIONSTORE", a, b],
    ] {
        let got = c.call(cmd);
        assert_eq!(error_text(&got), crossslot, "{cmd:?}");
        // The same as a cluster node says directly.
        let direct = cluster.node_for_key(a).raw().call(cmd);
        assert_eq!(got, direct, "{cmd:?}");
    }
    assert_eq!(c.call(&[b"GET", a]), Frame::Null, "nothing ran");
    // A cluster has database 0 only.
    assert_eq!(text(&c.call(&[b"SELECT", b"0"])), "OK");
    assert_eq!(
        error_text(&c.call(&[b"SELECT", b"1"])),
        "ERR SELECT is not allowed in cluster mode"
    );
    assert_eq!(
        error_text(&c.call(&[b"SELECT", b"x"])),
        "ERR value is not an integer or out of range"
    );
    // Keyless commands: any master answers.
    assert_eq!(text(&c.call(&[b"PING"])), "PONG");
    assert_eq!(text(&c.call(&[b"ECHO", b"hi"])), "hi");
    assert_eq!(
        error_text(&c.call(&[b"NO-SUCH-COMMAND"])),
        "ERR unknown command 'NO-SUCH-COMMAND', with args beginning with: "
    );
    assert!(error_text(&c.call(&[b"GET"])).contains("wrong number of arguments"));
    // Inline commands are routed too.
    c.send(b"SET inline:k v\r\nGET inline:k\r\n");
    assert_eq!(text(&c.read_frame()), "OK");
    assert_eq!(text(&c.read_frame()), "v");
    assert_eq!(
        text(
            &cluster
                .node_for_key(b"inline:k")
                .raw()
                .call(&[b"GET", b"inline:k"])
        ),
        "v"
    );
    // Not supported yet: said so, and the connection goes on.
    let got = c.call(&[b"CLIENT", b"ID"]);
    assert!(
        error_text(&got).contains("not supported with a Redis Cluster upstream"),
        "{got:?}"
    );
    assert_eq!(text(&c.call(&[b"PING"])), "PONG");
}

#[test]
fn the_clients_identity_reaches_every_master() {
    let cluster = Cluster::start(3, 1);
    add_app_user(&cluster);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    assert_eq!(
        error_text(&c.call(&[b"AUTH", b"app", b"wrong"])),
        "WRONGPASS invalid username-password pair or user is disabled."
    );
    assert_eq!(text(&c.call(&[b"AUTH", b"app", b"secret"])), "OK");
    for i in 0..30 {
        let k = format!("app:{i}");
        assert_eq!(text(&c.call(&[b"SET", k.as_bytes(), b"1"])), "OK");
        // The user's key pattern is enforced by each master.
        let other = format!("other:{i}");
        let refused = c.call(&[b"SET", other.as_bytes(), b"1"]);
        assert!(error_text(&refused).starts_with("NOPERM"), "{refused:?}");
    }
    let whoami = c.call(&[b"ACL", b"WHOAMI"]);
    assert_eq!(text(&whoami), "app");
    // Its name is kept for it (GETNAME), and no shared connection keeps it.
    assert_eq!(text(&c.call(&[b"CLIENT", b"SETNAME", b"worker-1"])), "OK");
    assert_eq!(text(&c.call(&[b"CLIENT", b"GETNAME"])), "worker-1");
    for master in cluster.masters() {
        let list = text(&master.raw().call(&[b"CLIENT", b"LIST"]));
        assert!(!list.contains("name=worker-1"), "{list}");
    }
    // RESP3 through every master.
    let mut r3 = sw.raw();
    let hello = r3.call(&[b"HELLO", b"3", b"AUTH", b"app", b"secret"]);
    assert!(matches!(hello, Frame::Map { .. }), "{hello:?}");
    for i in 0..30 {
        let k = format!("app:r3:{i}");
        assert_eq!(r3.call(&[b"GET", k.as_bytes()]), Frame::Null);
        let h = format!("app:h:{i}");
        r3.call(&[b"HSET", h.as_bytes(), b"f", b"v"]);
        let all = r3.call(&[b"HGETALL", h.as_bytes()]);
        assert!(matches!(all, Frame::Map { .. }), "{all:?}");
    }
}

#[test]
fn moved_ask_and_tryagain_are_followed() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    // Keys in the slots that resharding will move.
    let from = cluster.master_of_slot(0).port;
    let to = cluster.master_of_slot(16383).port;
    let moving: Vec<Vec<u8>> = (0..5000)
        .map(|i| format!("m:{i}").into_bytes())
        .filter(|k| cluster.slot_of(k) < 100)
        .take(20)
        .collect();
    assert!(moving.len() >= 5);
    for k in &moving {
        assert_eq!(text(&c.call(&[b"SET", k, b"before"])), "OK");
    }
    cluster.reshard(from, to, 100);
    // The old owner answers MOVED; stormwall follows it and refreshes its map.
    for k in &moving {
        assert_eq!(text(&c.call(&[b"GET", k])), "before");
        assert_eq!(text(&c.call(&[b"SET", k, b"after"])), "OK");
        assert_eq!(text(&cluster.node_at(to).raw().call(&[b"GET", k])), "after");
    }
    assert!(
        metric(
            &sw,
            "stormwall_cluster_redirects_total",
            &[("kind", "moved")]
        ) >= 1.0
    );

    // A slot half-way through a migration: its keys that left answer ASK.
    let slot = cluster.slot_of(b"{ask}1");
    let source = cluster.master_of_slot(slot).port;
    let target = cluster
        .masters()
        .into_iter()
        .find(|m| m.port != source)
        .expect("another master")
        .port;
    let (source_id, target_id) = (cluster.id(source), cluster.id(target));
    let slot_text = slot.to_string();
    assert_eq!(text(&c.call(&[b"SET", b"{ask}1", b"one"])), "OK");
    assert_eq!(text(&c.call(&[b"SET", b"{ask}2", b"two"])), "OK");
    let t = cluster.node_at(target).raw().call(&[
        b"CLUSTER",
        b"SETSLOT",
        slot_text.as_bytes(),
        b"IMPORTING",
        source_id.as_bytes(),
    ]);
    assert_eq!(text(&t), "OK");
    let s = cluster.node_at(source).raw().call(&[
        b"CLUSTER",
        b"SETSLOT",
        slot_text.as_bytes(),
        b"MIGRATING",
        target_id.as_bytes(),
    ]);
    assert_eq!(text(&s), "OK");
    let port = target.to_string();
    let migrated = cluster.node_at(source).raw().call(&[
        b"MIGRATE",
        b"127.0.0.1",
        port.as_bytes(),
        b"{ask}1",
        b"0",
        b"5000",
    ]);
    assert_eq!(text(&migrated), "OK");
    // {ask}1 left: ASK to the target, where ASKING lets it be read.
    assert_eq!(text(&c.call(&[b"GET", b"{ask}1"])), "one");
    // {ask}2 is still on the source, which answers.
    assert_eq!(text(&c.call(&[b"GET", b"{ask}2"])), "two");
    // A new key of the migrating slot is created on the target.
    assert_eq!(text(&c.call(&[b"SET", b"{ask}3", b"three"])), "OK");
    let mut on_target = cluster.node_at(target).raw();
    on_target.call(&[b"ASKING"]);
    assert_eq!(text(&on_target.call(&[b"GET", b"{ask}3"])), "three");
    assert!(metric(&sw, "stormwall_cluster_redirects_total", &[("kind", "ask")]) >= 2.0);
    // Keys split between the two ends: TRYAGAIN until the migration ends, then it runs.
    let finish = {
        let (source_port, target_port) = (source, target);
        let slot_text = slot_text.clone();
        let target_id = target_id.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut s = Raw::connect(source_port);
            let moved = s.call(&[
                b"MIGRATE",
                b"127.0.0.1",
                target_port.to_string().as_bytes(),
                b"{ask}2",
                b"0",
                b"5000",
            ]);
            assert_eq!(text(&moved), "OK");
            for port in [target_port, source_port] {
                let done = Raw::connect(port).call(&[
                    b"CLUSTER",
                    b"SETSLOT",
                    slot_text.as_bytes(),
                    b"NODE",
                    target_id.as_bytes(),
                ]);
                assert_eq!(text(&done), "OK");
            }
        })
    };
    let mut m = sw.raw();
    let got = m.call(&[b"MGET", b"{ask}1", b"{ask}2"]);
    assert_eq!(got, array(&[blob(b"one"), blob(b"two")]), "{got:?}");
    finish.join().expect("the migration finished");
    assert!(
        metric(
            &sw,
            "stormwall_cluster_redirects_total",
            &[("kind", "tryagain")]
        ) >= 1.0
    );
}

#[test]
fn a_failed_master_is_replaced_and_in_flight_commands_close_the_client() {
    let mut cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "outage_wait = \"30s\"\n");
    let k = b"victim".as_slice();
    let master = cluster.node_for_key(k).port;
    let mut c = sw.raw();
    assert_eq!(text(&c.call(&[b"SET", k, b"1"])), "OK");
    // Wait until the replica has the write, so the failover keeps it.
    let replica = cluster.replicas_of(master)[0].port;
    eventually(
        "the replica to have the key",
        Duration::from_secs(10),
        || {
            let mut r = cluster.node_at(replica).raw();
            r.call(&[b"READONLY"]);
            text(&r.call(&[b"GET", k])) == "1"
        },
    );
    // A command in flight when its master dies: the client is closed.
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &cluster.node_at(master).pid().to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    c.cmd(&[b"GET", k]);
    std::thread::sleep(Duration::from_millis(200));
    cluster.kill(master);
    assert!(c.closed(), "the client with a command in flight is closed");
    // A client with nothing in flight waits for the replica to take over, and is served.
    let mut d = sw.raw();
    d.stream
        .set_read_timeout(Some(Duration::from_secs(40)))
        .expect("timeout");
    assert_eq!(text(&d.call(&[b"GET", k])), "1");
    assert_eq!(text(&d.call(&[b"INCR", k])), "2");
    assert!(metric(&sw, "stormwall_cluster_slot_map_changes_total", &[]) >= 1.0);
    // At least once: a node that has not heard of the failover yet may answer a refresh
    // with the old map, and the next one counts the promotion again.
    assert!(metric(&sw, "stormwall_cluster_failovers_total", &[]) >= 1.0);
}
