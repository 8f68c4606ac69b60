//! A real Redis Cluster changing under a plain clients' load through stormwall: slots
//! moved by `redis-cli --cluster reshard`, a planned `CLUSTER FAILOVER`, and a master
//! killed (SIGKILL). Twenty clients keep writing, reading back and deleting keys of their
//! own all the while; a checker then finds that no acknowledged write was lost, no read
//! gave a wrong value, and every request ended (answered, or its connection closed — a
//! fate the client library treats as unknown, as with a Redis that fails).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::cluster::{Cluster, proxy};
use common::*;

/// What one key's writer knows of it.
#[derive(Default, Clone, Debug)]
struct Known {
    /// The last acknowledged state (`None`: deleted, or never written).
    acked: Option<String>,
    /// States whose request ended with the connection closed since then: each may or may
    /// not have been applied.
    unknown: Vec<Option<String>>,
}

impl Known {
    fn possible(&self) -> Vec<Option<String>> {
        let mut out = vec![self.acked.clone()];
        out.extend(self.unknown.iter().cloned());
        out
    }
}

/// What one writer saw.
#[derive(Default, Debug)]
struct Report {
    keys: HashMap<String, Known>,
    requests: u64,
    closed: u64,
    /// Deletes the shield refused as not applied.
    refused: u64,
    wrong: Vec<String>,
}

/// One request, on a connection opened (again) if needed: `None` if the connection closed
/// before the reply (the request's fate is unknown).
fn request(conn: &mut Option<Raw>, port: u16, args: &[&[u8]]) -> Option<Frame> {
    let c = conn.get_or_insert_with(|| {
        let c = Raw::connect(port);
        c.stream
            .set_read_timeout(Some(Duration::from_secs(40)))
            .expect("timeout");
        c
    });
    c.cmd(args);
    let reply = c.try_read_frame();
    if reply.is_none() {
        *conn = None;
    }
    reply
}

/// Writes, reads back and deletes keys of its own until `stop`; with `wait`, a write
/// counts as acknowledged only once a replica has it (`WAIT 1`), so a master's crash
/// cannot take it.
fn writer(port: u16, me: usize, stop: Arc<AtomicBool>, wait: bool) -> Report {
    let mut report = Report::default();
    let mut conn = None;
    let keys: Vec<String> = (0..40).map(|i| format!("w{me}:k{i}")).collect();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for key in &keys {
            seq += 1;
            let known = report.keys.entry(key.clone()).or_default();
            // Every sixth step deletes (through the shield), the rest write.
            let next = (!seq.is_multiple_of(6)).then(|| format!("{me}-{seq}"));
            report.requests += 1;
            let reply = match &next {
                Some(v) => request(&mut conn, port, &[b"SET", key.as_bytes(), v.as_bytes()]),
                None => request(&mut conn, port, &[b"DEL", key.as_bytes()]),
            };
            let Some(reply) = reply else {
                report.closed += 1;
                known.unknown.push(next);
                continue;
            };
            if is_error(&reply) {
                // The shield may refuse a delete it could not run in time (a failover under
                // way): it says so, and the key keeps its state.
                if !(next.is_none() && error_text(&reply).contains("not applied")) {
                    report.wrong.push(format!("{key}: {reply:?}"));
                }
                report.refused += 1;
                continue;
            }
            if wait && next.is_some() {
                report.requests += 1;
                match request(&mut conn, port, &[b"WAIT", b"1", b"2000"]) {
                    Some(Frame::Number { data: 1, .. }) => {}
                    Some(other) => {
                        // Not replicated in time: it may or may not survive a crash.
                        let _ = other;
                        known.unknown.push(next);
                        continue;
                    }
                    None => {
                        report.closed += 1;
                        known.unknown.push(next);
                        continue;
                    }
                }
            }
            known.acked = next;
            known.unknown.clear();
            // Read it back: exactly the acknowledged state.
            report.requests += 1;
            match request(&mut conn, port, &[b"GET", key.as_bytes()]) {
                None => report.closed += 1,
                Some(got) => {
                    let got = match got {
                        Frame::Null => None,
                        other => Some(text(&other)),
                    };
                    if got != known.acked {
                        report.wrong.push(format!(
                            "{key}: read {got:?}, acknowledged {:?}",
                            known.acked
                        ));
                    }
                }
            }
        }
    }
    report
}

/// Starts 20 writers, runs `change` on the cluster, lets the writers go on for a moment
/// after it, stops them, and checks every key against the cluster itself.
fn under_load(cluster: &mut Cluster, wait: bool, change: impl FnOnce(&mut Cluster)) -> u64 {
    let mut sw = proxy(cluster, "outage_wait = \"20s\"\n");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..20)
        .map(|me| {
            let (port, stop) = (sw.port, stop.clone());
            std::thread::spawn(move || writer(port, me, stop, wait))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    change(cluster);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    let mut closed = 0;
    let mut refused = 0;
    let mut lost = Vec::new();
    for w in writers {
        let Ok(report) = w.join() else {
            let running = sw.is_running();
            let log = sw.log();
            eprintln!("stormwall running: {running}");
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "a writer failed; stormwall's log ends:\n{}",
                tail.join("\n")
            );
        };
        assert!(report.wrong.is_empty(), "wrong replies: {:?}", report.wrong);
        requests += report.requests;
        closed += report.closed;
        refused += report.refused;
        for (key, known) in &report.keys {
            let owner = cluster.node_for_key(key.as_bytes());
            let got = match owner.raw().call(&[b"GET", key.as_bytes()]) {
                Frame::Null => None,
                other => Some(text(&other)),
            };
            if !known.possible().contains(&got) {
                lost.push(format!("{key}: {got:?}, acknowledged {known:?}"));
            }
        }
    }
    // For a look at what stormwall did: its log, kept where this names.
    if let Ok(path) = std::env::var("STORMWALL_TEST_KEEP_LOG") {
        std::fs::write(path, sw.log()).expect("log written");
    }
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    eprintln!(
        "{requests} requests, {closed} ended with a closed connection, {refused} deletes \
         refused as not applied, redirects {:?}",
        ["moved", "ask", "tryagain", "clusterdown"].map(|k| metric(
            &sw,
            "stormwall_cluster_redirects_total",
            &[("kind", k)]
        ))
    );
    closed
}

#[test]
fn resharding_under_load_loses_nothing() {
    let mut cluster = Cluster::start(3, 1);
    let closed = under_load(&mut cluster, false, |cluster| {
        let a = cluster.master_of_slot(0).port;
        let b = cluster.master_of_slot(16383).port;
        cluster.reshard(a, b, 1000);
        cluster.reshard(b, a, 500);
    });
    // Nothing failed: no client had its connection closed.
    assert_eq!(closed, 0);
}

#[test]
fn a_planned_failover_under_load_loses_nothing() {
    let mut cluster = Cluster::start(3, 1);
    let closed = under_load(&mut cluster, false, |cluster| {
        let master = cluster.master_of_slot(0).port;
        let replica = cluster.replicas_of(master)[0].port;
        cluster.failover(replica);
    });
    assert_eq!(closed, 0);
}

#[test]
fn a_killed_master_under_load_loses_no_replicated_write() {
    let mut cluster = Cluster::start(3, 1);
    under_load(&mut cluster, true, |cluster| {
        let master = cluster.master_of_slot(0).port;
        cluster.kill(master);
        // The cluster promotes the replica; the writers carry on through stormwall.
        eventually("the replica to take over", Duration::from_secs(30), || {
            cluster
                .live()
                .all(|n| text(&n.raw().call(&[b"CLUSTER", b"INFO"])).contains("cluster_state:ok"))
        });
    });
}
