//! The adaptive budget: the invalidation budgets follow how fast Redis answers, so one
//! configuration fits a big Redis and a small one, and a Redis that is busy with something
//! else gets fewer invalidations.
//!
//! The signal is Redis's latency: the round trip of a `PING` (the readiness probe's, and
//! while invalidations are flowing one every [`SAMPLE_EVERY`] from a thread of the
//! controller's own, so a busy proxy does not read as a slow Redis), and each batch's own
//! execution time (a batch that takes Redis 30 ms delays every read queued behind it by as
//! much). Redis runs commands one at a time, so both rise together when invalidations crowd
//! out reads. A window's latency is its worst `PING` — a stall shows in any one of them —
//! and its *quickest* batch: a batch is timed on the proxy's own busy runtime, so one late
//! reply says little, while batches that are all slow are Redis's doing.
//!
//! The controller is gradient-style, like Netflix's concurrency-limits and TCP Vegas: it
//! learns a healthy baseline (the best window of the last [`BASELINE_HORIZON`], so a storm
//! cannot teach it that slow is normal, while a Redis that became slower for good is
//! re-learned within that horizon), and once per [`WINDOW`] compares the window's worst
//! latency with it. Above `2 × baseline + 5 ms` ([`SLACK`] keeps scheduling noise from
//! counting) the budget is cut in proportion to how far over it is, by at most half at a
//! time (from the share of the budget the window really used, when that is less: a budget
//! set far too high is cut where it bites); at or below it, the budget grows back by a tenth
//! per window's worth of time. It
//! never goes above the configured budgets (`invalidation.keys_per_second`,
//! `commands_per_second`, `flush.min_interval`) nor below `invalidation.adaptive_floor` of
//! them. Each change of direction is logged once: at `info` the start of a cut from the full
//! budget and the
//! return to it, at `debug` the turns between.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use metrics::gauge;
use tokio::time::Instant;

use super::Shared;
use crate::upstream::Conn;

/// How often the controller decides.
pub(super) const WINDOW: Duration = Duration::from_millis(100);
/// How often the controller PINGs Redis while invalidations are flowing.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_millis(25);
/// Latency this much over `2 × baseline` still counts as healthy: a sidecar on a busy node
/// sees a few milliseconds of scheduling noise, which says nothing about Redis, and a cache
/// read a few milliseconds slower is not what a storm does (it makes them hundreds slower).
const SLACK: f64 = 0.005;
/// How far back the baseline looks.
pub(super) const BASELINE_HORIZON: Duration = Duration::from_secs(60);
/// Growth per healthy window, as a factor and a step.
const GROW: f64 = 1.1;
const GROW_STEP: f64 = 0.01;
/// The deepest cut in one window.
const MAX_CUT: f64 = 0.5;

/// The sampler stops this long after the last governed request.
const ACTIVE_FOR: Duration = Duration::from_secs(2);

/// When the shield last had work, for the sampler.
#[derive(Debug)]
pub(super) struct Activity {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last governed request.
    last: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Activity {
    pub fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    fn recent(&self) -> bool {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last) < ACTIVE_FOR
    }
}

/// Starts the sampler ([`sample`]) on a thread of its own, with a runtime of its own: on the
/// proxy's runtime, a `PING`'s reply would wait for a turn behind the clients' work, and a
/// busy proxy would read as a slow Redis.
pub(super) fn spawn_sampler(
    activity: Arc<Activity>,
    live: impl Fn() -> Option<Arc<Shared>> + Send + 'static,
) {
    let started = std::thread::Builder::new()
        .name("stormwall-latency".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(sample(activity, live)),
                Err(e) => tracing::warn!(error = %e, "adaptive budget: no latency sampler"),
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "adaptive budget: no latency sampler");
    }
}

/// While invalidations are flowing (and the adaptive budget is on), `PING`s Redis every
/// [`SAMPLE_EVERY`] on a connection of its own and records the round trip: the readiness
/// probe alone samples once per `admin.probe_interval`, too seldom to steer a storm. No
/// credentials are needed: even Redis's `-NOAUTH` answer is a round trip. Ends when the
/// engine is gone (`live` returns `None`).
async fn sample(activity: Arc<Activity>, live: impl Fn() -> Option<Arc<Shared>>) {
    let ping = [vec![Bytes::from_static(b"PING")]];
    let mut conn: Option<Conn> = None;
    loop {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let Some(shared) = live() else {
            return;
        };
        if !shared.config.invalidation.adaptive || !activity.recent() {
            conn = None;
            continue;
        }
        let upstream = &shared.config.upstream;
        if conn.as_mut().is_none_or(Conn::is_closed) {
            conn = Conn::connect(upstream).await.ok();
        }
        let Some(c) = conn.as_mut() else {
            continue;
        };
        let started = Instant::now();
        let answered = c
            .call_until(&ping, started + upstream.reply_wait())
            .await
            .is_ok();
        // No answer in time is the slowest answer of all.
        shared.observe(Sample::RoundTrip, started.elapsed());
        if !answered {
            conn = None;
        }
    }
}

/// What a latency observation measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sample {
    /// A `PING`'s round trip.
    RoundTrip,
    /// A batch's (or a flush's) execution, send to reply.
    Batch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Steady,
    Cutting,
    Growing,
}

#[derive(Debug)]
struct State {
    /// The budget now, as a fraction of the configured one.
    fraction: f64,
    /// Each recent window's worst latency in seconds, oldest first: the baseline is the
    /// best of them.
    history: VecDeque<(Instant, f64)>,
    /// The worst round trip seen in the current window, and the quickest batch, in seconds.
    worst: Option<f64>,
    quickest: Option<f64>,
    /// Keys sent in the current window, in seconds of the configured key budget.
    used: f64,
    window_start: Instant,
    direction: Direction,
}

/// The adaptive budget's state, shared by every worker.
#[derive(Debug)]
pub(super) struct Controller {
    state: Mutex<State>,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            state: Mutex::new(State {
                fraction: 1.0,
                history: VecDeque::new(),
                worst: None,
                quickest: None,
                used: 0.0,
                window_start: Instant::now(),
                direction: Direction::Steady,
            }),
        }
    }
}

impl Controller {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Never held across an await; a poisoned state is still a valid state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one latency observation of `kind`.
    pub fn sample(&self, kind: Sample, latency: Duration, floor: f64) {
        self.sample_at(kind, latency, floor, Instant::now());
    }

    fn sample_at(&self, kind: Sample, latency: Duration, floor: f64, now: Instant) {
        let mut state = self.lock();
        let seconds = latency.as_secs_f64();
        match kind {
            Sample::RoundTrip => {
                state.worst = Some(state.worst.map_or(seconds, |w| w.max(seconds)));
            }
            Sample::Batch => {
                state.quickest = Some(state.quickest.map_or(seconds, |q| q.min(seconds)));
            }
        }
        if now.duration_since(state.window_start) >= WINDOW {
            decide(&mut state, floor, now);
        }
    }

    /// Redis's recent round trip: the worst of the last finished window, or of the current
    /// one if none has finished yet (`None` before any sample).
    pub fn latency(&self) -> Option<Duration> {
        let state = self.lock();
        state
            .history
            .back()
            .map(|(_, l)| *l)
            .or(state.worst)
            .map(Duration::from_secs_f64)
    }

    /// Notes `keys` sent to Redis under a configured budget of `per_second`: a cut starts
    /// from what was really used, so it bites at once even when the configured budget is far
    /// above what the storm reaches.
    pub fn sent(&self, keys: u64, per_second: u32) {
        self.lock().used += keys as f64 / f64::from(per_second.max(1));
    }

    /// The budget as a fraction of the configured one, in `floor..=1`.
    pub fn fraction(&self, floor: f64) -> f64 {
        let now = Instant::now();
        let mut state = self.lock();
        if now.duration_since(state.window_start) >= WINDOW
            && (state.worst.is_some() || state.quickest.is_some())
        {
            decide(&mut state, floor, now);
        }
        state.fraction.clamp(floor, 1.0)
    }
}

/// Ends the current window: compares its worst latency with the baseline and moves the
/// budget.
fn decide(state: &mut State, floor: f64, now: Instant) {
    let elapsed = now.duration_since(state.window_start).as_secs_f64();
    // The share of the configured budget the window really used (0: nothing was sent).
    let used = std::mem::take(&mut state.used) / elapsed.max(WINDOW.as_secs_f64());
    // Windows only pass when samples come (the probe's once a second while the shield is
    // idle): growth counts the windows' worth of time that passed, so a budget cut during
    // a storm is whole again a few seconds after it, however seldom Redis is sampled.
    let windows = (now.duration_since(state.window_start).as_secs_f64() / WINDOW.as_secs_f64())
        .clamp(1.0, 100.0);
    state.window_start = now;
    let latency = match (state.worst.take(), state.quickest.take()) {
        (Some(w), Some(q)) => w.max(q),
        (Some(l), None) | (None, Some(l)) => l,
        (None, None) => return,
    };
    while state
        .history
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > BASELINE_HORIZON)
    {
        state.history.pop_front();
    }
    state.history.push_back((now, latency));
    let baseline = state
        .history
        .iter()
        .map(|(_, l)| *l)
        .fold(latency, f64::min);
    let healthy = 2.0 * baseline + SLACK;
    let before = state.fraction;
    let direction = if latency > healthy {
        let cut = (healthy / latency).max(MAX_CUT);
        let from = if used > 0.0 { before.min(used) } else { before };
        state.fraction = (from * cut).max(floor);
        Direction::Cutting
    } else {
        state.fraction = (before * GROW.powf(windows) + GROW_STEP * windows).min(1.0);
        Direction::Growing
    };
    // An episode starts when the full budget is first cut and ends when it is whole again:
    // those two are what an operator needs to see; the turns between are detail.
    let percent = (state.fraction * 100.0).round();
    let (latency_ms, baseline_ms) = (latency * 1e3, baseline * 1e3);
    if direction == Direction::Cutting && before == 1.0 {
        tracing::info!(
            latency_ms,
            baseline_ms,
            budget_percent = percent,
            "adaptive invalidation budget: Redis is slower than its baseline; cutting"
        );
    } else if state.fraction == 1.0 && before < 1.0 {
        tracing::info!(
            latency_ms,
            baseline_ms,
            "adaptive invalidation budget: Redis is healthy; grown back to the full budget"
        );
    } else if direction != state.direction && state.fraction != before {
        tracing::debug!(
            latency_ms,
            baseline_ms,
            budget_percent = percent,
            ?direction,
            "adaptive invalidation budget turns"
        );
    }
    if state.fraction != before {
        state.direction = direction;
    }
    gauge!("stormwall_invalidation_adaptive_ratio").set(state.fraction);
    gauge!("stormwall_redis_latency_seconds").set(latency);
    gauge!("stormwall_redis_latency_baseline_seconds").set(baseline);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds one window with worst latency `ms`, `WINDOW` after the last, and says the
    /// fraction after it.
    fn window(c: &Controller, clock: &mut Instant, ms: f64) -> f64 {
        *clock += WINDOW;
        c.sample_at(
            Sample::RoundTrip,
            Duration::from_secs_f64(ms / 1e3),
            0.05,
            *clock,
        );
        c.lock().fraction
    }

    fn controller() -> (Controller, Instant) {
        let c = Controller::default();
        let start = c.lock().window_start;
        (c, start)
    }

    #[test]
    fn a_window_counts_its_worst_round_trip_and_its_quickest_batch() {
        let (c, mut t) = controller();
        window(&c, &mut t, 0.2);
        let batches = |c: &Controller, t: Instant, ms: &[f64]| {
            for ms in ms {
                let latency = Duration::from_secs_f64(ms / 1e3);
                c.sample_at(Sample::Batch, latency, 0.05, t + WINDOW / 2);
            }
        };
        // One late batch among quick ones, and quick PINGs: healthy.
        batches(&c, t, &[40.0, 1.0, 0.5]);
        assert_eq!(window(&c, &mut t, 0.3), 1.0);
        // Every batch slow: Redis's doing.
        batches(&c, t, &[40.0, 30.0]);
        assert!(window(&c, &mut t, 0.3) < 1.0);
    }

    #[test]
    fn healthy_latency_keeps_the_full_budget() {
        let (c, mut t) = controller();
        for _ in 0..50 {
            assert_eq!(window(&c, &mut t, 0.2), 1.0);
        }
    }

    #[test]
    fn a_slow_redis_cuts_the_budget_down_to_the_floor_and_it_grows_back() {
        let (c, mut t) = controller();
        for _ in 0..10 {
            window(&c, &mut t, 0.2);
        }
        // Four times the healthy bound: halved (the deepest cut) each window.
        assert_eq!(window(&c, &mut t, 21.6), 0.5);
        assert_eq!(window(&c, &mut t, 21.6), 0.25);
        // Just over the bound: a gentle cut.
        let gentle = window(&c, &mut t, 6.0);
        assert!(gentle > 0.2 && gentle < 0.25, "{gentle}");
        // A long storm does not teach it that slow is normal.
        for _ in 0..300 {
            window(&c, &mut t, 50.0);
        }
        assert_eq!(c.lock().fraction, 0.05, "never below the floor");
        let mut windows = 0;
        while window(&c, &mut t, 0.2) < 1.0 {
            windows += 1;
        }
        assert!(windows < 40, "back to the full budget in {windows} windows");
    }

    #[test]
    fn a_cut_starts_from_what_was_really_used() {
        let (c, mut t) = controller();
        window(&c, &mut t, 0.2);
        // A tenth of the budget was used in the window (10 keys/s for 100 ms of 100 keys/s).
        c.sent(1, 100);
        let cut = window(&c, &mut t, 21.6);
        assert!((cut - 0.05).abs() < 1e-9, "{cut}");
    }

    #[test]
    fn growth_follows_time_not_the_number_of_samples() {
        let (c, mut t) = controller();
        window(&c, &mut t, 0.2);
        for _ in 0..10 {
            window(&c, &mut t, 80.0);
        }
        assert_eq!(c.lock().fraction, 0.05);
        // Idle: one sample (the readiness probe) a second.
        for _ in 0..3 {
            t += Duration::from_millis(900);
            window(&c, &mut t, 0.2);
        }
        assert_eq!(c.lock().fraction, 1.0);
    }

    #[test]
    fn a_redis_that_became_slower_for_good_is_relearned() {
        let (c, mut t) = controller();
        for _ in 0..10 {
            window(&c, &mut t, 0.2);
        }
        let horizon = (BASELINE_HORIZON.as_millis() / WINDOW.as_millis()) as usize;
        assert!(window(&c, &mut t, 12.0) < 1.0);
        for _ in 0..horizon + 40 {
            window(&c, &mut t, 12.0);
        }
        assert_eq!(c.lock().fraction, 1.0);
    }
}
