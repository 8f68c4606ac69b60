//! Every alert in `deploy/prometheus/alerts.yml`, fired and resolved by a real Prometheus.
//!
//! `promtool test rules` (`deploy/prometheus/alerts_test.yml`) checks the rules against
//! series written by hand: it cannot tell whether stormwall really exports those series,
//! with those labels, and moves them the way the rules assume when the thing an alert is
//! about happens. Here a real `prometheus` (Debian's package; `scripts/test` installs it
//! when missing) scrapes real stormwall processes, each in front of its own real
//! `redis-server`, every second with the shipped rules loaded. Each alert's condition is
//! brought about for real — a flush storm, a queue that fills, Redis killed, a broken config
//! reloaded, garbage on the client port, clients over `listen.max_clients`, Redis dropping
//! client sessions, observe mode over budget, a stalled Redis holding the adaptive budget at
//! its floor, a TLS certificate about to expire, a Redis Cluster that loses a shard — and Prometheus's HTTP API must show the
//! alert pending, then firing (with its annotations rendered), then gone once the condition
//! is removed. The series behind each alert must say what happened: counters equal to what
//! the test sent, `rate()` of governed commands above 0 during the storm and its `increase`
//! matching the commands sent, the queue-depth gauge back to 0.
//!
//! The rules wait minutes (`for: 10m`, `[15m]` windows), which a test cannot. The test loads
//! a copy in which every duration Prometheus waits for is divided by 60 — minutes become
//! seconds, in `for:` and in PromQL range selectors and `offset`s ([`rescaled`]) — and
//! checks that the copy differs from the shipped file in nothing else
//! ([`assert_only_durations_differ`]), so the expressions, thresholds and templates tested
//! are the shipped ones.
//!
//! The scenarios run at once, one stormwall and one Redis (or Redis Cluster) each, against one Prometheus, so
//! the whole file takes about as long as its slowest scenario. Nothing is timed: every wait
//! is a poll with a generous deadline that only decides when to fail, saying what
//! Prometheus returned.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cluster::{self, Cluster};
use common::{Raw, Redis, Stormwall, as_int, encode_cmd, error_text, free_port, text};
use serde_json::Value;

/// How long Prometheus gets to show an alert in the state a phase waits for. Far longer
/// than any rescaled `for:` or window (at most 15 s): a deadline only says when to give up.
const ALERT_DEADLINE: Duration = Duration::from_secs(90);
/// How long a series gets to reach a value the test knows it must reach.
const SERIES_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);

fn shipped_rules() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path:?}: {e}"))
}

// ---- the rules under test -------------------------------------------------------------------

/// The shipped rules with every duration Prometheus waits for divided by 60: a whole number
/// of minutes becomes as many seconds (`for: 5m` → `for: 5s`, `[10m]` → `[10s]`,
/// `offset 5m` → `offset 5s`). Durations are rescaled where PromQL or the rule format reads
/// them: a rule's `for:` or `keep_firing_for:` value, just inside a range selector's `[`,
/// just after `offset `. Comments and everything else stay byte for byte. A duration in any
/// other unit makes this panic, so a new rule cannot slip past the rescaling unnoticed.
fn rescaled(shipped: &str) -> String {
    shipped
        .split_inclusive('\n')
        .map(|line| rescale_line(line).unwrap_or_else(|e| panic!("{e}")))
        .collect::<Vec<_>>()
        .concat()
}

/// One line of [`rescaled`]; an error for a duration in another unit than whole minutes.
fn rescale_line(line: &str) -> Result<String, String> {
    let body = line.trim_start();
    if body.starts_with('#') {
        return Ok(line.to_owned());
    }
    let indent = line.len() - body.len();
    // Byte offsets where a duration literal may start.
    let mut starts: Vec<usize> = ["for: ", "keep_firing_for: "]
        .iter()
        .filter(|key| body.starts_with(**key))
        .map(|key| indent + key.len())
        .collect();
    starts.extend(line.match_indices('[').map(|(i, _)| i + 1));
    starts.extend(line.match_indices("offset ").map(|(i, m)| i + m.len()));
    let mut bytes = line.as_bytes().to_vec();
    for start in starts {
        let digits = line[start..].bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            // `[limits]` in a description, `[` of a label list: not a duration.
            continue;
        }
        let unit_at = start + digits;
        let unit: String = line[unit_at..]
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect();
        if unit != "m" {
            return Err(format!(
                "a duration in another unit than whole minutes in {line:?}: extend the \
                 rescaling in tests/prometheus_alerts.rs"
            ));
        }
        bytes[unit_at] = b's';
    }
    Ok(String::from_utf8(bytes).expect("replacing an ASCII byte keeps UTF-8"))
}

/// The copy differs from the shipped file only in durations' units: the same lines of the
/// same lengths, and wherever a byte differs it is the `m` of a number of minutes in the
/// shipped file and an `s` in the copy. Returns how many durations were rescaled.
fn assert_only_durations_differ(shipped: &str, copy: &str) -> usize {
    let (a, b): (Vec<&str>, Vec<&str>) = (shipped.lines().collect(), copy.lines().collect());
    assert_eq!(
        a.len(),
        b.len(),
        "the copy has other lines than the shipped rules"
    );
    let mut changed = 0;
    for (n, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x.len(),
            y.len(),
            "line {}: the copy differs in more than a duration's unit:\n  {x}\n  {y}",
            n + 1
        );
        let (x, y) = (x.as_bytes(), y.as_bytes());
        for i in 0..x.len() {
            if x[i] == y[i] {
                continue;
            }
            let after_digit = i > 0 && x[i - 1].is_ascii_digit();
            let ends_word = x.get(i + 1).is_none_or(|c| !c.is_ascii_alphanumeric());
            assert!(
                x[i] == b'm' && y[i] == b's' && after_digit && ends_word,
                "line {}: the copy differs in more than a duration's unit:\n  {}\n  {}",
                n + 1,
                String::from_utf8_lossy(x),
                String::from_utf8_lossy(y)
            );
            changed += 1;
        }
    }
    changed
}

/// The alert names in a rules file, in order.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

#[test]
fn the_rules_under_test_differ_from_the_shipped_ones_only_in_durations() {
    let shipped = shipped_rules();
    let copy = rescaled(&shipped);
    let changed = assert_only_durations_differ(&shipped, &copy);
    // No number of minutes is left outside comments (prose says "5 minutes", never "5m").
    let rules: Vec<&str> = copy
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    for line in &rules {
        let b = line.as_bytes();
        let minutes = (1..b.len()).any(|i| {
            b[i] == b'm'
                && b[i - 1].is_ascii_digit()
                && b.get(i + 1).is_none_or(|c| !c.is_ascii_alphanumeric())
        });
        assert!(!minutes, "a duration in minutes was not rescaled: {line}");
    }
    let holds = rules
        .iter()
        .filter(|l| l.trim_start().starts_with("for: "))
        .count();
    assert!(
        holds > 0 && changed > holds,
        "{changed} durations rescaled, {holds} of them `for:`"
    );
    assert_eq!(alert_names(&copy), alert_names(&shipped));
    assert_eq!(alert_names(&shipped).len(), 12);
    // The transformation itself, on the forms it knows.
    let line = |l: &str| rescale_line(l).expect("rescaled");
    assert_eq!(line("        for: 10m\n"), "        for: 10s\n");
    assert_eq!(
        line("  x[15m] unless x offset 5m and [limits]\n"),
        "  x[15s] unless x offset 5s and [limits]\n"
    );
    assert_eq!(line("# offset 5m stays\n"), "# offset 5m stays\n");
    assert!(
        rescale_line("  rate(x[1h])\n").is_err(),
        "a duration in hours must not pass unrescaled"
    );
}

// ---- a real Prometheus --------------------------------------------------------------------

/// One sample of an instant vector.
#[derive(Debug)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One series of a range vector: its labels and (timestamp, value) pairs.
#[derive(Debug)]
struct Series {
    labels: BTreeMap<String, String>,
    points: Vec<(f64, f64)>,
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// A `[timestamp, "value"]` pair as Prometheus's API writes it.
fn point_of(v: &Value) -> (f64, f64) {
    let ts = v[0].as_f64().unwrap_or(f64::NAN);
    let value = v[1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    (ts, value)
}

/// A `prometheus` child process with its own config, rules and storage in a temp dir, on
/// an ephemeral loopback port; stopped by pid when dropped.
struct Prometheus {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    agent: ureq::Agent,
}

impl Prometheus {
    /// Starts Prometheus scraping each `(scenario, instance)` target's `/metrics` every
    /// second, with `rules` loaded and evaluated every second.
    fn start(targets: &[(&str, String)], rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("cannot create a temp dir for Prometheus");
        let rules_path = dir.path().join("alerts.yml");
        std::fs::write(&rules_path, rules).expect("cannot write the rules");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: stormwall\n    static_configs:\n",
            rules_path.display()
        );
        for (scenario, instance) in targets {
            config.push_str(&format!(
                "      - targets: [\"{instance}\"]\n        labels: {{scenario: \"{scenario}\"}}\n"
            ));
        }
        std::fs::write(dir.path().join("prometheus.yml"), config)
            .expect("cannot write prometheus.yml");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut prom = Prometheus {
            port: 0,
            child: None,
            dir,
            agent,
        };
        // The port is picked free and released; if another process takes it first,
        // Prometheus exits and a fresh port is tried.
        for _ in 0..4 {
            if prom.spawn() {
                return prom;
            }
        }
        panic!("prometheus failed to start four times:\n{}", prom.log());
    }

    fn spawn(&mut self) -> bool {
        self.port = free_port();
        let dir = self.dir.path();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("cannot create log");
        let started = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--storage.tsdb.retention.time=1h")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let mut child = match started {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "prometheus not found on PATH: this test needs a real Prometheus. Install \
                 Debian's package with `apt-get install -y --no-install-recommends prometheus` \
                 (scripts/test does when it is missing)."
            ),
            Err(e) => panic!("cannot start prometheus: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("prometheus exited at start ({status}):\n{}", self.log());
                return false;
            }
            if self.status("/-/ready") == Some(200) {
                self.child = Some(child);
                return true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("prometheus was not ready within 60s:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The HTTP status of a GET, `None` if nothing answered.
    fn status(&self, path: &str) -> Option<u16> {
        self.agent
            .get(&self.url(path))
            .call()
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// GETs an API path and returns its `data`, panicking with the answer if it is not a
    /// success.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut request = self.agent.get(&self.url(path));
        for (k, v) in params {
            request = request.query(*k, *v);
        }
        let body = request
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
            .unwrap_or_else(|e| panic!("GET {path} {params:?} failed: {e}"));
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path} {params:?}: not JSON ({e}): {body}"));
        assert_eq!(
            json["status"], "success",
            "GET {path} {params:?} answered: {body}"
        );
        json["data"].clone()
    }

    /// An instant query's raw result, for messages.
    fn raw(&self, expr: &str) -> String {
        self.api("/api/v1/query", &[("query", expr)])["result"].to_string()
    }

    /// An instant query returning a vector.
    fn query(&self, expr: &str) -> Vec<Sample> {
        let data = self.api("/api/v1/query", &[("query", expr)]);
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .map(|s| Sample {
                            labels: labels_of(&s["metric"]),
                            value: point_of(&s["value"]).1,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Some("scalar") => vec![Sample {
                labels: BTreeMap::new(),
                value: point_of(&data["result"]).1,
            }],
            other => panic!("{expr}: expected a vector, got {other:?}: {data}"),
        }
    }

    /// An instant query of a range vector (`x[5m]`): every series with its samples.
    fn range(&self, expr: &str) -> Vec<Series> {
        let data = self.api("/api/v1/query", &[("query", expr)]);
        assert_eq!(data["resultType"], "matrix", "{expr}: {data}");
        data["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|s| Series {
                        labels: labels_of(&s["metric"]),
                        points: s["values"]
                            .as_array()
                            .map(|v| v.iter().map(point_of).collect())
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The value of a query that yields at most one sample (`None` for none).
    fn value(&self, expr: &str) -> Option<f64> {
        let samples = self.query(expr);
        assert!(
            samples.len() <= 1,
            "{expr}: more than one sample: {samples:?}"
        );
        samples.first().map(|s| s.value)
    }

    /// Polls `expr` until its one sample satisfies `ok`, and returns that value.
    fn wait_value(&self, what: &str, expr: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + SERIES_DEADLINE;
        loop {
            if let Some(v) = self.value(expr).filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: `{expr}` did not get there within {SERIES_DEADLINE:?}; Prometheus \
                 answers {}",
                self.raw(expr)
            );
            thread::sleep(POLL);
        }
    }

    /// The alerting rule `name` as Prometheus loaded it.
    fn rule(&self, name: &str) -> Value {
        let data = self.api("/api/v1/rules", &[("type", "alert")]);
        data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("Prometheus has no alerting rule {name}: {data}"))
    }

    /// What Prometheus says about an alert that did not do what a phase waited for.
    fn explain(&self, alert: &Alert) -> String {
        let rule = self.rule(alert.name);
        let query = rule["query"].as_str().unwrap_or_default().to_owned();
        format!(
            "\n  ALERTS{{{}}} = {}\n  rule: health {} {}, query `{query}`\n  query now = {}",
            alert.selector,
            self.raw(&format!("ALERTS{{{}}}", alert.selector)),
            rule["health"],
            rule["lastError"],
            self.raw(&query),
        )
    }

    /// The states (`pending`, `firing`) `alert` is in now.
    fn states(&self, alert: &Alert) -> BTreeSet<String> {
        self.query(&format!("ALERTS{{{}}}", alert.selector))
            .into_iter()
            .filter_map(|s| s.labels.get("alertstate").cloned())
            .collect()
    }

    /// Waits for `alert` to fire, then checks that it was pending first (if its rule has a
    /// `for:`; without one Prometheus fires at once) and that its annotations rendered.
    fn wait_firing(&self, alert: &Alert) {
        let deadline = Instant::now() + ALERT_DEADLINE;
        while !self.states(alert).contains("firing") {
            assert!(
                Instant::now() < deadline,
                "{} did not fire within {ALERT_DEADLINE:?}:{}",
                alert.name,
                self.explain(alert)
            );
            thread::sleep(POLL);
        }
        // The evaluations are stored as the ALERTS series: the first pending sample must
        // come before the first firing one.
        let history = self.range(&format!("ALERTS{{{}}}[10m]", alert.selector));
        let first = |state: &str| {
            history
                .iter()
                .filter(|s| s.labels.get("alertstate").map(String::as_str) == Some(state))
                .flat_map(|s| s.points.iter().map(|p| p.0))
                .fold(f64::INFINITY, f64::min)
        };
        let hold = self.rule(alert.name)["duration"].as_f64().unwrap_or(0.0);
        if hold > 0.0 {
            assert!(
                first("pending") < first("firing"),
                "{} fired without being pending first: {history:?}",
                alert.name
            );
        } else {
            assert!(
                first("pending").is_infinite(),
                "{} has no `for:` but was pending: {history:?}",
                alert.name
            );
        }
        // Annotations as Prometheus rendered them for this alert.
        let alerts = self.api("/api/v1/alerts", &[]);
        let ours: Vec<&Value> = alerts["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| {
                a["state"] == "firing"
                    && alert
                        .labels
                        .iter()
                        .all(|(k, v)| a["labels"][k.as_str()] == v.as_str())
            })
            .collect();
        assert!(
            !ours.is_empty(),
            "{} firing but not in /api/v1/alerts: {alerts}",
            alert.name
        );
        for a in ours {
            for field in ["summary", "description"] {
                let t = a["annotations"][field].as_str().unwrap_or_default();
                assert!(
                    !t.is_empty()
                        && t.contains(&alert.labels["instance"])
                        && !t.contains("error expanding template")
                        && !t.contains("<no value>"),
                    "{} {field} not rendered right: {t:?}",
                    alert.name
                );
            }
        }
    }

    /// Waits for `alert` to be neither pending nor firing.
    fn wait_resolved(&self, alert: &Alert) {
        let deadline = Instant::now() + ALERT_DEADLINE;
        while !self.states(alert).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} did not resolve within {ALERT_DEADLINE:?}:{}",
                alert.name,
                self.explain(alert)
            );
            thread::sleep(POLL);
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One alert of one stormwall instance, narrowed by some of its labels.
struct Alert {
    name: &'static str,
    labels: BTreeMap<String, String>,
    /// The labels as a PromQL matcher list (without braces).
    selector: String,
}

impl Alert {
    fn new(name: &'static str, sw: &Stormwall, labels: &[(&str, &str)]) -> Alert {
        let mut all = BTreeMap::from([
            ("alertname".to_owned(), name.to_owned()),
            ("instance".to_owned(), instance(sw)),
        ]);
        all.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let selector = all
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect::<Vec<_>>()
            .join(",");
        Alert {
            name,
            labels: all,
            selector,
        }
    }
}

/// The scrape target (`instance` label) of a stormwall: its admin address.
fn instance(sw: &Stormwall) -> String {
    format!("127.0.0.1:{}", sw.admin_port)
}

/// A PromQL selector for `metric` of `sw` with `labels`.
fn sel(metric: &str, sw: &Stormwall, labels: &[(&str, &str)]) -> String {
    let mut s = format!("{metric}{{instance=\"{}\"", instance(sw));
    for (k, v) in labels {
        s.push_str(&format!(",{k}=\"{v}\""));
    }
    s.push('}');
    s
}

/// Runs `drive` on a thread of its own while `body` runs, then tells it to stop (its
/// argument turns true) and returns what it returned. The flag is also set if `body`
/// panics, so a failing wait never leaves a driver running.
fn driving<T: Send>(drive: impl FnOnce(&AtomicBool) -> T + Send, body: impl FnOnce()) -> T {
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let driver = s.spawn(|| drive(&stop));
        {
            let _stop = StopOnDrop(&stop);
            body();
        }
        driver
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn stopped(stop: &AtomicBool) -> bool {
    stop.load(Ordering::SeqCst)
}

/// Rewrites stormwall's config file with `edit` applied to its TOML, and reloads (SIGHUP).
fn reload_with(sw: &Stormwall, edit: impl FnOnce(&mut toml::Table)) {
    let text = std::fs::read_to_string(&sw.config_path).expect("cannot read the config");
    let mut config: toml::Table = text.parse().expect("the test config is TOML");
    edit(&mut config);
    let text = toml::to_string(&config).expect("cannot render the config");
    std::fs::write(&sw.config_path, text).expect("cannot write the config");
    sw.signal("HUP");
}

fn table<'a>(config: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    config
        .entry(name)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("a config section is a table")
}

// ---- the scenarios ----------------------------------------------------------------------

/// What a scenario does once Prometheus scrapes its stormwall (with its upstream, which it
/// owns).
type Run = Box<dyn FnOnce(&Prometheus, &Stormwall) + Send>;

/// One condition brought about for real, on a stormwall and an upstream (a Redis, or a
/// Redis Cluster) of its own.
struct Scenario {
    /// Its `scenario` target label, and its name in failure messages.
    name: &'static str,
    /// The alerts it fires and resolves.
    alerts: &'static [&'static str],
    sw: Stormwall,
    run: Run,
}

impl Scenario {
    fn new<U: Send + 'static>(
        name: &'static str,
        alerts: &'static [&'static str],
        mut upstream: U,
        sw: Stormwall,
        run: impl FnOnce(&Prometheus, &mut U, &Stormwall) + Send + 'static,
    ) -> Scenario {
        Scenario {
            name,
            alerts,
            sw,
            run: Box::new(move |prom, sw| run(prom, &mut upstream, sw)),
        }
    }
}

/// Redis goes away (killed by pid) and comes back on the same port.
fn redis_goes_away() -> Scenario {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[admin]\nprobe_interval = \"200ms\"\n");
    Scenario::new(
        "redis_goes_away",
        &["StormwallUpstreamDown"],
        redis,
        sw,
        move |prom, redis, sw| {
            let alert = Alert::new("StormwallUpstreamDown", sw, &[]);
            let up = sel("stormwall_upstream_up", sw, &[]);
            prom.wait_value("Redis is up at first", &up, |v| v == 1.0);
            redis.kill();
            prom.wait_firing(&alert);
            redis.restart();
            prom.wait_resolved(&alert);
            prom.wait_value("stormwall_upstream_up back to 1", &up, |v| v == 1.0);
            assert_eq!(
                prom.value(&format!("min_over_time({up}[10m])")),
                Some(0.0),
                "stormwall_upstream_up was recorded at 0 while Redis was away"
            );
            assert_eq!(text(&sw.raw().call(&[b"PING"])), "PONG");
        },
    )
}

/// A flush storm: clients clearing the cache after every update (`FLUSHDB`, coalesced by
/// the shield) while an app bug flushes everything (`FLUSHALL`, which `flush.deny`
/// refuses). `rate()` of governed commands must show the storm, and its `increase` the
/// commands sent; the refusals fire `StormwallInvalidationsRejected{reason="denied"}`.
fn flush_storm() -> Scenario {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[flush]\ndeny = [\"FLUSHALL\"]\n");
    Scenario::new(
        "flush_storm",
        &["StormwallInvalidationsRejected"],
        redis,
        sw,
        move |prom, _, sw| {
            const FLUSHERS: usize = 4;
            let alert = Alert::new(
                "StormwallInvalidationsRejected",
                sw,
                &[("reason", "denied")],
            );
            let governed = sel("stormwall_commands_total", sw, &[("class", "governed")]);
            // A sample from before the storm, so the windows below start at 0.
            prom.wait_value(
                "governed commands scraped before the storm",
                &governed,
                |v| v == 0.0,
            );
            let before = Instant::now();
            let (flushdbs, flushalls) = driving(
                |stop| {
                    thread::scope(|s| {
                        let flushers: Vec<_> = (0..FLUSHERS)
                            .map(|_| {
                                let mut raw = sw.raw();
                                s.spawn(move || {
                                    let mut n = 0u64;
                                    while !stopped(stop) {
                                        assert_eq!(text(&raw.call(&[b"FLUSHDB"])), "OK");
                                        n += 1;
                                    }
                                    n
                                })
                            })
                            .collect();
                        let mut raw = sw.raw();
                        let mut denied = 0u64;
                        while !stopped(stop) {
                            let e = error_text(&raw.call(&[b"FLUSHALL"]));
                            assert!(e.contains("flush.deny"), "{e}");
                            denied += 1;
                            thread::sleep(Duration::from_millis(50));
                        }
                        let flushdbs: u64 = flushers.into_iter().map(|h| h.join().unwrap()).sum();
                        (flushdbs, denied)
                    })
                },
                || {
                    prom.wait_value(
                        "rate() of governed commands during the storm",
                        &format!("rate({governed}[5s])"),
                        |v| v > 0.0,
                    );
                    prom.wait_firing(&alert);
                },
            );
            // Every command counted once, as sent: the last sample equals the count, and
            // the counter's increase over a window from before the storm (its first sample
            // 0, so Prometheus extrapolates nothing before it; after the last, at most about
            // one scrape interval) matches it.
            prom.wait_value("governed commands recorded", &governed, |v| {
                v == flushdbs as f64
            });
            prom.wait_value(
                "denied commands recorded",
                &sel("stormwall_commands_total", sw, &[("class", "denied")]),
                |v| v == flushalls as f64,
            );
            prom.wait_value(
                "denied flushes recorded as rejected",
                &sel(
                    "stormwall_invalidation_rejected_total",
                    sw,
                    &[("reason", "denied")],
                ),
                |v| v == flushalls as f64,
            );
            // Prometheus extrapolates `increase()` past the samples by at most 1.1 average
            // scrape intervals at each end of the window; over N samples that is at most
            // 2.2 / (N - 1) of the increase. Scrapes stretch on a loaded machine, so the bound
            // is computed from the samples Prometheus has, in the same query.
            let window = before.elapsed().as_secs() + 10;
            let increase = format!("increase({governed}[{window}s])");
            let samples = format!("count_over_time({governed}[{window}s])");
            let sent = flushdbs as f64;
            let raw = prom
                .value(&format!("{increase} / (1 + 2.2 / ({samples} - 1))"))
                .expect("increase of governed commands without extrapolation");
            let extrapolated = prom
                .value(&increase)
                .expect("increase of governed commands");
            assert!(
                sent <= extrapolated && raw <= sent,
                "{increase} = {extrapolated} (at most {raw} before extrapolation), {flushdbs} \
                 FLUSHDB sent"
            );
            // Coalesced: fewer flushes reached Redis than clients asked for.
            let requested = sel(
                "stormwall_flushes_requested_total",
                sw,
                &[("command", "flushdb")],
            );
            prom.wait_value("flush requests recorded", &requested, |v| v == sent);
            let executed = prom
                .value(&sel(
                    "stormwall_flushes_executed_total",
                    sw,
                    &[("command", "flushdb")],
                ))
                .expect("flushes executed");
            assert!(
                (1.0..sent).contains(&executed),
                "{executed} flushes executed for {flushdbs} requested"
            );
            prom.wait_resolved(&alert);
        },
    )
}

/// A queue that fills: 9,900 deletes admitted against a budget of 20 keys a second, more
/// refused (`on_full = "reject"`), every request waiting seconds for its batch. Then the
/// operator's fix from the alert text: raise the budget and reload. The queue drains, the
/// depth gauge is back at 0, and all three alerts resolve.
fn queue_fills() -> Scenario {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[invalidation]\nadaptive = false\non_full = \"reject\"\nkeys_per_second = 20\n\
         keys_burst = 20\nmax_batch_keys = 20\nmax_wait = \"10m\"\nmax_pending_keys = 10000\n",
    );
    Scenario::new(
        "queue_fills",
        &[
            "StormwallQueueSaturated",
            "StormwallInvalidationsRejected",
            "StormwallInvalidationWaitHigh",
        ],
        redis,
        sw,
        move |prom, _, sw| {
            // A session hands one pipelined group to the shield at a time, so the queue is
            // filled by many clients with a pipeline each (one write, one group).
            const CLIENTS: usize = 100;
            const EACH: usize = 99;
            // Larger than the free room in the key queue while the storm lasts.
            const REFUSED_KEYS: usize = 2000;
            let alerts = [
                Alert::new("StormwallQueueSaturated", sw, &[]),
                Alert::new(
                    "StormwallInvalidationsRejected",
                    sw,
                    &[("reason", "queue_full")],
                ),
                Alert::new("StormwallInvalidationWaitHigh", sw, &[]),
            ];
            let depth = sel("stormwall_invalidation_queue_depth", sw, &[]);
            let mut clients: Vec<Raw> = (0..CLIENTS).map(|_| sw.raw()).collect();
            for (c, raw) in clients.iter_mut().enumerate() {
                let pipeline: Vec<u8> = (0..EACH)
                    .flat_map(|i| encode_cmd(&[b"DEL", format!("queued:{c}:{i}").as_bytes()]))
                    .collect();
                raw.send(&pipeline);
            }
            prom.wait_value("the queue fills past 8000", &depth, |v| v > 8000.0);
            let busy = driving(
                |stop| {
                    let keys: Vec<Vec<u8>> = (0..REFUSED_KEYS)
                        .map(|i| format!("refused:{i}").into_bytes())
                        .collect();
                    let mut del: Vec<&[u8]> = vec![b"DEL"];
                    del.extend(keys.iter().map(Vec::as_slice));
                    let mut raw = sw.raw();
                    let mut busy = 0u64;
                    while !stopped(stop) {
                        let e = error_text(&raw.call(&del));
                        assert!(e.starts_with("BUSY"), "{e}");
                        busy += 1;
                        thread::sleep(Duration::from_millis(200));
                    }
                    busy
                },
                || alerts.iter().for_each(|a| prom.wait_firing(a)),
            );
            // The fix the alerts advise: raise the budget and reload.
            reload_with(sw, |config| {
                let inv = table(config, "invalidation");
                inv.insert("keys_per_second".into(), 100_000.into());
                inv.insert("keys_burst".into(), 10_000.into());
                inv.insert("max_batch_keys".into(), 1000.into());
            });
            // Nothing lost, nothing faked: every queued request gets its real answer.
            for raw in &mut clients {
                for _ in 0..EACH {
                    assert_eq!(as_int(&raw.read_frame()), 0);
                }
            }
            prom.wait_value("the queue-depth gauge back to 0", &depth, |v| v == 0.0);
            let peak = prom.value(&format!("max_over_time({depth}[10m])"));
            assert!(
                peak.is_some_and(|p| p > 8000.0),
                "queue depth peak recorded: {peak:?}"
            );
            prom.wait_value(
                "refusals recorded as rejected (queue_full)",
                &sel(
                    "stormwall_invalidation_rejected_total",
                    sw,
                    &[("reason", "queue_full")],
                ),
                |v| v == busy as f64,
            );
            prom.wait_value(
                "the reload recorded",
                &sel("stormwall_config_reloads_total", sw, &[("result", "ok")]),
                |v| v == 1.0,
            );
            alerts.iter().for_each(|a| prom.wait_resolved(a));
        },
    )
}

/// A config reload that fails (a broken file, then SIGHUP), then a good one.
fn bad_reload() -> Scenario {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    Scenario::new(
        "bad_reload",
        &["StormwallConfigReloadFailed"],
        redis,
        sw,
        move |prom, _, sw| {
            let alert = Alert::new("StormwallConfigReloadFailed", sw, &[]);
            let failed = sel(
                "stormwall_config_reloads_total",
                sw,
                &[("result", "failed")],
            );
            let ok = sel("stormwall_config_reloads_total", sw, &[("result", "ok")]);
            prom.wait_value("no failed reload at first", &failed, |v| v == 0.0);
            let good = std::fs::read_to_string(&sw.config_path).expect("cannot read the config");
            // An operator's typo: a section header left unclosed.
            std::fs::write(&sw.config_path, format!("{good}\n[invalidation\n"))
                .expect("cannot write the config");
            sw.signal("HUP");
            prom.wait_firing(&alert);
            assert_eq!(prom.value(&failed), Some(1.0));
            std::fs::write(&sw.config_path, &good).expect("cannot write the config");
            sw.signal("HUP");
            prom.wait_value("the good reload recorded", &ok, |v| v == 1.0);
            assert_eq!(text(&sw.raw().call(&[b"PING"])), "PONG");
            prom.wait_resolved(&alert);
            assert_eq!(prom.value(&failed), Some(1.0));
        },
    )
}

/// Something that does not speak Redis keeps connecting to the client port.
fn protocol_errors() -> Scenario {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    Scenario::new(
        "protocol_errors",
        &["StormwallProtocolErrors"],
        redis,
        sw,
        move |prom, _, sw| {
            let alert = Alert::new("StormwallProtocolErrors", sw, &[]);
            let sent = driving(
                |stop| {
                    let mut n = 0u64;
                    while !stopped(stop) {
                        // An integer where a request must be an array of bulk strings.
                        let mut raw = sw.raw();
                        raw.send(b"*1\r\n:1\r\n");
                        assert!(raw.closed(), "a protocol error left the connection open");
                        n += 1;
                        thread::sleep(Duration::from_millis(150));
                    }
                    n
                },
                || prom.wait_firing(&alert),
            );
            prom.wait_value(
                "every bad connection recorded",
                &sel("stormwall_protocol_errors_total", sw, &[]),
                |v| v == sent as f64,
            );
            prom.wait_resolved(&alert);
        },
    )
}

/// An app opens more connections than `listen.max_clients`.
fn too_many_clients() -> Scenario {
    let redis = Redis::start();
    let sw = Stormwall::start_with_listen(&redis.addr(), "max_clients = 2\n", "");
    Scenario::new(
        "too_many_clients",
        &["StormwallClientsRejected"],
        redis,
        sw,
        move |prom, _, sw| {
            let alert = Alert::new("StormwallClientsRejected", sw, &[("reason", "max_clients")]);
            let mut held = [sw.raw(), sw.raw()];
            for raw in &mut held {
                assert_eq!(text(&raw.call(&[b"PING"])), "PONG");
            }
            let refused = driving(
                |stop| {
                    let mut n = 0u64;
                    while !stopped(stop) {
                        let mut raw = sw.raw();
                        let e = error_text(&raw.read_frame());
                        assert_eq!(e, "ERR max number of clients reached");
                        assert!(raw.closed());
                        n += 1;
                        thread::sleep(Duration::from_millis(200));
                    }
                    n
                },
                || prom.wait_firing(&alert),
            );
            prom.wait_value(
                "every refused connection recorded",
                &sel(
                    "stormwall_client_connections_rejected_total",
                    sw,
                    &[("reason", "max_clients")],
                ),
                |v| v == refused as f64,
            );
            prom.wait_resolved(&alert);
            for raw in &mut held {
                assert_eq!(text(&raw.call(&[b"PING"])), "PONG");
            }
        },
    )
}

/// Redis keeps dropping client sessions: each client's own Redis connection is killed
/// (`CLIENT KILL ID`, what a Redis `timeout`, an eviction or a flaky network path does).
fn redis_drops_sessions() -> Scenario {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    Scenario::new(
        "redis_drops_sessions",
        &["StormwallUpstreamErrors"],
        redis,
        sw,
        move |prom, redis, sw| {
            let alert = Alert::new("StormwallUpstreamErrors", sw, &[("kind", "lost")]);
            let mut admin = redis.raw();
            let dropped = driving(
                |stop| {
                    let mut n = 0u64;
                    while !stopped(stop) {
                        let mut raw = sw.raw();
                        // The id of the Redis connection carrying this client (in shared
                        // mode CLIENT pins the client to a connection of its own).
                        let id = as_int(&raw.call(&[b"CLIENT", b"ID"]));
                        let killed =
                            admin.call(&[b"CLIENT", b"KILL", b"ID", id.to_string().as_bytes()]);
                        assert_eq!(as_int(&killed), 1);
                        assert!(raw.closed(), "the session outlived its Redis connection");
                        n += 1;
                        thread::sleep(Duration::from_millis(300));
                    }
                    n
                },
                || prom.wait_firing(&alert),
            );
            prom.wait_value(
                "every dropped session recorded",
                &sel("stormwall_upstream_errors_total", sw, &[("kind", "lost")]),
                |v| v == dropped as f64,
            );
            prom.wait_resolved(&alert);
        },
    )
}

/// Observe mode with a budget far below the delete rate: everything passes through and is
/// applied, and enforcement would have refused some.
fn observe_over_budget() -> Scenario {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[invalidation]\nmode = \"observe\"\nadaptive = false\nkeys_per_second = 10\n\
         keys_burst = 10\nmax_wait = \"2s\"\n",
    );
    Scenario::new(
        "observe_over_budget",
        &["StormwallObserveWouldRefuse"],
        redis,
        sw,
        move |prom, _, sw| {
            let alert = Alert::new("StormwallObserveWouldRefuse", sw, &[("command", "delete")]);
            let dels = driving(
                |stop| {
                    let mut raw = sw.raw();
                    let mut n = 0u64;
                    while !stopped(stop) {
                        let keys: Vec<Vec<u8>> = (0..5)
                            .map(|k| format!("observed:{n}:{k}").into_bytes())
                            .collect();
                        let mut mset: Vec<&[u8]> = vec![b"MSET"];
                        for k in &keys {
                            mset.extend([k.as_slice(), b"v"]);
                        }
                        assert_eq!(text(&raw.call(&mset)), "OK");
                        let mut del: Vec<&[u8]> = vec![b"DEL"];
                        del.extend(keys.iter().map(Vec::as_slice));
                        // Observed, not enforced: Redis deleted all five.
                        assert_eq!(as_int(&raw.call(&del)), 5);
                        n += 1;
                        thread::sleep(Duration::from_millis(20));
                    }
                    n
                },
                || prom.wait_firing(&alert),
            );
            let observed = sel(
                "stormwall_invalidation_observed_total",
                sw,
                &[("command", "delete")],
            );
            prom.wait_value(
                "every DEL observed once",
                &format!("sum({observed})"),
                |v| v == dels as f64,
            );
            let refuse = prom
                .value(&sel(
                    "stormwall_invalidation_observed_total",
                    sw,
                    &[("command", "delete"), ("would", "refuse")],
                ))
                .unwrap_or(0.0);
            assert!(refuse > 0.0, "no would-refuse recorded");
            assert_eq!(
                prom.value(&format!(
                    "sum({})",
                    sel("stormwall_invalidation_rejected_total", sw, &[])
                )),
                Some(0.0),
                "observe mode refused something for real"
            );
            prom.wait_resolved(&alert);
        },
    )
}

/// Redis stalled (`DEBUG SLEEP` back to back from two connections) under a stream of
/// deletes: the adaptive budget is held at its floor (0.05 by default); once Redis is quick
/// again it grows back.
fn slow_redis() -> Scenario {
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let sw = Stormwall::start(&redis.addr(), "");
    Scenario::new(
        "slow_redis",
        &["StormwallAdaptiveBudgetAtFloor"],
        redis,
        sw,
        move |prom, redis, sw| {
            let alert = Alert::new("StormwallAdaptiveBudgetAtFloor", sw, &[]);
            let ratio = sel("stormwall_invalidation_adaptive_ratio", sw, &[]);
            driving(
                |stop| {
                    // Deletes keep flowing, so the controller keeps sampling Redis.
                    let mut raw = sw.raw();
                    let mut i = 0u64;
                    while !stopped(stop) {
                        assert_eq!(as_int(&raw.call(&[b"DEL", format!("k{i}").as_bytes()])), 0);
                        i += 1;
                        thread::sleep(Duration::from_millis(5));
                    }
                },
                || {
                    driving(
                        |stop| {
                            // Two sleepers, so one stall is always queued behind the other
                            // and a quick window stays rare even when a thread is slow to
                            // be scheduled.
                            thread::scope(|s| {
                                for _ in 0..2 {
                                    let mut raw = redis.raw();
                                    s.spawn(move || {
                                        while !stopped(stop) {
                                            let r = raw.call(&[b"DEBUG", b"SLEEP", b"0.25"]);
                                            assert_eq!(text(&r), "OK");
                                        }
                                    });
                                }
                            });
                        },
                        || prom.wait_firing(&alert),
                    );
                    let floor = prom.value(&format!("min_over_time({ratio}[10m])"));
                    assert!(
                        floor.is_some_and(|f| (0.05 - 1e-9..=0.1).contains(&f)),
                        "the adaptive ratio's low point: {floor:?}"
                    );
                    prom.wait_resolved(&alert);
                    prom.wait_value("the budget grown again", &ratio, |v| v > 0.1);
                },
            );
        },
    )
}

/// A TLS listener certificate that expires in two days, then renewed (files replaced,
/// SIGHUP).
fn certificate_expires() -> Scenario {
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("cannot create a temp dir for certificates");
    let (crt, key) = certificate(dir.path(), Duration::from_secs(2 * 86400));
    let sw = Stormwall::start(
        &redis.addr(),
        &format!(
            "[listen.tls]\naddress = \"127.0.0.1:{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            free_port(),
            crt.display(),
            key.display()
        ),
    );
    Scenario::new(
        "certificate_expires",
        &["StormwallCertificateExpiresSoon"],
        redis,
        sw,
        move |prom, _, sw| {
            let file = crt.display().to_string();
            let labels = [("side", "client"), ("file", file.as_str())];
            let alert = Alert::new("StormwallCertificateExpiresSoon", sw, &labels);
            let expiry = sel("stormwall_tls_certificate_expiry_seconds", sw, &labels);
            prom.wait_value("the certificate's remaining life", &expiry, |v| {
                (86400.0..=2.0 * 86400.0).contains(&v)
            });
            prom.wait_firing(&alert);
            certificate(dir.path(), Duration::from_secs(365 * 86400));
            sw.signal("HUP");
            prom.wait_value("the renewed certificate's life", &expiry, |v| {
                v > 300.0 * 86400.0
            });
            prom.wait_resolved(&alert);
        },
    )
}

/// A Redis Cluster that loses a shard: three masters without replicas, one killed. Once the
/// others mark it failed, every master answers `CLUSTERDOWN`, which stormwall sends again
/// until `upstream.outage_wait` and then gives the client; writers keep writing. The master
/// restarted (same port, same `nodes.conf`) rejoins and the cluster serves again. The
/// slot-map and per-node series say what happened.
fn cluster_down() -> Scenario {
    let cluster = Cluster::start(3, 0);
    let sw = cluster::proxy(&cluster, "outage_wait = \"500ms\"\n");
    Scenario::new(
        "cluster_down",
        &["StormwallClusterDown"],
        cluster,
        sw,
        move |prom, cluster, sw| {
            let alert = Alert::new("StormwallClusterDown", sw, &[("kind", "clusterdown")]);
            let served = sel("stormwall_cluster_slots_served", sw, &[]);
            prom.wait_value("every slot served", &served, |v| v == 16384.0);
            prom.wait_value(
                "three masters",
                &sel("stormwall_cluster_masters", sw, &[]),
                |v| v == 3.0,
            );
            let victim = cluster.masters()[2].port;
            let written = driving(
                |stop| {
                    // SETs over every master; a client closed (its master unreachable past
                    // outage_wait) connects again.
                    let mut raw = sw.raw();
                    let (mut ok, mut down) = (0u64, 0u64);
                    let mut i = 0u64;
                    while !stopped(stop) {
                        i += 1;
                        let key = format!("k{i}");
                        let sent = raw
                            .stream
                            .write_all(&encode_cmd(&[b"SET", key.as_bytes(), b"v"]))
                            .is_ok();
                        match sent.then(|| raw.try_read_frame()).flatten() {
                            Some(r) if text(&r) == "OK" => ok += 1,
                            Some(r) => {
                                let e = error_text(&r);
                                assert!(e.starts_with("CLUSTERDOWN"), "a SET answered {e}");
                                down += 1;
                            }
                            None => raw = sw.raw(),
                        }
                        thread::sleep(Duration::from_millis(5));
                    }
                    (ok, down)
                },
                || {
                    cluster.kill(victim);
                    prom.wait_firing(&alert);
                    cluster.restart(victim);
                    prom.wait_resolved(&alert);
                },
            );
            assert!(
                written.0 > 0 && written.1 > 0,
                "OK and CLUSTERDOWN replies: {written:?}"
            );
            // Every master was sent commands, over connections of its own.
            for node in cluster.masters() {
                let labels = [("node", &*node.addr())];
                let commands = sel("stormwall_cluster_node_commands_total", sw, &labels);
                prom.wait_value("commands sent to each master", &commands, |v| v > 0.0);
                let connections = sel("stormwall_cluster_node_connections", sw, &labels);
                prom.wait_value("connections to each master", &connections, |v| v > 0.0);
            }
            prom.wait_value("every slot served again", &served, |v| v == 16384.0);
            assert_eq!(
                prom.value(&sel("stormwall_cluster_failovers_total", sw, &[])),
                Some(0.0),
                "no replica to promote, no failover"
            );
        },
    )
}

/// Writes a self-signed certificate for localhost valid from an hour ago for `valid_for`
/// from now, as `tls.crt`/`tls.key` in `dir`.
fn certificate(dir: &Path, valid_for: Duration) -> (PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("certificate parameters");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + (now - Duration::from_secs(3600));
    params.not_after = epoch + (now + valid_for);
    let key = rcgen::KeyPair::generate().expect("a key pair");
    let cert = params.self_signed(&key).expect("a self-signed certificate");
    let (crt_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&crt_path, cert.pem()).expect("cannot write the certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("cannot write the key");
    (crt_path, key_path)
}

#[test]
fn every_shipped_alert_fires_and_resolves_in_a_real_prometheus() {
    let shipped = shipped_rules();
    let rules = rescaled(&shipped);
    assert_only_durations_differ(&shipped, &rules);
    let scenarios = vec![
        redis_goes_away(),
        flush_storm(),
        queue_fills(),
        bad_reload(),
        protocol_errors(),
        too_many_clients(),
        redis_drops_sessions(),
        observe_over_budget(),
        slow_redis(),
        certificate_expires(),
        cluster_down(),
    ];
    // Every shipped alert is driven by some scenario (a new alert needs one here).
    let names: BTreeSet<String> = alert_names(&shipped).into_iter().collect();
    let driven: BTreeSet<String> = scenarios
        .iter()
        .flat_map(|s| s.alerts.iter().map(|a| a.to_string()))
        .collect();
    assert_eq!(
        names, driven,
        "alerts in deploy/prometheus/alerts.yml vs alerts driven here"
    );

    let targets: Vec<(&str, String)> = scenarios
        .iter()
        .map(|s| (s.name, instance(&s.sw)))
        .collect();
    let prom = Prometheus::start(&targets, &rules);
    // The rules loaded as shipped (rescaled), and every stormwall is scraped.
    let loaded = prom.api("/api/v1/rules", &[("type", "alert")]);
    let loaded_names: BTreeSet<String> = loaded["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(loaded_names, names, "rules Prometheus loaded: {loaded}");
    prom.wait_value(
        "every stormwall scraped",
        "count(up{job=\"stormwall\"} == 1)",
        |v| v == targets.len() as f64,
    );

    let started = Instant::now();
    let failures: Vec<String> = thread::scope(|s| {
        let running: Vec<_> = scenarios
            .into_iter()
            .map(|scenario| {
                let prom = &prom;
                let name = scenario.name;
                let handle = thread::Builder::new()
                    .name(name.to_owned())
                    .spawn_scoped(s, move || {
                        let began = Instant::now();
                        let Scenario { sw, run, .. } = scenario;
                        run(prom, &sw);
                        eprintln!("{name}: done in {:.1?}", began.elapsed());
                    })
                    .expect("cannot start a scenario thread");
                (name, handle)
            })
            .collect();
        running
            .into_iter()
            .filter_map(|(name, handle)| {
                handle.join().err().map(|panic| {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("{name}: {why}")
                })
            })
            .collect()
    });
    eprintln!("all scenarios done in {:.1?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "failed scenarios:\n{}",
        failures.join("\n\n")
    );
}
