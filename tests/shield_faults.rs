//! The shield when Redis dies: Redis killed and restarted while an invalidation storm is
//! queued. Every request ends in its real result or an error reply; none hangs; none is
//! acknowledged without having been applied (G4, G6).

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Redis, Stormwall};

#[derive(Debug, Default)]
struct Tally {
    acked: u64,
    errors: u64,
    connection_errors: u64,
    /// Keys whose DEL was acknowledged: they must not exist afterwards.
    deleted: Vec<String>,
    /// Keys whose SET was acknowledged, with when.
    written: Vec<(String, Instant)>,
    /// When each acknowledged FLUSHDB was sent.
    flushes_sent: Vec<Instant>,
    bad_errors: Vec<String>,
}

#[test]
fn redis_killed_and_restarted_during_a_queued_storm() {
    // Redis persists every write, so data written before the crash is there after it: an
    // invalidation acknowledged but not applied would leave its keys behind.
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap().to_owned();
    let mut redis = Redis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir_arg,
    ]);
    // A slow key budget so a storm really queues up inside stormwall.
    let sw = Stormwall::start(
        &redis.addr(),
        "[invalidation]\nkeys_per_second = 400\nkeys_burst = 20\nmax_wait = \"1s\"\n\
         [flush]\nmin_interval = \"100ms\"\n",
    );
    let url = sw.url();
    let stop_at = Instant::now() + Duration::from_secs(4);
    let (done_tx, done_rx) = mpsc::channel();
    for c in 0..24 {
        let url = url.clone();
        let done_tx = done_tx.clone();
        thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let mut tally = Tally::default();
            let mut con = None;
            let mut i = 0u64;
            while Instant::now() < stop_at {
                i += 1;
                if con.is_none() {
                    con = client
                        .get_connection_with_timeout(Duration::from_secs(1))
                        .ok();
                    if con.is_none() {
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
                let Some(c_ref) = con.as_mut() else { continue };
                // Keys nobody else writes, so what is left at the end tells the truth.
                let key = format!("storm:{c}:{i}");
                if redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .query::<()>(c_ref)
                    .is_ok()
                {
                    tally.written.push((key.clone(), Instant::now()));
                }
                let flush = c % 6 == 0 && i.is_multiple_of(4);
                let sent = Instant::now();
                let result = if flush {
                    redis::cmd("FLUSHDB").query::<String>(c_ref).map(|_| ())
                } else {
                    redis::cmd("DEL")
                        .arg(&key)
                        .arg(format!("other:{c}"))
                        .query::<i64>(c_ref)
                        .map(|_| ())
                };
                match result {
                    Ok(()) => {
                        tally.acked += 1;
                        if flush {
                            tally.flushes_sent.push(sent);
                        } else {
                            tally.deleted.push(key);
                        }
                    }
                    Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                        tally.connection_errors += 1;
                        con = None;
                    }
                    Err(e) => {
                        tally.errors += 1;
                        let msg = e.to_string();
                        let explicit = msg.contains("not applied")
                            || msg.contains("may or may not")
                            || msg.contains("count")
                            || msg.contains("cannot reach upstream")
                            // Redis's own answer while it loads its data after the restart,
                            // what a client talking to it directly gets too.
                            || msg.contains("loading the dataset");
                        if !explicit {
                            tally.bad_errors.push(msg);
                        }
                        con = None;
                    }
                }
            }
            let _ = done_tx.send(tally);
        });
    }
    drop(done_tx);
    thread::sleep(Duration::from_millis(600));
    redis.kill();
    // Longer than max_wait: some queued requests must give up while Redis is gone.
    thread::sleep(Duration::from_millis(1500));
    redis.restart();

    // Every client finishes: nothing hangs past the storm plus generous slack.
    let mut total = Tally::default();
    for _ in 0..24 {
        let t = done_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("a client hung\n{}", sw.log()));
        total.acked += t.acked;
        total.errors += t.errors;
        total.connection_errors += t.connection_errors;
        total.deleted.extend(t.deleted);
        total.written.extend(t.written);
        total.flushes_sent.extend(t.flushes_sent);
        total.bad_errors.extend(t.bad_errors);
    }
    assert!(
        total.bad_errors.is_empty(),
        "errors that do not say what happened: {:?}",
        total.bad_errors
    );
    assert!(total.acked > 0, "no invalidation succeeded at all");
    assert!(
        total.errors + total.connection_errors > 0,
        "killing Redis went unnoticed"
    );

    let mut direct = redis.client();
    let exists = |con: &mut redis::Connection, key: &str| {
        redis::cmd("EXISTS").arg(key).query::<i64>(con).unwrap() == 1
    };
    let falsely_deleted: Vec<&String> = total
        .deleted
        .iter()
        .filter(|k| exists(&mut direct, k))
        .collect();
    assert!(
        falsely_deleted.is_empty(),
        "DEL acknowledged but keys still there: {falsely_deleted:?}"
    );
    if let Some(last_flush) = total.flushes_sent.iter().max() {
        let survivors: Vec<&String> = total
            .written
            .iter()
            .filter(|(_, at)| at < last_flush)
            .map(|(k, _)| k)
            .filter(|k| exists(&mut direct, k))
            .collect();
        assert!(
            survivors.is_empty(),
            "written before an acknowledged FLUSHDB, still there: {survivors:?}"
        );
    }

    // And the shield works again once Redis is back.
    let mut con = sw.client();
    let _: () = redis::cmd("SET")
        .arg("after")
        .arg(1)
        .query(&mut con)
        .unwrap();
    assert_eq!(
        redis::cmd("DEL")
            .arg("after")
            .query::<i64>(&mut con)
            .unwrap(),
        1
    );
    assert_eq!(
        redis::cmd("FLUSHDB").query::<String>(&mut con).unwrap(),
        "OK"
    );
}
