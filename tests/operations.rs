//! Operating stormwall: the admin endpoint (metrics checked against a known workload with a
//! real Prometheus text parser), readiness following Redis, and live config reload under load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Redis, Stormwall, admin_get, scrape, text, value};

fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_count_a_known_workload() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    // The harness's own readiness check connected once already.
    let connections_before = value(&scrape(&sw), "stormwall_client_connections_total", &[]);
    let mut raw = sw.raw();
    for i in 0..50 {
        raw.call(&[b"SET", format!("k{i}").as_bytes(), b"v"]);
    }
    for i in 0..30 {
        raw.call(&[b"GET", format!("k{i}").as_bytes()]);
    }
    for i in 0..10 {
        // Each DEL names two keys, one of which exists.
        raw.call(&[
            b"DEL",
            format!("k{i}").as_bytes(),
            format!("missing{i}").as_bytes(),
        ]);
    }
    raw.call(&[b"FLUSHDB"]);
    raw.send(b"*1\r\n:1\r\n"); // a protocol error closes the connection
    assert!(raw.closed());
    let mut second = sw.raw();
    second.call(&[b"PING"]);

    let s = scrape(&sw);
    assert_eq!(
        value(&s, "stormwall_commands_total", &[("class", "passthrough")]),
        81.0,
        "50 SET + 30 GET + 1 PING"
    );
    assert_eq!(
        value(&s, "stormwall_commands_total", &[("class", "governed")]),
        11.0,
        "10 DEL + 1 FLUSHDB"
    );
    assert_eq!(
        value(
            &s,
            "stormwall_invalidation_requests_total",
            &[("command", "delete")]
        ),
        10.0
    );
    assert_eq!(
        value(
            &s,
            "stormwall_invalidation_requests_total",
            &[("command", "flushdb")]
        ),
        1.0
    );
    assert_eq!(
        value(&s, "stormwall_invalidation_keys_received_total", &[]),
        20.0
    );
    assert_eq!(
        value(
            &s,
            "stormwall_flushes_executed_total",
            &[("command", "flushdb")]
        ),
        1.0
    );
    assert_eq!(value(&s, "stormwall_protocol_errors_total", &[]), 1.0);
    assert_eq!(
        value(&s, "stormwall_client_connections_total", &[]) - connections_before,
        2.0
    );
    assert_eq!(value(&s, "stormwall_client_connections", &[]), 1.0);
    assert_eq!(value(&s, "stormwall_upstream_up", &[]), 1.0);
    assert_eq!(value(&s, "stormwall_invalidation_queue_depth", &[]), 0.0);
    // Histograms are real histograms with buckets, and count what happened.
    let rtt = s
        .samples
        .iter()
        .find(|x| x.metric == "stormwall_upstream_rtt_seconds")
        .expect("rtt histogram");
    match &rtt.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let total = buckets.last().map(|b| b.count).unwrap_or(0.0);
            assert!(
                total >= 81.0,
                "one RTT sample per answered run, got {total}"
            );
        }
        other => panic!("stormwall_upstream_rtt_seconds is not a histogram: {other:?}"),
    }
    // Every metric has help text.
    for name in [
        "stormwall_commands_total",
        "stormwall_upstream_rtt_seconds",
        "stormwall_invalidation_wait_seconds",
    ] {
        assert!(s.docs.contains_key(name), "{name} has no HELP");
    }
    let (status, body) = admin_get(&sw, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, config) = admin_get(&sw, "/config");
    assert_eq!(status, 200);
    assert!(
        config.contains(&format!("address = \"127.0.0.1:{}\"", sw.port)),
        "{config}"
    );
}

#[test]
fn readyz_follows_redis() {
    let mut redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[admin]\nprobe_interval = \"100ms\"\n");
    wait_until("ready", Duration::from_secs(5), || {
        admin_get(&sw, "/readyz").0 == 200
    });
    redis.kill();
    wait_until(
        "not ready after Redis stopped",
        Duration::from_secs(10),
        || {
            let (status, body) = admin_get(&sw, "/readyz");
            status == 503 && body.contains("upstream")
        },
    );
    assert_eq!(value(&scrape(&sw), "stormwall_upstream_up", &[]), 0.0);
    assert_eq!(
        admin_get(&sw, "/healthz").0,
        200,
        "alive even when Redis is not"
    );
    redis.restart();
    wait_until(
        "ready again after Redis returned",
        Duration::from_secs(10),
        || admin_get(&sw, "/readyz").0 == 200,
    );
    assert_eq!(text(&sw.raw().call(&[b"PING"])), "PONG");
}

#[test]
fn reload_tightens_limits_live_and_rejects_a_broken_file() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let original = std::fs::read_to_string(&sw.config_path).unwrap();

    // Clients under load for the whole test: none may see an error or a dropped connection.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..8)
        .map(|c| {
            let mut con = sw.client();
            let (stop, done) = (stop.clone(), done.clone());
            thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("load{c}:{}", i % 10);
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(i)
                        .query::<()>(&mut con)
                        .expect("SET failed during reload");
                    redis::cmd("DEL")
                        .arg(&key)
                        .query::<i64>(&mut con)
                        .expect("DEL failed during reload");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    wait_until("load running", Duration::from_secs(5), || {
        done.load(Ordering::Relaxed) > 100
    });

    let mut probe = sw.raw();
    assert_eq!(text(&probe.call(&[b"FLUSHALL"])), "OK");

    // Tighten: deny FLUSHALL.
    std::fs::write(
        &sw.config_path,
        format!("{original}[flush]\ndeny = [\"FLUSHALL\"]\n"),
    )
    .unwrap();
    sw.signal("HUP");
    wait_until(
        "FLUSHALL denied after reload",
        Duration::from_secs(5),
        || text(&probe.call(&[b"FLUSHALL"])).contains("denied"),
    );
    assert_eq!(
        value(
            &scrape(&sw),
            "stormwall_config_reloads_total",
            &[("result", "ok")]
        ),
        1.0
    );

    // A broken file is rejected; the tightened policy stays.
    std::fs::write(
        &sw.config_path,
        format!("{original}[flush]\ndeny = [\"FLUSHEVERYTHING\"]\n"),
    )
    .unwrap();
    sw.signal("HUP");
    wait_until("failed reload counted", Duration::from_secs(5), || {
        value(
            &scrape(&sw),
            "stormwall_config_reloads_total",
            &[("result", "failed")],
        ) == 1.0
    });
    assert!(
        text(&probe.call(&[b"FLUSHALL"])).contains("denied"),
        "old limits must stay after a rejected reload"
    );
    assert!(sw.log().contains("config reload rejected"), "{}", sw.log());

    // A restart-only change is reported and not applied: the old port keeps serving.
    std::fs::write(
        &sw.config_path,
        original.replace(&format!("127.0.0.1:{}", sw.port), "127.0.0.1:1"),
    )
    .unwrap();
    sw.signal("HUP");
    wait_until(
        "restart-only change reported",
        Duration::from_secs(5),
        || sw.log().contains("only change on restart"),
    );
    assert_eq!(text(&sw.raw().call(&[b"PING"])), "PONG");

    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join()
            .expect("a client under load saw an error during reloads");
    }
    assert!(done.load(Ordering::Relaxed) > 100);
}

#[test]
fn log_has_no_colour_codes_when_stderr_is_a_file() {
    // The harness sends stormwall's stderr to a file, as systemd, Docker and Kubernetes do.
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    assert_eq!(text(&sw.raw().call(&[b"PING"])), "PONG");
    let log = sw.log();
    assert!(log.contains("stormwall listening"), "{log}");
    assert!(
        !log.contains("\x1b["),
        "ANSI escape codes in a log written to a file:\n{log:?}"
    );
}

/// Opens a connection to the admin port and sends the start of a request line, never the
/// rest: the slow-loris pattern.
fn half_open_admin(sw: &Stormwall) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", sw.admin_port)).unwrap();
    s.write_all(b"GET /heal").unwrap();
    s
}

/// True once the peer has closed `s` (a read returns EOF or a reset) within `within`.
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // hyper may answer 408 before closing; keep reading until the close.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn admin_closes_half_open_connections_and_keeps_answering() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let start = Instant::now();
    let mut slow: Vec<_> = (0..200).map(|_| half_open_admin(&sw)).collect();
    // While they hang, probes are answered.
    for _ in 0..5 {
        assert_eq!(admin_get(&sw, "/healthz"), (200, "ok\n".into()));
        thread::sleep(Duration::from_millis(200));
    }
    // Each is closed once the header-read timeout (5 s) has passed.
    for s in &mut slow {
        let left = Duration::from_secs(10).saturating_sub(start.elapsed());
        assert!(
            closed_within(s, left.max(Duration::from_millis(1))),
            "a half-open admin connection was still open after {:?}",
            start.elapsed()
        );
    }
    assert!(
        start.elapsed() >= Duration::from_secs(4),
        "closed too early"
    );
    assert_eq!(admin_get(&sw, "/healthz").0, 200);

    // Beyond the connection cap (256), new connections are closed at once.
    let mut held: Vec<_> = (0..256).map(|_| half_open_admin(&sw)).collect();
    thread::sleep(Duration::from_millis(300));
    let mut extra: Vec<_> = (0..20).map(|_| half_open_admin(&sw)).collect();
    let refused = extra
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_secs(1)))
        .filter(|&closed| closed)
        .count();
    assert_eq!(refused, 20, "connections over the cap were kept");
    held.clear();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let url = format!("http://127.0.0.1:{}/healthz", sw.admin_port);
    wait_until("admin answers again", Duration::from_secs(5), || {
        agent.get(&url).call().is_ok()
    });
}
