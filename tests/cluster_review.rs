//! Breaks of the contract in front of a Redis Cluster found in review, each reproduced
//! against a real cluster (`common::cluster`) before it was fixed. What the masters hold is
//! checked on the masters.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, add_app_user, keyslots, proxy};
use common::*;

/// Moves `slot` (holding no keys) to the master on `to`, by hand, on every master.
fn move_slot(cluster: &Cluster, slot: u16, to: u16) {
    let id = cluster.id(to);
    let slot = slot.to_string();
    // The new owner first, so the others' MOVED point somewhere that serves it.
    let mut ports: Vec<u16> = cluster.masters().iter().map(|m| m.port).collect();
    ports.sort_by_key(|&p| p != to);
    for port in ports {
        let r = cluster.node_at(port).raw().call(&[
            b"CLUSTER",
            b"SETSLOT",
            slot.as_bytes(),
            b"NODE",
            id.as_bytes(),
        ]);
        assert_eq!(text(&r), "OK", "SETSLOT on {port}");
    }
    cluster.wait_settled();
}

/// A client that connected (and routed a command) under the first slot map, and the port
/// of the master `key`'s slot was then moved to.
fn connected_before_a_move(cluster: &Cluster, sw: &Stormwall, key: &[u8]) -> (Raw, u16) {
    let slot = cluster.slot_of(key);
    let from = cluster.master_of_slot(slot).port;
    let to = cluster
        .masters()
        .into_iter()
        .find(|m| m.port != from)
        .expect("another master")
        .port;
    let mut worker = sw.raw();
    assert_eq!(text(&worker.call(&[b"PING"])), "PONG");
    move_slot(cluster, slot, to);
    (worker, to)
}

/// A blocking command whose master moved since the client's slot map was made is
/// redirected; the redirected command must still block as long as it takes (no
/// `upstream.reply_timeout`), and must not sit on a shared connection (other clients'
/// commands would queue behind it).
#[test]
fn a_redirected_blocking_command_blocks_on_a_connection_of_its_own() {
    let cluster = Cluster::start(3, 0);
    let sw = proxy(&cluster, "reply_timeout = \"1s\"\n");
    let key = b"{queue}jobs".as_slice();
    let (mut worker, to) = connected_before_a_move(&cluster, &sw, key);
    // Another client of the same identity, on the new owner, while the worker waits.
    let mut other = sw.raw();
    let other_key = (0..10_000)
        .map(|i| format!("other:{i}").into_bytes())
        .find(|k| cluster.node_for_key(k).port == to)
        .expect("a key on the new owner");
    worker
        .stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    worker.cmd(&[b"BLPOP", key, b"0"]);
    // Longer than the reply timeout: a blocked command is owed no reply within it.
    std::thread::sleep(Duration::from_millis(2500));
    for _ in 0..3 {
        assert_eq!(
            text(&other.call(&[b"SET", &other_key, b"v"])),
            "OK",
            "a client of the same identity on the new owner is served meanwhile"
        );
    }
    let pushed = cluster.node_at(to).raw().call(&[b"RPUSH", key, b"job-1"]);
    assert_eq!(as_int(&pushed), 1);
    let got = worker
        .try_read_frame()
        .expect("the blocked client was closed instead of getting its element");
    assert_eq!(got, array(&[blob(key), blob(b"job-1")]));
    assert_eq!(text(&worker.call(&[b"PING"])), "PONG");
}

/// The same with the router's map already current: the private connection goes to the
/// slot's master as the router knows it now, not as the client's first map said.
#[test]
fn a_blocking_command_goes_to_the_current_master_of_its_slot() {
    let cluster = Cluster::start(3, 0);
    let sw = proxy(&cluster, "reply_timeout = \"1s\"\n");
    let key = b"{queue2}jobs".as_slice();
    let (mut worker, _) = connected_before_a_move(&cluster, &sw, key);
    // Another client's command makes the router learn the new map.
    let mut other = sw.raw();
    assert_eq!(other.call(&[b"GET", key]), Frame::Null);
    eventually(
        "the router to have the new map",
        Duration::from_secs(10),
        || metric(&sw, "stormwall_cluster_slot_map_changes_total", &[]) >= 1.0,
    );
    worker
        .stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let moved = || {
        metric(
            &sw,
            "stormwall_cluster_redirects_total",
            &[("kind", "moved")],
        )
    };
    let before = moved();
    // Blocks (2 s, past the reply timeout) and times out on the master that serves the
    // key: a nil, and no MOVED on the way.
    let got = worker.call(&[b"BLPOP", key, b"2"]);
    assert_eq!(got, Frame::Null, "{got:?}");
    assert_eq!(moved(), before, "the blocking command was not redirected");
}

/// A `DEL` across masters that the shield does not govern is split by slot; when some
/// parts ran and another was refused, the client must not get the refusal (it would take
/// it for "nothing deleted"): its connection is closed, as a lost connection leaves it.
#[test]
fn a_split_delete_whose_parts_end_differently_closes_the_client() {
    let cluster = Cluster::start(3, 0);
    add_app_user(&cluster);
    let sw = proxy(&cluster, "\n[invalidation]\nenabled = false\n");
    let mine = b"app:1".as_slice();
    let theirs = (0..10_000)
        .map(|i| format!("other:{i}").into_bytes())
        .find(|k| cluster.node_for_key(k).port != cluster.node_for_key(mine).port)
        .expect("a key on another master");
    for k in [mine, theirs.as_slice()] {
        cluster.node_for_key(k).raw().call(&[b"SET", k, b"v"]);
    }
    let mut c = sw.raw();
    assert_eq!(text(&c.call(&[b"AUTH", b"app", b"secret"])), "OK");
    c.cmd(&[b"DEL", mine, &theirs]);
    let reply = c.try_read_frame();
    // The part on `mine`'s master ran, the other was refused (NOPERM).
    assert_eq!(
        as_int(&cluster.node_for_key(mine).raw().call(&[b"EXISTS", mine])),
        0
    );
    assert!(
        reply.is_none(),
        "a DEL that deleted a key was answered {reply:?}"
    );
    // All parts refused: nothing ran, Redis's own refusal is the answer.
    let mut d = sw.raw();
    assert_eq!(text(&d.call(&[b"AUTH", b"app", b"secret"])), "OK");
    let refused = d.call(&[b"DEL", b"x:1", &theirs]);
    assert!(error_text(&refused).starts_with("NOPERM"), "{refused:?}");
    assert_eq!(as_int(&d.call(&[b"DEL", b"app:2", b"app:3"])), 0);
}

/// A command pipelined behind a blocking command goes where it would have gone had it come
/// alone: `DBSIZE` counts every master, a `DEL` across slots is split, not refused.
#[test]
fn commands_behind_a_blocked_command_are_routed_as_usual() {
    let cluster = Cluster::start(3, 0);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    let keys: Vec<Vec<u8>> = (0..30).map(|i| format!("k:{i}").into_bytes()).collect();
    for k in &keys {
        assert_eq!(text(&c.call(&[b"SET", k, b"v"])), "OK");
    }
    let mut input = encode_cmd(&[b"BLPOP", b"{b}list", b"1"]);
    input.extend(encode_cmd(&[b"DBSIZE"]));
    input.extend(encode_cmd(&[b"MGET", &keys[0], &keys[1], &keys[2]]));
    input.extend(encode_cmd(&[b"DEL", &keys[0], &keys[1], &keys[2]]));
    input.extend(encode_cmd(&[b"DBSIZE"]));
    c.send(&input);
    assert_eq!(c.read_frame(), Frame::Null);
    assert_eq!(as_int(&c.read_frame()), 30);
    assert_eq!(c.read_frame(), array(&[blob(b"v"), blob(b"v"), blob(b"v")]));
    assert_eq!(as_int(&c.read_frame()), 3);
    assert_eq!(as_int(&c.read_frame()), 27);
}

/// Numbers of keys a client gives (`EVAL`'s `numkeys`, `ZUNIONSTORE`'s, `LMPOP`'s) at the
/// edges of what fits in 64 bits: Redis's own refusal, the connection kept.
#[test]
fn hostile_key_counts_get_redis_refusal_and_no_panic() {
    let cluster = Cluster::start(3, 0);
    let sw = proxy(&cluster, "");
    let mut c = sw.raw();
    let huge = i64::MAX.to_string();
    let negative = i64::MIN.to_string();
    for count in [
        huge.as_bytes(),
        negative.as_bytes(),
        b"-1",
        b"18446744073709551615",
    ] {
        for cmd in [
            vec![b"EVAL".as_slice(), b"return 1", count, b"k"],
            vec![b"FCALL", b"f", count, b"k"],
            vec![b"ZUNIONSTORE", b"d", count, b"k"],
            vec![b"LMPOP", count, b"k", b"LEFT"],
            vec![b"SINTERCARD", count, b"k"],
        ] {
            let reply = c.call(&cmd);
            assert!(is_error(&reply), "{cmd:?}: {reply:?}");
        }
    }
    assert_eq!(text(&c.call(&[b"PING"])), "PONG");
}

/// A `DEL` naming keys in thousands of slots, through the shield: one exact count.
///
/// Each master runs its slots' parts as batch scripts (a batch spans slots). When each
/// slot was a batch of its own, one round trip after another, the ~12,800 slots
/// outlasted `invalidation.max_wait` and left the client closed. `max_wait` is raised
/// because the tests run a debug build on a shared machine.
#[test]
fn a_delete_of_keys_in_thousands_of_slots_gets_its_exact_count() {
    let cluster = Cluster::start(3, 0);
    let sw = proxy(&cluster, "[invalidation]\nmax_wait = \"60s\"\n");
    let mut c = sw.raw();
    let keys: Vec<Vec<u8>> = (0..20_000)
        .map(|i| format!("many:{i}").into_bytes())
        .collect();
    let mut input = Vec::new();
    for k in keys.iter().step_by(2) {
        input.extend(encode_cmd(&[b"SET", k, b"v"]));
    }
    c.send(&input);
    for _ in keys.iter().step_by(2) {
        assert_eq!(text(&c.read_frame()), "OK");
    }
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(keys.iter().map(|k| k.as_slice()));
    c.stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let began = std::time::Instant::now();
    let reply = c.call(&del);
    let took = began.elapsed();
    let slots: std::collections::BTreeSet<u16> = keyslots(&mut cluster.nodes[0].raw(), &keys)
        .into_iter()
        .collect();
    eprintln!("DEL of 20,000 keys in {} slots: {took:.1?}", slots.len());
    assert_eq!(as_int(&reply), 10_000, "{reply:?}");
    assert_eq!(as_int(&c.call(&[b"DBSIZE"])), 0);
}

/// The rate budget decides for a cluster request as a whole: a `DEL` split by slot either
/// runs entirely (its exact count) or is refused entirely (nothing deleted) — never some
/// parts run and the rest refused for budget, which left the client closed.
#[test]
fn the_budget_admits_or_refuses_a_split_delete_as_a_whole() {
    let cluster = Cluster::start(3, 0);
    let sw = proxy(
        &cluster,
        "\n[invalidation]\ncommands_per_second = 1\ncommands_burst = 3\nmax_wait = \"2s\"\nadaptive = false\n",
    );
    let mut c = sw.raw();
    let mut slots = std::collections::BTreeSet::new();
    let keys: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("b:{i}").into_bytes())
        .filter(|k| slots.insert(cluster.slot_of(k)))
        .take(20)
        .collect();
    for k in &keys {
        cluster.node_for_key(k).raw().call(&[b"SET", k, b"v"]);
    }
    let del = |c: &mut Raw, keys: &[Vec<u8>]| {
        let mut cmd: Vec<&[u8]> = vec![b"DEL"];
        cmd.extend(keys.iter().map(|k| k.as_slice()));
        c.cmd(&cmd);
        c.try_read_frame()
    };
    // Ten slots on three masters, a burst of three commands: the request is charged one
    // command per master (each runs its slots as one script), the whole burst.
    let first = del(&mut c, &keys[..10]).expect("an answer, not a closed connection");
    assert_eq!(as_int(&first), 10, "{first:?}");
    // No budget left for the next one within max_wait: refused, nothing deleted.
    let second = del(&mut c, &keys[10..]).expect("an answer, not a closed connection");
    assert!(is_error(&second), "{second:?}");
    for k in &keys[10..] {
        assert_eq!(
            as_int(&cluster.node_for_key(k).raw().call(&[b"EXISTS", k])),
            1
        );
    }
}
