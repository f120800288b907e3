//! Open-loop arrival schedules: Poisson processes at a fixed rate, a linear ramp, or on/off
//! bursts. Arrival times never depend on how fast the system answers (that is what makes the
//! load open-loop: a slow server faces a growing queue instead of a politely waiting client).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Request rate over time (requests per second).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RateShape {
    /// The same rate throughout.
    Constant { rate: f64 },
    /// Linear from `from` to `to` over `over_s` seconds, then `to`.
    Ramp { from: f64, to: f64, over_s: f64 },
    /// `burst` req/s for the first `burst_s` seconds of every `period_s`, `base` otherwise.
    Bursts {
        base: f64,
        burst: f64,
        period_s: f64,
        burst_s: f64,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArrivalError {
    #[error("rate {name} = {value} must be finite and ≥ 0")]
    BadRate { name: &'static str, value: f64 },
    #[error("{name} = {value} s must be finite and > 0")]
    BadPeriod { name: &'static str, value: f64 },
    #[error("the rate is zero everywhere: no request would ever be sent")]
    NeverSends,
}

impl RateShape {
    /// Rate at `t` seconds after the start.
    pub fn rate_at(&self, t: f64) -> f64 {
        match *self {
            RateShape::Constant { rate } => rate,
            RateShape::Ramp { from, to, over_s } => {
                if t >= over_s {
                    to
                } else {
                    from + (to - from) * (t / over_s)
                }
            }
            RateShape::Bursts {
                base,
                burst,
                period_s,
                burst_s,
            } => {
                if t.rem_euclid(period_s) < burst_s {
                    burst
                } else {
                    base
                }
            }
        }
    }

    /// An upper bound of [`rate_at`](Self::rate_at) (the thinning envelope).
    pub fn max_rate(&self) -> f64 {
        match *self {
            RateShape::Constant { rate } => rate,
            RateShape::Ramp { from, to, .. } => from.max(to),
            RateShape::Bursts { base, burst, .. } => base.max(burst),
        }
    }

    /// Checks every number, so the generator can never loop forever or divide by zero.
    pub fn validate(&self) -> Result<(), ArrivalError> {
        let rate = |name, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(ArrivalError::BadRate { name, value })
            }
        };
        let period = |name, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(ArrivalError::BadPeriod { name, value })
            }
        };
        match *self {
            RateShape::Constant { rate: r } => rate("rate", r)?,
            RateShape::Ramp { from, to, over_s } => {
                rate("from", from)?;
                rate("to", to)?;
                period("over_s", over_s)?;
            }
            RateShape::Bursts {
                base,
                burst,
                period_s,
                burst_s,
            } => {
                rate("base", base)?;
                rate("burst", burst)?;
                period("period_s", period_s)?;
                period("burst_s", burst_s)?;
            }
        }
        if self.max_rate() <= 0.0 {
            return Err(ArrivalError::NeverSends);
        }
        Ok(())
    }
}

/// Arrival offsets from the start of the run, ascending, endless (bound it with `take_while`
/// on the duration and `take` on the request count).
///
/// A non-homogeneous Poisson process by thinning (Lewis & Shedler): candidates arrive as a
/// Poisson process at the envelope rate and each is kept with probability rate(t) / envelope.
#[derive(Debug, Clone)]
pub struct Arrivals {
    shape: RateShape,
    envelope: f64,
    rng: StdRng,
    t: f64,
}

impl Arrivals {
    pub fn new(shape: RateShape, seed: u64) -> Result<Self, ArrivalError> {
        shape.validate()?;
        Ok(Self {
            envelope: shape.max_rate(),
            shape,
            rng: StdRng::seed_from_u64(seed),
            t: 0.0,
        })
    }
}

impl Iterator for Arrivals {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        loop {
            // Inverse-CDF exponential gap; 1 - u is in (0, 1], so ln is finite.
            let u: f64 = self.rng.random();
            self.t += -(1.0 - u).ln() / self.envelope;
            if !self.t.is_finite() {
                return None;
            }
            let keep: f64 = self.rng.random();
            if keep * self.envelope < self.shape.rate_at(self.t) {
                // Finite but beyond `Duration`'s range: the schedule is over.
                return Duration::try_from_secs_f64(self.t).ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_rate_mean_gap_is_the_inverse_rate() {
        let n = 20_000;
        let a: Vec<f64> = Arrivals::new(RateShape::Constant { rate: 50.0 }, 7)
            .unwrap()
            .take(n)
            .map(|d| d.as_secs_f64())
            .collect();
        let mean_gap = a[n - 1] / n as f64;
        assert!((mean_gap - 0.02).abs() < 0.02 * 0.03, "mean gap {mean_gap}");
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        // Exponential gaps: the coefficient of variation is 1 (a fixed-interval generator
        // would pass the mean check but not this one).
        let gaps: Vec<f64> = a.windows(2).map(|w| w[1] - w[0]).collect();
        let m = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - m) * (g - m)).sum::<f64>() / gaps.len() as f64;
        let cv = var.sqrt() / m;
        assert!((cv - 1.0).abs() < 0.05, "cv {cv}");
    }

    #[test]
    fn same_seed_same_schedule() {
        let shape = RateShape::Constant { rate: 3.0 };
        let a: Vec<_> = Arrivals::new(shape, 1).unwrap().take(100).collect();
        let b: Vec<_> = Arrivals::new(shape, 1).unwrap().take(100).collect();
        let c: Vec<_> = Arrivals::new(shape, 2).unwrap().take(100).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn ramp_counts_follow_the_integral() {
        // 0 → 200 req/s over 10 s: expected 250 in [0,5), 750 in [5,10).
        let shape = RateShape::Ramp {
            from: 0.0,
            to: 200.0,
            over_s: 10.0,
        };
        let mut first = 0usize;
        let mut second = 0usize;
        for seed in 0..8 {
            for t in Arrivals::new(shape, seed)
                .unwrap()
                .map(|d| d.as_secs_f64())
                .take_while(|t| *t < 10.0)
            {
                if t < 5.0 {
                    first += 1;
                } else {
                    second += 1;
                }
            }
        }
        let (first, second) = (first as f64 / 8.0, second as f64 / 8.0);
        assert!((first - 250.0).abs() < 25.0, "first half {first}");
        assert!((second - 750.0).abs() < 50.0, "second half {second}");
    }

    #[test]
    fn bursts_send_nothing_between_bursts_when_base_is_zero() {
        let shape = RateShape::Bursts {
            base: 0.0,
            burst: 100.0,
            period_s: 2.0,
            burst_s: 0.5,
        };
        let a: Vec<f64> = Arrivals::new(shape, 3)
            .unwrap()
            .map(|d| d.as_secs_f64())
            .take_while(|t| *t < 20.0)
            .collect();
        assert!(a.iter().all(|t| t.rem_euclid(2.0) < 0.5));
        // 10 bursts × 0.5 s × 100/s = 500 expected.
        assert!((a.len() as f64 - 500.0).abs() < 70.0, "{}", a.len());
    }

    #[test]
    fn invalid_shapes_are_rejected() {
        assert_eq!(
            Arrivals::new(RateShape::Constant { rate: 0.0 }, 0).err(),
            Some(ArrivalError::NeverSends)
        );
        assert!(matches!(
            Arrivals::new(RateShape::Constant { rate: f64::NAN }, 0),
            Err(ArrivalError::BadRate { .. })
        ));
        assert!(matches!(
            RateShape::Ramp {
                from: 1.0,
                to: 2.0,
                over_s: 0.0
            }
            .validate(),
            Err(ArrivalError::BadPeriod { .. })
        ));
    }
}
