//! An app written for one Redis runs unchanged through stormwall in front of a Redis
//! Cluster: a plain, non-cluster client (the `redis` crate, as redis-py is under
//! django-redis) sends exactly what django-redis's cache, redis-py's lock and a Celery-style
//! queue send — keys of every master mixed in one call, scripts, `SCAN` loops, pipelines,
//! `FLUSHDB` — and every answer is what one Redis would give, checked against the masters
//! themselves where it matters.

mod common;

use std::collections::BTreeSet;
use std::thread;
use std::time::Duration;

use common::cluster::{Cluster, proxy};
use common::*;
use redis::{Commands, Connection, RedisResult};

/// django-redis's default key function: `:<version>:<key>`.
fn cache_key(key: &str) -> String {
    format!(":1:{key}")
}

/// django-redis's `incr`: a script, so a missing key is an error rather than created.
const INCR_SCRIPT: &str = "local exists = redis.call('EXISTS', KEYS[1])\n\
    if (exists == 1) then return redis.call('INCRBY', KEYS[1], ARGV[1]) else return false end";

/// redis-py's `Lock.release`: delete the lock only if this client still holds it.
const LOCK_RELEASE: &str = "local token = redis.call('get', KEYS[1])\n\
    if not token or token ~= ARGV[1] then return 0 end\n\
    redis.call('del', KEYS[1])\nreturn 1";

/// django-redis's `iter_keys`/`delete_pattern`: `SCAN MATCH … COUNT …` until cursor 0.
fn scan(con: &mut Connection, pattern: &str) -> Vec<String> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(100)
            .query(con)
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Where `key` lives, asked of the master that serves it.
fn on_master(cluster: &Cluster, key: &str) -> Option<String> {
    let reply = cluster
        .node_for_key(key.as_bytes())
        .raw()
        .call(&[b"GET", key.as_bytes()]);
    match reply {
        Frame::Null => None,
        other => Some(text(&other)),
    }
}

#[test]
fn django_redis_cache_calls_work_unchanged() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut con = sw.client();
    let users: Vec<String> = (0..200).map(|i| cache_key(&format!("user:{i}"))).collect();

    // cache.set / get / add.
    let _: () = redis::cmd("SET")
        .arg(&users[0])
        .arg("alice")
        .arg("EX")
        .arg(300)
        .query(&mut con)
        .expect("set");
    let got: Option<String> = con.get(&users[0]).expect("get");
    assert_eq!(got.as_deref(), Some("alice"));
    let added: Option<String> = redis::cmd("SET")
        .arg(&users[0])
        .arg("mallory")
        .arg("EX")
        .arg(300)
        .arg("NX")
        .query(&mut con)
        .expect("add");
    assert_eq!(added, None, "add() of an existing key does nothing");

    // cache.set_many: a non-transactional pipeline of SETs over every master.
    let mut pipe = redis::pipe();
    for (i, k) in users.iter().enumerate() {
        pipe.cmd("SET")
            .arg(k)
            .arg(format!("u{i}"))
            .arg("EX")
            .arg(300)
            .ignore();
    }
    let _: () = pipe.query(&mut con).expect("set_many");
    let owners: BTreeSet<u16> = users
        .iter()
        .map(|k| cluster.node_for_key(k.as_bytes()).port)
        .collect();
    assert_eq!(owners.len(), 3, "the keys span every master");
    for (i, k) in users.iter().enumerate() {
        assert_eq!(on_master(&cluster, k), Some(format!("u{i}")), "{k}");
    }

    // cache.get_many: one MGET over every master, values in the caller's order, a miss as nil.
    let mut wanted: Vec<String> = users.iter().step_by(7).cloned().collect();
    wanted.insert(3, cache_key("nobody"));
    let values: Vec<Option<String>> = con.mget(&wanted).expect("get_many");
    for (k, v) in wanted.iter().zip(&values) {
        let expected = users.iter().position(|u| u == k).map(|i| format!("u{i}"));
        assert_eq!(v, &expected, "{k}");
    }

    // has_key, ttl, expire (touch), persist.
    assert!(con.exists::<_, bool>(&users[5]).expect("has_key"));
    let ttl: i64 = con.ttl(&users[5]).expect("ttl");
    assert!((1..=300).contains(&ttl), "ttl {ttl}");
    let touched: bool = con.expire(&users[5], 600).expect("touch");
    assert!(touched);
    let persisted: bool = con.persist(&users[5]).expect("persist");
    assert!(persisted);
    assert_eq!(con.ttl::<_, i64>(&users[5]).expect("ttl"), -1);

    // cache.incr: django-redis's script, by its declared key.
    let counter = cache_key("hits");
    let _: () = con.set(&counter, 10).expect("set counter");
    let n: i64 = redis::cmd("EVAL")
        .arg(INCR_SCRIPT)
        .arg(1)
        .arg(&counter)
        .arg(5)
        .query(&mut con)
        .expect("incr");
    assert_eq!(n, 15);
    let missing: Option<i64> = redis::cmd("EVAL")
        .arg(INCR_SCRIPT)
        .arg(1)
        .arg(cache_key("no-counter"))
        .arg(1)
        .query(&mut con)
        .expect("incr of a missing key");
    assert_eq!(
        missing, None,
        "the script's false is nil, as django-redis expects"
    );

    // cache.keys (KEYS) and iter_keys (SCAN) see every master's keys, each once.
    let expected: BTreeSet<String> = users.iter().cloned().collect();
    let mut listed: Vec<String> = con.keys(cache_key("user:*")).expect("keys");
    listed.sort();
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(listed.len(), users.len());
    let scanned = scan(&mut con, &cache_key("user:*"));
    assert_eq!(scanned.len(), users.len(), "SCAN returns each key once");
    assert_eq!(scanned.into_iter().collect::<BTreeSet<_>>(), expected);

    // cache.delete_many: one DEL over every master (the shield governs it), exact count.
    let doomed: Vec<&String> = users.iter().take(50).collect();
    let deleted: i64 = con.del(&doomed).expect("delete_many");
    assert_eq!(deleted, 50);
    assert!(doomed.iter().all(|k| on_master(&cluster, k).is_none()));
    let again: i64 = con.del(&doomed).expect("delete_many again");
    assert_eq!(again, 0);

    // cache.delete_pattern: SCAN, then a pipeline of DELs.
    let matching = scan(&mut con, &cache_key("user:1*"));
    assert!(!matching.is_empty());
    let mut pipe = redis::pipe();
    for k in &matching {
        pipe.del(k);
    }
    let counts: Vec<i64> = pipe.query(&mut con).expect("delete_pattern");
    assert_eq!(counts.iter().sum::<i64>(), matching.len() as i64);
    assert!(scan(&mut con, &cache_key("user:1*")).is_empty());

    // cache.clear: FLUSHDB, answered once every master is empty.
    let _: () = redis::cmd("FLUSHDB").query(&mut con).expect("clear");
    for master in cluster.masters() {
        assert_eq!(
            as_int(&master.raw().call(&[b"DBSIZE"])),
            0,
            "{}",
            master.addr()
        );
    }
    let size: i64 = redis::cmd("DBSIZE").query(&mut con).expect("dbsize");
    assert_eq!(size, 0);
}

#[test]
fn redis_py_locks_and_a_celery_style_queue_work_unchanged() {
    let cluster = Cluster::start(3, 1);
    let sw = proxy(&cluster, "");
    let mut con = sw.client();

    // redis-py's Lock: SET NX PX to acquire; release by EVALSHA of a script loaded once
    // (SCRIPT LOAD reaches every master, so the SHA runs wherever the lock's key lives).
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(LOCK_RELEASE)
        .query(&mut con)
        .expect("script load");
    for name in ["lock:report", "lock:invoice", "lock:mailer", "lock:thumbs"] {
        let acquired: Option<String> = redis::cmd("SET")
            .arg(name)
            .arg("token-1")
            .arg("NX")
            .arg("PX")
            .arg(10_000)
            .query(&mut con)
            .expect("acquire");
        assert_eq!(acquired.as_deref(), Some("OK"), "{name}");
        let second: Option<String> = redis::cmd("SET")
            .arg(name)
            .arg("token-2")
            .arg("NX")
            .arg("PX")
            .arg(10_000)
            .query(&mut con)
            .expect("second acquire");
        assert_eq!(second, None, "{name} is held");
        let wrong: i64 = redis::cmd("EVALSHA")
            .arg(&sha)
            .arg(1)
            .arg(name)
            .arg("token-2")
            .query(&mut con)
            .expect("release by another");
        assert_eq!(wrong, 0);
        let released: i64 = redis::cmd("EVALSHA")
            .arg(&sha)
            .arg(1)
            .arg(name)
            .arg("token-1")
            .query(&mut con)
            .expect("release");
        assert_eq!(released, 1, "{name}");
        assert_eq!(on_master(&cluster, name), None);
    }
    let lock_masters: BTreeSet<u16> = ["lock:report", "lock:invoice", "lock:mailer", "lock:thumbs"]
        .iter()
        .map(|k| cluster.node_for_key(k.as_bytes()).port)
        .collect();
    assert!(lock_masters.len() > 1, "the locks span masters");

    // A worker blocked on its queue (BRPOP) is woken by a producer's LPUSH.
    let worker_sw_port = sw.port;
    let worker = thread::spawn(move || -> RedisResult<Option<(String, String)>> {
        let mut w = client(worker_sw_port);
        redis::cmd("BRPOP").arg("celery").arg(10).query(&mut w)
    });
    thread::sleep(Duration::from_millis(200));
    let _: i64 = con.lpush("celery", "task-1").expect("lpush");
    let popped = worker.join().expect("worker thread").expect("brpop");
    assert_eq!(popped, Some(("celery".into(), "task-1".into())));

    // Results published on a channel reach a subscriber (cluster pub/sub spans the nodes).
    let mut sub = sw.raw();
    sub.cmd(&[b"SUBSCRIBE", b"celery-task-meta"]);
    assert_eq!(
        sub.read_frame(),
        array(&[blob(b"subscribe"), blob(b"celery-task-meta"), number(1)])
    );
    // The count is of subscribers on the master that took the PUBLISH (Redis Cluster
    // counts per node), which may not be the subscriber's.
    let receivers: i64 = con.publish("celery-task-meta", "done").expect("publish");
    assert!((0..=1).contains(&receivers), "{receivers}");
    let message = sub.read_frame();
    assert_eq!(
        message,
        array(&[blob(b"message"), blob(b"celery-task-meta"), blob(b"done")])
    );

    // A transactional pipeline on keys of one slot (hash tags), as redis-py's
    // pipeline(transaction=True) sends it.
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .incr("{task:9}:tries", 1)
        .incr("{task:9}:tries", 1)
        .query(&mut con)
        .expect("MULTI/EXEC");
    assert_eq!((a, b), (1, 2));
}
