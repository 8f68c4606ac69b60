//! `invalidation.shared_budget`: several stormwall processes in front of one Redis take their
//! invalidation budget from Redis itself, so together they respect it; when Redis cannot run
//! the budget's script, each falls back to its local budget, says so once and counts it.
//!
//! What reached Redis is counted in Redis: every key a client deletes exists (a range of its
//! own, written beforehand, in database 1), so the keys Redis removed are the keys stormwall
//! sent — counted after the storm, with no clock but the test's overall span. The budget's
//! own keys live in database 0, where they do not disturb that count.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Redis, Stormwall, metric};

const KEYS_PER_SECOND: f64 = 2_000.0;
const BURST: f64 = 200.0;
/// Keys per DEL: well under the burst, so no request is charged less than its keys.
const KEYS_PER_REQUEST: usize = 10;
/// Keys written for each storming client: more than the whole budget over any storm here.
const RANGE: usize = 8_000;
const CLIENTS_PER_SIDECAR: usize = 4;
const DB: u32 = 1;

/// The budget settings every sidecar of a test gets (`extra` may add to `[invalidation]`).
/// Not adaptive: these tests are about the configured budget's bound (an adaptive budget
/// cut by a busy test machine lowers what is sent, and one growing back rebuilds its local
/// limiters full, each with a fresh burst).
fn budget_toml(shared: bool, extra: &str) -> String {
    format!(
        "[invalidation]\nshared_budget = {shared}\nkeys_per_second = {}\nkeys_burst = {}\n\
         commands_per_second = 100000\ncommands_burst = 10000\nmax_wait = \"2s\"\n\
         adaptive = false\n{extra}",
        KEYS_PER_SECOND as u32, BURST as u32
    )
}

fn sidecars(redis: &Redis, n: usize, toml: &str) -> Vec<Stormwall> {
    (0..n)
        .map(|_| Stormwall::start(&redis.addr(), toml))
        .collect()
}

fn db_client(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/{DB}"))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap()
}

/// Writes `clients` ranges of [`RANGE`] keys into database [`DB`]; returns how many.
fn populate(redis: &Redis, clients: usize) -> usize {
    let mut con = db_client(redis.port);
    for c in 0..clients {
        for chunk in (0..RANGE).collect::<Vec<_>>().chunks(1000) {
            let mut mset = redis::cmd("MSET");
            for i in chunk {
                mset.arg(format!("c{c}:{i}")).arg(1);
            }
            mset.query::<()>(&mut con).unwrap();
        }
    }
    clients * RANGE
}

fn dbsize(redis: &Redis) -> usize {
    redis::cmd("DBSIZE")
        .query(&mut db_client(redis.port))
        .unwrap()
}

/// Clients storming their sidecars with DELs of keys of their own until stopped (or until
/// their sidecar is gone).
struct Storm {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<(u64, u64)>>,
}

impl Storm {
    /// `CLIENTS_PER_SIDECAR` clients on each of `ports`, client `c` on the `c`-th range.
    fn start(ports: &[u16]) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (s, &port) in ports.iter().enumerate() {
            for k in 0..CLIENTS_PER_SIDECAR {
                let c = s * CLIENTS_PER_SIDECAR + k;
                let stop = stop.clone();
                let mut con = db_client(port);
                threads.push(thread::spawn(move || {
                    // (keys Redis said this client removed, requests refused)
                    let (mut removed, mut refused) = (0u64, 0u64);
                    let mut next = 0;
                    while !stop.load(Ordering::Relaxed) && next + KEYS_PER_REQUEST <= RANGE {
                        let keys: Vec<String> = (next..next + KEYS_PER_REQUEST)
                            .map(|i| format!("c{c}:{i}"))
                            .collect();
                        match redis::cmd("DEL").arg(&keys).query::<u64>(&mut con) {
                            Ok(n) => {
                                removed += n;
                                next += KEYS_PER_REQUEST;
                            }
                            // Its sidecar was killed: this client is done.
                            Err(e) if e.is_io_error() || e.is_connection_dropped() => break,
                            // -TRYAGAIN … not applied: the same keys go again.
                            Err(_) => refused += 1,
                        }
                    }
                    (removed, refused)
                }));
            }
        }
        Storm { stop, threads }
    }

    /// Stops the clients and waits for their last requests: (keys removed, refused).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }
}

/// The most a budget of [`KEYS_PER_SECOND`] with [`BURST`] lets through in `span`: every
/// key stormwall sent was sent within it. Plus 1% of the rate part for the clocks: the
/// budget runs on Redis's wall clock (`TIME`), the span on the test's monotonic one.
fn allowed(span: Duration) -> f64 {
    KEYS_PER_SECOND * span.as_secs_f64() * 1.01 + BURST
}

fn sum(sidecars: &[Stormwall], name: &str, labels: &[(&str, &str)]) -> f64 {
    sidecars.iter().map(|s| metric(s, name, labels)).sum()
}

/// What a storm through the sidecars did.
struct Stormed {
    /// Keys the clients were told were deleted.
    told: u64,
    span: Duration,
    /// Keys gone from Redis.
    removed: f64,
}

/// Four sidecars in front of `redis`, sharing one budget or each with its own, and a delete
/// storm through all of them for 3 s.
fn four_sidecars_storm(redis: &Redis, shared: bool) -> (Vec<Stormwall>, Stormed) {
    let sidecars = sidecars(redis, 4, &budget_toml(shared, ""));
    let ports: Vec<u16> = sidecars.iter().map(|s| s.port).collect();
    let written = populate(redis, ports.len() * CLIENTS_PER_SIDECAR);
    let started = Instant::now();
    let storm = Storm::start(&ports);
    thread::sleep(Duration::from_secs(3));
    let (told, _refused) = storm.finish();
    let span = started.elapsed();
    let removed = (written - dbsize(redis)) as f64;
    (
        sidecars,
        Stormed {
            told,
            span,
            removed,
        },
    )
}

#[test]
fn four_sidecars_together_stay_within_one_budget() {
    let redis = Redis::start();
    let (
        sidecars,
        Stormed {
            told,
            span,
            removed,
        },
    ) = four_sidecars_storm(&redis, true);
    let sent = sum(&sidecars, "stormwall_invalidation_keys_sent_total", &[]);
    eprintln!(
        "4 sidecars, shared budget {KEYS_PER_SECOND}/s burst {BURST}: {removed} keys removed \
         in {span:?} (allowed {:.0}); {sent} sent by the sidecars, {told} counted by clients",
        allowed(span)
    );
    assert_eq!(sent, removed, "every key sent was removed, and only those");
    assert_eq!(told as f64, removed, "each client's counts are exact");
    assert!(
        removed <= allowed(span),
        "{removed} keys reached Redis in {span:?}: more than the shared budget allows"
    );
    // The budget was what held the storm back: sidecars were told to wait, and it was used
    // (half of it, at least: 16 clients ask for far more than 2,000 keys/s).
    assert!(
        sum(
            &sidecars,
            "stormwall_shared_budget_calls_total",
            &[("result", "wait")]
        ) > 0.0
    );
    assert!(
        removed >= KEYS_PER_SECOND * 3.0 * 0.5,
        "only {removed} keys removed in {span:?}"
    );
    for s in &sidecars {
        assert_eq!(metric(s, "stormwall_shared_budget_active", &[]), 1.0);
        assert_eq!(
            metric(s, "stormwall_shared_budget_fallbacks_total", &[]),
            0.0,
            "{}",
            s.log()
        );
    }
    // Taken once per batch (no batch here is larger than a burst), not per request; one
    // EVALSHA per call (and an EVAL for each sidecar's first, when Redis did not know the
    // script yet).
    let taken = sum(
        &sidecars,
        "stormwall_shared_budget_calls_total",
        &[("result", "taken")],
    );
    let batches = sum(&sidecars, "stormwall_invalidation_batches_total", &[]);
    let requests = sum(&sidecars, "stormwall_invalidation_requests_total", &[]);
    let calls = sum(&sidecars, "stormwall_shared_budget_calls_total", &[]);
    assert_eq!(taken, batches);
    assert!(
        requests > batches,
        "{requests} requests in {batches} batches"
    );
    // (Batches of deletes run as EVAL scripts of their own; only the budget uses EVALSHA.)
    assert!(redis.calls("evalsha") as f64 >= calls);

    // The budget's keys expire once their buckets are full again: nothing is left behind.
    let mut direct = redis.client();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut direct).unwrap();
    for key in &keys {
        assert!(key.starts_with("{stormwall:budget}:"), "{key}");
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut direct).unwrap();
        assert!(ttl == -2 || (0..=3_000).contains(&ttl), "{key} ttl {ttl}");
    }
    common::eventually("the budget keys to expire", Duration::from_secs(5), || {
        redis::cmd("DBSIZE").query::<usize>(&mut direct).unwrap() == 0
    });
}

#[test]
fn without_the_shared_budget_each_sidecar_has_its_own() {
    // The storm the shared budget exists to stop: four sidecars, four budgets.
    let redis = Redis::start();
    let (sidecars, Stormed { span, removed, .. }) = four_sidecars_storm(&redis, false);
    eprintln!(
        "4 sidecars, local budgets of {KEYS_PER_SECOND}/s each: {removed} keys removed in \
         {span:?} (one shared budget would allow {:.0})",
        allowed(span)
    );
    assert!(
        removed > allowed(span),
        "{removed} keys in {span:?}: four local budgets should let more through than one"
    );
    assert_eq!(
        sum(&sidecars, "stormwall_shared_budget_calls_total", &[]),
        0.0
    );
}

#[test]
fn killing_a_sidecar_mid_storm_leaves_the_others_within_the_budget() {
    let redis = Redis::start();
    let mut sidecars = sidecars(&redis, 4, &budget_toml(true, ""));
    let ports: Vec<u16> = sidecars.iter().map(|s| s.port).collect();
    let written = populate(&redis, ports.len() * CLIENTS_PER_SIDECAR);

    let started = Instant::now();
    let storm = Storm::start(&ports);
    thread::sleep(Duration::from_millis(1500));
    // SIGKILL, mid-batch or mid-wait: it leaves nothing held in Redis (a GCRA holds no
    // lease), so the others go on with the same budget.
    let killed_at = Instant::now();
    let left_at_kill = dbsize(&redis);
    drop(sidecars.pop());
    thread::sleep(Duration::from_millis(2500));
    storm.finish();
    let span = started.elapsed();
    let after_kill = killed_at.elapsed();

    let removed = (written - dbsize(&redis)) as f64;
    let removed_after_kill = (left_at_kill - dbsize(&redis)) as f64;
    eprintln!(
        "4 sidecars, one killed after 1.5 s: {removed} keys removed in {span:?} (allowed {:.0}); \
         {removed_after_kill} by the other three in the {after_kill:?} after the kill",
        allowed(span)
    );
    assert!(
        removed <= allowed(span),
        "{removed} keys reached Redis in {span:?}: more than the shared budget allows"
    );
    assert!(
        removed_after_kill <= allowed(after_kill),
        "{removed_after_kill} keys after the kill, in {after_kill:?}"
    );
    // The survivors kept using the budget (half of it at least; 12 clients ask for more).
    assert!(
        removed_after_kill >= KEYS_PER_SECOND * 2.5 * 0.5,
        "the three survivors removed only {removed_after_kill} keys in {after_kill:?}"
    );
    for s in &sidecars {
        assert_eq!(metric(s, "stormwall_shared_budget_active", &[]), 1.0);
        assert_eq!(
            metric(s, "stormwall_shared_budget_fallbacks_total", &[]),
            0.0
        );
    }
}

const FELL_BACK: &str = "shared invalidation budget unavailable";
const WORKS_AGAIN: &str = "shared invalidation budget works again";

fn write_password(dir: &Path, password: &str) -> String {
    let path = dir.join("budget-password");
    std::fs::write(&path, format!("{password}\n")).unwrap();
    path.display().to_string()
}

#[test]
fn a_user_that_may_not_run_the_script_falls_back_to_the_local_budget() {
    let redis = Redis::start();
    let mut direct = redis.client();
    // stormwall's own user may do anything but run scripts.
    redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "stormwall",
            "on",
            ">budget-pw",
            "~*",
            "&*",
            "+@all",
        ])
        .arg(&["-eval", "-evalsha"])
        .query::<()>(&mut direct)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password_file = write_password(dir.path(), "budget-pw");
    let toml = budget_toml(
        true,
        &format!(
            "shared_budget_user = \"stormwall\"\nshared_budget_password_file = \"{password_file}\"\n\
"
        ),
    );
    let sidecars = sidecars(&redis, 2, &toml);
    let ports: Vec<u16> = sidecars.iter().map(|s| s.port).collect();
    let written = populate(&redis, ports.len() * CLIENTS_PER_SIDECAR);

    let started = Instant::now();
    let storm = Storm::start(&ports);
    // Long enough for retries of the shared budget (one a second) to fail too.
    thread::sleep(Duration::from_millis(2500));
    let (told, _) = storm.finish();
    let span = started.elapsed();
    let removed = (written - dbsize(&redis)) as f64;
    assert_eq!(told as f64, removed);
    eprintln!(
        "2 sidecars fallen back to local budgets of {KEYS_PER_SECOND}/s: {removed} keys \
         removed in {span:?}"
    );
    for s in &sidecars {
        // Said once (not once per batch or retry), counted once, and the local budget holds.
        assert_eq!(s.log().matches(FELL_BACK).count(), 1, "{}", s.log());
        assert!(s.log().contains("reason=\"noperm\"") || s.log().contains("reason=noperm"));
        assert_eq!(
            metric(
                s,
                "stormwall_shared_budget_fallbacks_total",
                &[("reason", "noperm")]
            ),
            1.0
        );
        assert_eq!(
            metric(s, "stormwall_shared_budget_fallbacks_total", &[]),
            1.0
        );
        assert_eq!(metric(s, "stormwall_shared_budget_active", &[]), 0.0);
        let sent = metric(s, "stormwall_invalidation_keys_sent_total", &[]);
        assert!(
            sent <= allowed(span),
            "{sent} keys in {span:?} through one sidecar's local budget\n{}",
            s.log()
        );
    }
    // Nothing was written into the budget's keys.
    let budget: usize = redis::cmd("DBSIZE").query(&mut direct).unwrap();
    assert_eq!(budget, 0);

    // Allowed to run scripts again: each sidecar finds out at its next retry, and says so
    // once.
    redis::cmd("ACL")
        .arg(&["SETUSER", "stormwall", "+eval", "+evalsha"])
        .query::<()>(&mut direct)
        .unwrap();
    for (s, c) in sidecars.iter().zip([0, CLIENTS_PER_SIDECAR]) {
        let mut con = db_client(s.port);
        let mut i = RANGE;
        common::eventually("the shared budget again", Duration::from_secs(5), || {
            i += 1;
            redis::cmd("DEL")
                .arg(format!("c{c}:{i}"))
                .query::<u64>(&mut con)
                .unwrap();
            metric(s, "stormwall_shared_budget_active", &[]) == 1.0
        });
        assert_eq!(s.log().matches(WORKS_AGAIN).count(), 1, "{}", s.log());
        assert_eq!(s.log().matches(FELL_BACK).count(), 1);
        assert_eq!(
            metric(s, "stormwall_shared_budget_fallbacks_total", &[]),
            1.0
        );
    }
}

#[test]
fn an_unreachable_login_falls_back_and_requests_still_succeed() {
    // A password file that does not exist: the budget connection cannot log in. Deletes are
    // still executed, under the local budget, and the reason is `auth`.
    let redis = Redis::start();
    let toml = budget_toml(
        true,
        "shared_budget_user = \"nobody\"\nshared_budget_password_file = \"/nonexistent/pw\"\n",
    );
    let sw = Stormwall::start(&redis.addr(), &toml);
    let mut con = db_client(sw.port);
    redis::cmd("SET")
        .arg("k")
        .arg(1)
        .query::<()>(&mut con)
        .unwrap();
    let n: u64 = redis::cmd("DEL").arg("k").query(&mut con).unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        metric(
            &sw,
            "stormwall_shared_budget_fallbacks_total",
            &[("reason", "auth")]
        ),
        1.0
    );
    assert_eq!(sw.log().matches(FELL_BACK).count(), 1, "{}", sw.log());
}

#[test]
fn a_budget_key_far_in_the_future_only_empties_the_bucket() {
    // Redis's clock set back an hour, or a client writing the key: the bucket counts as
    // empty (a burst's worth of wait at most), not as an hour of refusals.
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &budget_toml(true, ""));
    let mut direct = redis.client();
    let time: Vec<u64> = redis::cmd("TIME").query(&mut direct).unwrap();
    let hour_ahead = (time[0] + 3600) * 1_000_000;
    redis::cmd("SET")
        .arg("{stormwall:budget}:keys")
        .arg(hour_ahead)
        .query::<()>(&mut direct)
        .unwrap();
    let mut con = db_client(sw.port);
    redis::cmd("SET")
        .arg("k")
        .arg(1)
        .query::<()>(&mut con)
        .unwrap();
    let n: u64 = redis::cmd("DEL").arg("k").query(&mut con).unwrap();
    assert_eq!(n, 1);
    // Written back as an ordinary budget, which expires.
    let ttl: i64 = redis::cmd("PTTL")
        .arg("{stormwall:budget}:keys")
        .query(&mut direct)
        .unwrap();
    assert!(ttl <= 1_000, "ttl {ttl}");
    assert_eq!(
        metric(&sw, "stormwall_shared_budget_fallbacks_total", &[]),
        0.0
    );
}

#[test]
fn the_shared_budget_is_switched_on_by_a_reload_and_covers_flushes() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &budget_toml(false, ""));
    let mut con = db_client(sw.port);
    let _: u64 = redis::cmd("DEL").arg("a").query(&mut con).unwrap();
    assert_eq!(metric(&sw, "stormwall_shared_budget_calls_total", &[]), 0.0);
    let original = std::fs::read_to_string(&sw.config_path).unwrap();
    std::fs::write(
        &sw.config_path,
        original.replace("shared_budget = false", "shared_budget = true"),
    )
    .unwrap();
    sw.signal("HUP");
    common::eventually("the reload", Duration::from_secs(5), || {
        metric(&sw, "stormwall_config_reloads_total", &[("result", "ok")]) == 1.0
    });
    let _: u64 = redis::cmd("DEL").arg("a").query(&mut con).unwrap();
    assert_eq!(
        metric(
            &sw,
            "stormwall_shared_budget_calls_total",
            &[("result", "taken")]
        ),
        1.0
    );
    assert_eq!(metric(&sw, "stormwall_shared_budget_active", &[]), 1.0);
    // Flushes take their command from the shared budget too.
    redis::cmd("FLUSHDB").query::<()>(&mut con).unwrap();
    assert_eq!(
        metric(
            &sw,
            "stormwall_shared_budget_calls_total",
            &[("result", "taken")]
        ),
        2.0
    );
}
