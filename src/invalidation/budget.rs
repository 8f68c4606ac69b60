//! A rate budget (`governor`) whose rate the adaptive controller may scale down.
//!
//! `governor`'s limiters have a fixed quota, so a scaled budget is a new limiter. It is
//! rebuilt only when the fraction moved by more than [`HYSTERESIS`] (so a controller that
//! hovers does not churn limiters), and a rebuilt one starts empty: a fresh limiter would
//! otherwise grant its whole burst at once — on a cut just when Redis asked for less, and
//! on each step of growing back.

use std::num::NonZeroU32;
use std::sync::Arc;

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Relative change of the fraction below which the current limiter is kept.
const HYSTERESIS: f64 = 0.1;

/// The budget at one fraction of its configured rate.
pub(super) struct Scaled {
    pub fraction: f64,
    pub per_second: u32,
    pub burst: u32,
    pub limiter: DefaultDirectRateLimiter,
}

impl Scaled {
    fn new(per_second: u32, burst: u32, fraction: f64) -> Scaled {
        let scale = |n: u32| ((f64::from(n) * fraction).round() as u32).max(1);
        let (per_second, burst) = (scale(per_second), scale(burst));
        Scaled {
            fraction,
            per_second,
            burst,
            limiter: RateLimiter::direct(quota(per_second, burst)),
        }
    }
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nz(per_second)).allow_burst(nz(burst))
}

/// A configured rate and burst, and the limiter in use for them now.
pub(super) struct Budget {
    pub per_second: u32,
    pub burst: u32,
    current: ArcSwap<Scaled>,
}

impl Budget {
    pub fn new(per_second: u32, burst: u32) -> Budget {
        Budget {
            per_second,
            burst,
            current: ArcSwap::from_pointee(Scaled::new(per_second, burst, 1.0)),
        }
    }

    /// The budget at `fraction` (in `0..=1`) of the configured rate and burst.
    pub fn at(&self, fraction: f64) -> Arc<Scaled> {
        let current = self.current.load_full();
        let moved = (fraction - current.fraction).abs() > HYSTERESIS * current.fraction;
        let restored = fraction == 1.0 && current.fraction != 1.0;
        if !moved && !restored {
            return current;
        }
        let scaled = Scaled::new(self.per_second, self.burst, fraction);
        if let Some(burst) = NonZeroU32::new(scaled.burst) {
            // Starts empty: the old limiter's burst was granted already, and a controller
            // that grows back in steps must not hand out a fresh burst at each step.
            let _ = scaled.limiter.check_n(burst);
        }
        let scaled = Arc::new(scaled);
        self.current.store(scaled.clone());
        scaled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scaled_budget_is_rebuilt_only_when_the_fraction_moves() {
        let budget = Budget::new(1000, 100);
        let full = budget.at(1.0);
        assert_eq!((full.per_second, full.burst), (1000, 100));
        assert!(Arc::ptr_eq(&full, &budget.at(0.95)));
        let cut = budget.at(0.5);
        assert_eq!((cut.per_second, cut.burst), (500, 50));
        // A rebuilt budget starts empty, cut or grown.
        assert!(cut.limiter.check().is_err());
        let grown = budget.at(1.0);
        assert_eq!(grown.per_second, 1000);
        assert!(grown.limiter.check().is_err());
        let tiny = budget.at(0.0001);
        assert_eq!((tiny.per_second, tiny.burst), (1, 1));
    }
}
