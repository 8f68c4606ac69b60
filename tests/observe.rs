//! Observe mode (`invalidation.mode = "observe"`): governed commands pass through to Redis
//! untouched — Redis executes exactly what each client sent, and each client gets Redis's
//! own reply — while `stormwall_invalidation_observed_total` counts what the shield would
//! have done. The same storm through enforce mode shows the shield really doing it.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::{Frame, Raw, Redis, Stormwall, as_int, encode_cmd, eventually, metric, text};

const OBSERVE: &str = "[invalidation]\nmode = \"observe\"\n";

/// `stormwall_invalidation_observed_total` for `command` and `would` (either may be "").
fn observed(sw: &Stormwall, command: &str, would: &str) -> f64 {
    let mut labels = Vec::new();
    if !command.is_empty() {
        labels.push(("command", command));
    }
    if !would.is_empty() {
        labels.push(("would", would));
    }
    metric(sw, "stormwall_invalidation_observed_total", &labels)
}

/// Counts of what the storm sent, and every reply it got.
struct Storm {
    dels: u64,
    flushes: u64,
}

const DELETERS: usize = 16;
const FLUSHERS: usize = 6;
const DEL_ROUNDS: usize = 40;
const FLUSH_ROUNDS: usize = 8;
const KEYS: usize = 20;

/// Many clients deleting the same settings keys while others flush the database, all at
/// once. Every reply must be one Redis could give.
fn storm(sw: &Stormwall) -> Storm {
    let barrier = Arc::new(Barrier::new(DELETERS + FLUSHERS));
    let keys: Vec<String> = (0..KEYS).map(|i| format!("settings:{i}")).collect();
    let mut handles = Vec::new();
    for c in 0..DELETERS + FLUSHERS {
        let barrier = barrier.clone();
        let keys = keys.clone();
        let mut con = sw.client();
        handles.push(thread::spawn(move || {
            barrier.wait();
            if c < DELETERS {
                for _ in 0..DEL_ROUNDS {
                    let _: () = redis::cmd("SET")
                        .arg(&keys[c % KEYS])
                        .arg(c)
                        .query(&mut con)
                        .unwrap();
                    let n: i64 = redis::cmd("DEL").arg(&keys).query(&mut con).unwrap();
                    assert!((0..=KEYS as i64).contains(&n), "DEL answered {n}");
                }
            } else {
                for _ in 0..FLUSH_ROUNDS {
                    let ok: String = redis::cmd("FLUSHDB").query(&mut con).unwrap();
                    assert_eq!(ok, "OK");
                }
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    Storm {
        dels: (DELETERS * DEL_ROUNDS) as u64,
        flushes: (FLUSHERS * FLUSH_ROUNDS) as u64,
    }
}

/// Everything Redis executed while `during` ran, as MONITOR shows it (one line per
/// command, e.g. `"DEL" "a" "b"`), up to a marker sent through `sw` afterwards.
fn monitored(redis: &Redis, sw: &Stormwall, during: impl FnOnce()) -> Vec<String> {
    let mut monitor = redis.raw();
    assert_eq!(text(&monitor.call(&[b"MONITOR"])), "OK");
    during();
    let marker = b"observe-test-marker";
    sw.raw().call(&[b"ECHO", marker]);
    let mut lines = Vec::new();
    loop {
        let line = text(&monitor.read_frame());
        if line.contains("observe-test-marker") {
            return lines;
        }
        // `1700000000.123456 [0 127.0.0.1:5555] "DEL" "a"`: keep the command.
        if let Some((_, command)) = line.split_once("] ") {
            lines.push(command.to_owned());
        }
    }
}

/// The acceptance test of observe mode: a storm of concurrent DELs and FLUSHDBs reaches
/// Redis exactly as sent (every `DEL` a `DEL`, every `FLUSHDB` plain, one call per
/// request, nothing of the shield's own), while the observed counters say that enforcement
/// would have coalesced — which the same storm through enforce mode confirms.
#[test]
fn observe_mode_passes_a_storm_through_and_counts_what_enforce_would_do() {
    let flush = "[flush]\nmin_interval = \"20ms\"\n";

    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &format!("{OBSERVE}{flush}"));
    let before = |cmd| redis.calls(cmd);
    let (del0, flush0) = (before("del"), before("flushdb"));
    let mut sent = None;
    let executed = monitored(&redis, &sw, || sent = Some(storm(&sw)));
    let sent = sent.unwrap();
    // One call per request, each the client's own command.
    assert_eq!(redis.calls("del") - del0, sent.dels);
    assert_eq!(redis.calls("flushdb") - flush0, sent.flushes);
    for cmd in ["unlink", "eval", "multi", "exec", "flushall"] {
        assert_eq!(redis.calls(cmd), 0, "Redis ran {cmd} in observe mode");
    }
    let dels = executed.iter().filter(|l| l.starts_with("\"DEL\"")).count() as u64;
    let flushes: Vec<_> = executed
        .iter()
        .filter(|l| l.starts_with("\"FLUSHDB\""))
        .collect();
    assert_eq!(dels, sent.dels, "DELs as MONITOR saw them");
    assert_eq!(flushes.len() as u64, sent.flushes);
    assert!(
        flushes.iter().all(|l| l.as_str() == "\"FLUSHDB\""),
        "every FLUSHDB reached Redis plain: {flushes:?}"
    );

    // Every request was observed, exactly once.
    assert_eq!(observed(&sw, "delete", "") as u64, sent.dels);
    assert_eq!(observed(&sw, "flushdb", "") as u64, sent.flushes);
    assert_eq!(
        observed(&sw, "", "refuse"),
        0.0,
        "nothing near the default limits"
    );
    assert_eq!(observed(&sw, "", "deny"), 0.0);
    assert_eq!(observed(&sw, "", "pass"), 0.0);
    // Nothing went through the real shield.
    assert_eq!(
        metric(&sw, "stormwall_invalidation_requests_total", &[]),
        0.0
    );
    assert_eq!(metric(&sw, "stormwall_flushes_executed_total", &[]), 0.0);
    let observed_coalesced = metric(
        &sw,
        "stormwall_invalidation_observed_coalesced_keys_total",
        &[],
    );
    let observed_flushes = ["execute", "batch", "delay"]
        .iter()
        .map(|w| observed(&sw, "flushdb", w))
        .sum::<f64>();

    // The same storm, same settings, enforced.
    let redis2 = Redis::start();
    let enforced = Stormwall::start(&redis2.addr(), flush);
    let sent2 = storm(&enforced);
    let received = metric(&enforced, "stormwall_invalidation_keys_received_total", &[]);
    let coalesced = metric(
        &enforced,
        "stormwall_invalidation_coalesced_keys_total",
        &[],
    );
    let flushes_executed = metric(
        &enforced,
        "stormwall_flushes_executed_total",
        &[("command", "flushdb")],
    );
    assert_eq!(received, (sent2.dels as usize * KEYS) as f64);
    eprintln!(
        "keys named {received}: coalesced {coalesced} (enforce) vs {observed_coalesced} \
         (observe, would have); FLUSHDBs {}: executed {flushes_executed} (enforce) vs \
         {observed_flushes} (observe, would have)",
        sent.flushes
    );
    // Loosely consistent: both see the storm as one that coalesces. How much depends on
    // how the clients' requests happen to interleave with Redis's round trips, which the
    // shadow model estimates rather than measures (it executes nothing), so the two runs
    // are compared by order of magnitude, not equated.
    assert!(coalesced > 0.0, "enforce mode coalesced nothing");
    assert!(
        observed_coalesced > 0.0,
        "observe mode saw nothing to coalesce"
    );
    assert!(
        observed_coalesced <= received && observed_coalesced * 10.0 >= coalesced,
        "observe mode saw far less coalescing ({observed_coalesced}) than enforce mode did \
         ({coalesced})"
    );
    assert!(
        flushes_executed < sent.flushes as f64,
        "enforce mode coalesced no flush"
    );
    assert!(
        observed_flushes < sent.flushes as f64,
        "observe mode saw no flush to coalesce"
    );
    assert!(observed_flushes >= 1.0);

    // While storming, a summary is logged (every 10 s), never a line per request.
    eventually("the observe summary", Duration::from_secs(15), || {
        sw.log().contains("observe mode: in the last")
    });
    let lines = sw.log().matches("observe mode: in the last").count();
    assert!(lines <= 2, "{lines} summary lines");
}

/// Replies in observe mode are Redis's own, byte for byte: the same script through
/// stormwall (observe mode, over one Redis) and directly to an identical Redis.
#[test]
fn observe_mode_replies_are_redis_own() {
    let direct = Redis::start();
    let behind = Redis::start();
    let sw = Stormwall::start(
        &behind.addr(),
        &format!("{OBSERVE}[flush]\ndeny = [\"FLUSHALL\"]\nmin_interval = \"4s\"\nburst = 1\n"),
    );
    let script: Vec<Vec<&[u8]>> = vec![
        vec![b"SET", b"a", b"1"],
        vec![b"SET", b"b", b"1"],
        vec![b"DEL", b"a", b"a", b"b", b"missing"],
        vec![b"DEL"],
        vec![b"UNLINK", b"a"],
        vec![b"SET", b"c", b"1"],
        vec![b"FLUSHDB"],
        vec![b"FLUSHDB", b"SYNC"],
        vec![b"FLUSHDB", b"bogus"],
        vec![b"SET", b"d", b"1"],
        vec![b"FLUSHALL"],
        vec![b"EXISTS", b"d"],
        vec![b"MULTI"],
        vec![b"DEL", b"d"],
        vec![b"FLUSHDB", b"ASYNC"],
        vec![b"EXEC"],
    ];
    let bytes: Vec<u8> = script.iter().flat_map(|c| encode_cmd(c)).collect();
    // Once pipelined, once a command at a time.
    for pipelined in [true, false] {
        let (mut a, mut b) = (direct.raw(), sw.raw());
        let replies = |raw: &mut Raw| -> Vec<Frame> {
            if pipelined {
                raw.send(&bytes);
                script.iter().map(|_| raw.read_frame()).collect()
            } else {
                script.iter().map(|c| raw.call(c)).collect()
            }
        };
        let (want, got) = (replies(&mut a), replies(&mut b));
        assert_eq!(want, got, "pipelined: {pipelined}");
    }
    // The denied FLUSHALL ran (d was gone), and was counted as a denial.
    assert_eq!(observed(&sw, "flushall", "deny"), 2.0);
    assert_eq!(observed(&sw, "flushall", ""), 2.0);
    assert_eq!(
        metric(
            &sw,
            "stormwall_invalidation_rejected_total",
            &[("reason", "denied")]
        ),
        0.0
    );
    // The two in the transaction would have passed through under enforcement too.
    assert_eq!(observed(&sw, "delete", "pass"), 2.0);
    assert_eq!(observed(&sw, "flushdb", "pass"), 2.0);
    // Outside it, two deletes and two flushes per run. With `burst = 1` and a 4 s interval
    // (2.5 s: at most half of max_wait), the first flush would go at once, the `SYNC`
    // pipelined behind it would ride along, and the second run's would wait for the
    // spacing (or ride along with one that waits).
    assert_eq!(observed(&sw, "delete", ""), 6.0);
    assert_eq!(observed(&sw, "flushdb", ""), 6.0);
    assert!(observed(&sw, "flushdb", "execute") >= 1.0);
    assert!(observed(&sw, "flushdb", "coalesce") >= 1.0);
    assert_eq!(
        ["execute", "coalesce", "delay", "refuse", "batch"]
            .iter()
            .map(|w| observed(&sw, "flushdb", w))
            .sum::<f64>(),
        4.0
    );
}

/// `invalidation.mode` changes by live reload, for a client that stays connected: from its
/// next request on, invalidations are enforced or only observed.
#[test]
fn switching_mode_by_reload_applies_to_the_next_request() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let original = std::fs::read_to_string(&sw.config_path).unwrap();
    let mut client = sw.raw();
    let reloads = |n: f64| {
        eventually("the reload", Duration::from_secs(5), || {
            metric(&sw, "stormwall_config_reloads_total", &[("result", "ok")]) == n
        })
    };

    // Enforced: the shield sends UNLINK for a DEL, and observes nothing.
    client.call(&[b"SET", b"k", b"1"]);
    assert_eq!(as_int(&client.call(&[b"DEL", b"k"])), 1);
    assert_eq!(redis.calls("unlink"), 1);
    assert_eq!(redis.calls("del"), 0);
    assert_eq!(observed(&sw, "", ""), 0.0);

    std::fs::write(&sw.config_path, format!("{original}{OBSERVE}")).unwrap();
    sw.signal("HUP");
    reloads(1.0);
    client.call(&[b"SET", b"k", b"1"]);
    assert_eq!(as_int(&client.call(&[b"DEL", b"k"])), 1);
    assert_eq!(redis.calls("del"), 1, "observed: the client's own DEL");
    assert_eq!(redis.calls("unlink"), 1);
    assert_eq!(observed(&sw, "delete", ""), 1.0);

    std::fs::write(&sw.config_path, &original).unwrap();
    sw.signal("HUP");
    reloads(2.0);
    client.call(&[b"SET", b"k", b"1"]);
    assert_eq!(as_int(&client.call(&[b"DEL", b"k"])), 1);
    assert_eq!(redis.calls("unlink"), 2, "enforced again");
    assert_eq!(redis.calls("del"), 1);
    assert_eq!(observed(&sw, "", ""), 1.0);
}

/// Observe mode never holds a request up, whatever the shadow model says: with a shadow
/// queue of one request and a budget of one key per second, a pipeline of 2,000 deletes
/// all run (and nearly all are counted as ones enforcement would have refused).
#[test]
fn observe_mode_adds_no_wait_under_a_full_shadow_queue() {
    let redis = Redis::start();
    // A shadow queue of one request at one key per second: nearly everything would be
    // refused, and yet everything runs.
    let sw = Stormwall::start(
        &redis.addr(),
        "[invalidation]\nmode = \"observe\"\non_full = \"reject\"\nmax_pending = 1\n\
         keys_per_second = 1\nkeys_burst = 1\n",
    );
    let mut raw = sw.raw();
    let mut bytes = Vec::new();
    for i in 0..2000 {
        bytes.extend(encode_cmd(&[b"SET", format!("k{i}").as_bytes(), b"v"]));
        bytes.extend(encode_cmd(&[b"DEL", format!("k{i}").as_bytes()]));
    }
    raw.send(&bytes);
    for _ in 0..2000 {
        assert_eq!(text(&raw.read_frame()), "OK");
        assert_eq!(as_int(&raw.read_frame()), 1);
    }
    assert_eq!(as_int(&redis.raw().call(&[b"DBSIZE"])), 0);
    assert_eq!(observed(&sw, "delete", "") as u64, 2000);
    assert!(observed(&sw, "delete", "refuse") >= 1990.0);
}
