//! The upstream moving under load: a reload that changes `upstream.address`, and a
//! Sentinel-managed master that fails over (`upstream.kind = "sentinel"`), with real
//! `redis-server` processes, real Sentinels and clients writing all the while.
//!
//! What must hold: every client request ends; writes go to the new server and stop reaching
//! the old one; shared clients keep their connections through a planned move (a reload, a
//! `SENTINEL FAILOVER`); clients with a connection of their own (dedicated mode, a
//! subscriber) are closed and can reconnect; after a crash of the master, clients carry on
//! once Sentinel has promoted a replica.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;

/// What one writer saw.
#[derive(Default)]
struct Tally {
    /// Writes Redis acknowledged.
    ok: AtomicU64,
    /// Error replies (a `-READONLY` from a master turned replica during a failover).
    refused: AtomicU64,
    /// Connections that failed (closed by stormwall, or a timeout).
    dropped: AtomicU64,
    /// The last write acknowledged: its sequence number.
    last: AtomicU64,
}

/// Writers through stormwall: each `SET`s its own key to an increasing number, reconnecting
/// when its connection fails, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tallies: Vec<Arc<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, writers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tallies = Vec::new();
        let mut threads = Vec::new();
        for w in 0..writers {
            let tally = Arc::new(Tally::default());
            tallies.push(tally.clone());
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let url = format!("redis://127.0.0.1:{port}/");
                let mut seq = 0u64;
                let mut conn: Option<redis::Connection> = None;
                while !stop.load(Ordering::Relaxed) {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match redis::Client::open(url.as_str())
                            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
                        {
                            Ok(c) => {
                                // No request may hang: a stuck one fails the test below.
                                let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
                                conn.insert(c)
                            }
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                        },
                    };
                    seq += 1;
                    let set: redis::RedisResult<()> = redis::cmd("SET")
                        .arg(format!("writer:{w}"))
                        .arg(seq)
                        .query(c);
                    match set {
                        Ok(()) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                            tally.last.store(seq, Ordering::Relaxed);
                        }
                        Err(e)
                            if e.kind()
                                == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) =>
                        {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e)
                            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() =>
                        {
                            tally.dropped.fetch_add(1, Ordering::Relaxed);
                            conn = None;
                        }
                        Err(e) => panic!("writer {w}: unexpected reply {e:?}"),
                    }
                }
            }));
        }
        Load {
            stop,
            tallies,
            threads,
        }
    }

    fn total(&self, field: impl Fn(&Tally) -> &AtomicU64) -> u64 {
        self.tallies
            .iter()
            .map(|t| field(t).load(Ordering::Relaxed))
            .sum()
    }

    /// Waits until every writer has had `more` writes acknowledged beyond `from`.
    fn progress(&self, from: &[u64], more: u64, what: &str) {
        eventually(what, Duration::from_secs(30), || {
            self.tallies
                .iter()
                .zip(from)
                .all(|(t, f)| t.ok.load(Ordering::Relaxed) >= f + more)
        });
    }

    fn oks(&self) -> Vec<u64> {
        self.tallies
            .iter()
            .map(|t| t.ok.load(Ordering::Relaxed))
            .collect()
    }

    /// Stops the writers; every one must end (no request hangs).
    fn finish(self) -> Vec<Arc<Tally>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a writer panicked");
        }
        self.tallies
    }
}

/// A client that subscribed through stormwall: on a connection of its own in both modes.
fn subscriber(sw: &Stormwall) -> Raw {
    let mut sub = sw.raw();
    sub.cmd(&[b"SUBSCRIBE", b"news"]);
    assert_eq!(
        sub.read_frame(),
        array(&[blob(b"subscribe"), blob(b"news"), number(1)])
    );
    sub
}

/// Every writer's last acknowledged write is what `redis` holds.
fn assert_last_writes_on(redis: &Redis, tallies: &[Arc<Tally>]) {
    let mut check = redis.raw();
    for (w, t) in tallies.iter().enumerate() {
        let last = t.last.load(Ordering::Relaxed);
        let stored = text(&check.call(&[b"GET", format!("writer:{w}").as_bytes()]));
        assert_eq!(
            stored,
            last.to_string(),
            "writer {w}'s last write is on {}",
            redis.addr()
        );
    }
}

fn set_calls(redis_port: u16) -> u64 {
    let info = text(&Raw::connect(redis_port).call(&[b"INFO", b"commandstats"]));
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_set:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_reload_moves_clients_to_the_new_address() {
    let old = Redis::start();
    let new = Redis::start();
    let sw = Stormwall::start(&old.addr(), "");
    let original = std::fs::read_to_string(&sw.config_path).unwrap();
    let load = Load::start(sw.port, 8);
    load.progress(&[0; 8], 20, "writes through stormwall to the first Redis");
    let mut sub = subscriber(&sw);

    std::fs::write(&sw.config_path, original.replace(&old.addr(), &new.addr())).unwrap();
    sw.signal("HUP");
    eventually("stormwall to move", Duration::from_secs(10), || {
        metric(
            &sw,
            "stormwall_upstream_moves_total",
            &[("cause", "reload")],
        ) == 1.0
    });
    let moved = load.oks();
    load.progress(&moved, 50, "every writer to go on writing after the move");

    // Writes no longer reach the old server.
    let before = set_calls(old.port);
    let now = load.oks();
    load.progress(&now, 20, "more writes");
    assert_eq!(set_calls(old.port), before, "a write went to the old Redis");
    assert!(sub.closed(), "a subscriber to the old Redis must be closed");

    let tallies = load.finish();
    assert_last_writes_on(&new, &tallies);
    for t in &tallies {
        assert_eq!(t.refused.load(Ordering::Relaxed), 0);
    }
    let dropped: u64 = tallies
        .iter()
        .map(|t| t.dropped.load(Ordering::Relaxed))
        .sum();
    if shared_mode() {
        assert_eq!(
            dropped, 0,
            "shared clients must keep their connections through a reload"
        );
    } else {
        // Each dedicated client had its own connection to the old Redis.
        assert!(
            dropped >= 8,
            "dedicated clients are closed at the move ({dropped})"
        );
    }
}

/// A `redis-server --sentinel` process watching master `mymaster`.
struct Sentinel {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
        Sentinel::start_with(master_port, "")
    }

    /// Starts a Sentinel with `extra` lines in its config file.
    fn start_with(master_port: u16, extra: &str) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        let mut f = std::fs::File::create(&conf).unwrap();
        write!(
            f,
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 4000\n\
             sentinel parallel-syncs mymaster 1\n{extra}",
            dir = dir.path().display()
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server --sentinel");
        let s = Sentinel {
            port,
            child,
            _dir: dir,
        };
        eventually("a Sentinel to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        s
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn call(&self, args: &[&[u8]]) -> Frame {
        Raw::connect(self.port).call(args)
    }

    /// The master's port as this Sentinel names it.
    fn master_port(&self) -> u16 {
        match self.call(&[b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", b"mymaster"]) {
            Frame::Array { data, .. } if data.len() == 2 => text(&data[1]).parse().unwrap(),
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count(frame: &Frame) -> usize {
    match frame {
        Frame::Array { data, .. } => data.len(),
        _ => 0,
    }
}

#[test]
fn a_sentinel_failover_is_followed_under_load() {
    let a = Redis::start();
    let b = Redis::start_with(&["--replicaof", "127.0.0.1", &a.port.to_string()]);
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(a.port)).collect();
    // Failover needs the Sentinels to know each other and the replica.
    eventually(
        "the Sentinels to find each other and the replica",
        Duration::from_secs(30),
        || {
            sentinels.iter().all(|s| {
                count(&s.call(&[b"SENTINEL", b"SENTINELS", b"mymaster"])) == 2
                    && count(&s.call(&[b"SENTINEL", b"REPLICAS", b"mymaster"])) == 1
            })
        },
    );
    let list = sentinels
        .iter()
        .map(|s| format!("\"{}\"", s.addr()))
        .collect::<Vec<_>>()
        .join(", ");
    // The configured address is a closed port: only Sentinel's answer leads to Redis.
    let sw = Stormwall::start(
        "127.0.0.1:1",
        &format!("kind = \"sentinel\"\nsentinels = [{list}]\nmaster_name = \"mymaster\"\n"),
    );
    let load = Load::start(sw.port, 8);
    load.progress(&[0; 8], 20, "writes through stormwall to the master");
    let mut sub = subscriber(&sw);
    let on_a = set_calls(a.port);
    assert!(on_a > 0, "the writes go to the master Sentinel names");

    // A planned failover: b becomes the master.
    let reply = sentinels[0].call(&[b"SENTINEL", b"FAILOVER", b"mymaster"]);
    assert_eq!(text(&reply), "OK");
    eventually(
        "stormwall to follow the failover",
        Duration::from_secs(30),
        || {
            metric(
                &sw,
                "stormwall_upstream_moves_total",
                &[("cause", "sentinel")],
            ) >= 1.0
        },
    );
    assert_eq!(sentinels[0].master_port(), b.port);
    let moved = load.oks();
    load.progress(
        &moved,
        50,
        "every writer to go on writing on the new master",
    );
    assert!(set_calls(b.port) > 0, "writes reach the new master");
    assert!(
        sub.closed(),
        "a subscriber to the old master must be closed"
    );
    let dropped_planned = load.total(|t| &t.dropped);
    if shared_mode() {
        assert_eq!(
            dropped_planned, 0,
            "shared clients must keep their connections through a planned failover"
        );
    }

    // The new master crashes: Sentinel promotes a (the old master, now its replica).
    let b_pid = {
        let info = text(&Raw::connect(b.port).call(&[b"INFO", b"server"]));
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse::<u32>().ok())
            .expect("b's pid")
    };
    eventually(
        "a to replicate from b",
        Duration::from_secs(30),
        || match Raw::connect(a.port).call(&[b"ROLE"]) {
            Frame::Array { data, .. } => data.first().is_some_and(|r| text(r) == "slave"),
            _ => false,
        },
    );
    let status = Command::new("kill")
        .args(["-KILL", &b_pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually(
        "Sentinel to promote a again",
        Duration::from_secs(60),
        || sentinels[1].master_port() == a.port,
    );
    let crashed = load.oks();
    load.progress(&crashed, 20, "every writer to carry on after the crash");
    let tallies = load.finish();
    assert_last_writes_on(&a, &tallies);
    assert!(
        metric(
            &sw,
            "stormwall_upstream_moves_total",
            &[("cause", "sentinel")]
        ) >= 2.0
    );
}

#[test]
fn sentinel_credentials_are_used_and_a_refusal_is_reported() {
    let master = Redis::start();
    let sentinel = Sentinel::start_with(master.port, "requirepass s3cret\n");
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("sentinel-password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let settings = |file: &std::path::Path| {
        format!(
            "kind = \"sentinel\"\nsentinels = [\"{}\"]\nmaster_name = \"mymaster\"\n\
             sentinel_password_file = \"{}\"\n",
            sentinel.addr(),
            file.display()
        )
    };
    let sw = Stormwall::start("127.0.0.1:1", &settings(&password));
    let mut c = sw.raw();
    assert_eq!(text(&c.call(&[b"SET", b"via", b"sentinel"])), "OK");
    assert_eq!(text(&master.raw().call(&[b"GET", b"via"])), "sentinel");

    // A wrong password: no master, said once in the log, and /readyz is 503.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let refused = Stormwall::start("127.0.0.1:1", &settings(&wrong));
    eventually("the refusal to be logged", Duration::from_secs(10), || {
        refused.log().contains("no Sentinel names a usable master")
    });
    assert!(
        refused.log().contains("refused the login"),
        "{}",
        refused.log()
    );
    assert_eq!(admin_get(&refused, "/readyz").0, 503);
    assert!(
        metric(
            &refused,
            "stormwall_sentinel_lookups_total",
            &[("result", "failed")]
        ) >= 1.0
    );
}

/// A shared client whose delete waits in the shield when the upstream moves keeps its
/// connection, and its delete runs on the new server (a failover's new master holds the
/// same keys; the delete is still wanted there).
#[test]
fn a_delete_waiting_in_the_shield_runs_on_the_new_server() {
    let old = Redis::start();
    let new = Redis::start();
    for redis in [&old, &new] {
        let mut c = redis.raw();
        for i in 0..20 {
            c.call(&[b"SET", format!("k{i}").as_bytes(), b"v"]);
        }
    }
    // 10 keys at once, then 2 keys/s: the second DEL of 10 keys waits about 5 s.
    let sw = Stormwall::start(
        &old.addr(),
        "mode = \"shared\"\nshared_connections = 1\n[invalidation]\nadaptive = false\n\
         keys_per_second = 2\nkeys_burst = 10\nmax_wait = \"60s\"\n",
    );
    let original = std::fs::read_to_string(&sw.config_path).unwrap();
    let mut client = sw.raw();
    let first: Vec<Vec<u8>> = (0..10).map(|i| format!("k{i}").into_bytes()).collect();
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(first.iter().map(|k| k.as_slice()));
    assert_eq!(
        as_int(&client.call(&del)),
        10,
        "the first DEL runs on the old Redis"
    );
    let second: Vec<Vec<u8>> = (10..20).map(|i| format!("k{i}").into_bytes()).collect();
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(second.iter().map(|k| k.as_slice()));
    client.cmd(&del);
    eventually(
        "the second DEL to wait in the shield",
        Duration::from_secs(10),
        || metric(&sw, "stormwall_invalidation_queue_depth", &[]) >= 1.0,
    );

    std::fs::write(&sw.config_path, original.replace(&old.addr(), &new.addr())).unwrap();
    sw.signal("HUP");
    eventually("stormwall to move", Duration::from_secs(10), || {
        metric(
            &sw,
            "stormwall_upstream_moves_total",
            &[("cause", "reload")],
        ) == 1.0
    });
    // Another client's command retires the shared connection to the old Redis (there is
    // one): the waiting client's connection was that one.
    assert_eq!(text(&sw.raw().call(&[b"PING"])), "PONG");
    assert_eq!(
        as_int(&client.read_frame()),
        10,
        "the waiting DEL's count is the new Redis's"
    );
    assert_eq!(
        as_int(&new.raw().call(&[b"DBSIZE"])),
        10,
        "k10..k19 deleted on the new Redis"
    );
    assert_eq!(
        as_int(&old.raw().call(&[b"DBSIZE"])),
        10,
        "nothing more deleted on the old one"
    );
    assert_eq!(
        text(&client.call(&[b"PING"])),
        "PONG",
        "the client keeps its connection"
    );
}
