//! Work-aware load: per endpoint, the prefill work this EPP has sent that has not produced a
//! first token yet, the requests decoding there, and the prefill rate learned from responses.
//!
//! Request counts treat a 3000-token cold prompt like a 30-token cached one; the prefill tokens
//! waiting at a replica are what a new request queues behind. The counters are atomics shared
//! by every snapshot of an endpoint (they live in its `DispatchCounters`), so the request path
//! never locks.
//!
//! ```text
//!  dispatch ─▶ prefill += uncached tokens, prefilling +1 ─▶ first response byte ─▶ prefill −=,
//!             (WorkGuard remembers the work ahead)           prefilling −1, decoding +1,
//!                                                            learn rate = (ahead + own) / TTFT
//!  stream ends (WorkGuard dropped) ─▶ whatever phase it is in is released
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::endpoint::DispatchCounters;

/// Prefill rate assumed until a response teaches one (tokens per second). Only ratios between
/// endpoints matter while every endpoint uses it.
pub const DEFAULT_PREFILL_TOKENS_PER_S: f64 = 4000.0;

/// Samples with less work, or a shorter time to first token, than these say more about step,
/// network and proxy overhead than about the prefill rate.
const MIN_LEARN_TOKENS: u64 = 512;
const MIN_LEARN_SECONDS: f64 = 0.02;

/// Weight of a new rate sample in the moving average.
const RATE_EWMA_ALPHA: f64 = 0.2;

/// Outstanding work at one endpoint (part of its `DispatchCounters`).
#[derive(Debug, Default)]
pub struct WorkCounters {
    /// Predicted uncached prompt tokens of dispatched requests with no first token yet.
    prefill_tokens: AtomicU64,
    /// Requests dispatched here that have not produced a first token.
    prefilling: AtomicU32,
    /// Requests producing tokens here.
    decoding: AtomicU32,
    /// Learned prefill rate, tokens per second as `f64` bits; 0 until the first sample.
    rate_bits: AtomicU64,
    /// When the endpoint last started on its pending prefill (queue became non-empty, or a
    /// request finished prefilling), as nanoseconds since [`epoch`]; 0 = nothing pending.
    drain_start_ns: AtomicU64,
}

/// The clock origin of `drain_start_ns`: an hour before first use, so instants taken shortly
/// before that first use still convert exactly.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(std::time::Duration::from_secs(3600))
            .unwrap_or(now)
    })
}

fn nanos_since_epoch(t: Instant) -> u64 {
    // `max(1)`: 0 means "nothing pending".
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A copy of [`WorkCounters`] taken for one scheduling decision.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WorkView {
    pub prefill_tokens: u64,
    pub prefilling: u32,
    pub decoding: u32,
    /// Learned tokens per second, `None` before the first sample.
    pub prefill_rate: Option<f64>,
    /// Seconds the endpoint has been working on its pending prefill since the last request
    /// finished prefilling there (0 with nothing pending).
    pub draining_s: f64,
}

impl WorkView {
    /// Pending prefill tokens less what `rate` tokens/s has worked off since the last request
    /// finished prefilling. The counters release a request's tokens only at its first token,
    /// so without this a half-done 7000-token prefill would count as 7000 tokens of queue.
    pub fn remaining_prefill(&self, rate: f64) -> u64 {
        let done = (rate.max(0.0) * self.draining_s).min(u64::MAX as f64) as u64;
        self.prefill_tokens.saturating_sub(done)
    }
}

/// `now` on the clock [`WorkCounters::view_at`] takes: read it once per scheduling decision,
/// not once per endpoint.
pub fn clock_ns(now: Instant) -> u64 {
    nanos_since_epoch(now)
}

impl WorkCounters {
    pub fn view(&self, now: Instant) -> WorkView {
        self.view_at(nanos_since_epoch(now))
    }

    /// [`Self::view`] as of `now_ns` from [`clock_ns`].
    pub fn view_at(&self, now_ns: u64) -> WorkView {
        let rate = f64::from_bits(self.rate_bits.load(Ordering::Relaxed));
        let prefill_tokens = self.prefill_tokens.load(Ordering::Relaxed);
        let start = self.drain_start_ns.load(Ordering::Relaxed);
        let draining_s = if start == 0 || prefill_tokens == 0 {
            0.0
        } else {
            now_ns.saturating_sub(start) as f64 * 1e-9
        };
        WorkView {
            prefill_tokens,
            prefilling: self.prefilling.load(Ordering::Relaxed),
            decoding: self.decoding.load(Ordering::Relaxed),
            prefill_rate: (rate.is_finite() && rate > 0.0).then_some(rate),
            draining_s,
        }
    }

    /// Folds one observed rate into the moving average. Racing updates may lose a sample,
    /// which an average can afford.
    fn learn_rate(&self, sample: f64) {
        if !(sample.is_finite() && sample > 0.0) {
            return;
        }
        let old = f64::from_bits(self.rate_bits.load(Ordering::Relaxed));
        let new = if old.is_finite() && old > 0.0 {
            old + RATE_EWMA_ALPHA * (sample - old)
        } else {
            sample
        };
        self.rate_bits.store(new.to_bits(), Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prefill,
    Decode,
    Done,
}

/// One request's share of its endpoint's [`WorkCounters`]; released on drop whatever phase the
/// stream ended in.
#[derive(Debug)]
pub struct WorkGuard {
    counters: Arc<DispatchCounters>,
    tokens: u64,
    ahead: u64,
    dispatched_at: Instant,
    phase: Phase,
}

impl WorkGuard {
    /// Counts `prefill_tokens` (the request's predicted uncached prompt tokens) against the
    /// endpoint until [`Self::first_token`] or drop.
    pub fn dispatch(counters: &Arc<DispatchCounters>, prefill_tokens: u64, now: Instant) -> Self {
        let w = &counters.work;
        let view = w.view(now);
        let ahead =
            view.remaining_prefill(view.prefill_rate.unwrap_or(DEFAULT_PREFILL_TOKENS_PER_S));
        if w.prefill_tokens
            .fetch_add(prefill_tokens, Ordering::Relaxed)
            == 0
        {
            // The queue was empty: the endpoint starts on this request now.
            w.drain_start_ns
                .store(nanos_since_epoch(now), Ordering::Relaxed);
        }
        w.prefilling.fetch_add(1, Ordering::Relaxed);
        WorkGuard {
            counters: counters.clone(),
            tokens: prefill_tokens,
            ahead,
            dispatched_at: now,
            phase: Phase::Prefill,
        }
    }

    /// The first response bytes arrived: the prompt is prefilled. Learns the endpoint's rate
    /// from the work that was ahead plus this request's own. Idempotent.
    pub fn first_token(&mut self, now: Instant) {
        if self.phase != Phase::Prefill {
            return;
        }
        self.release_prefill();
        // What is still pending started (at the latest) when this prefill finished.
        self.counters
            .work
            .drain_start_ns
            .store(nanos_since_epoch(now), Ordering::Relaxed);
        self.counters.work.decoding.fetch_add(1, Ordering::Relaxed);
        self.phase = Phase::Decode;
        let work = self.ahead.saturating_add(self.tokens);
        let elapsed = now
            .saturating_duration_since(self.dispatched_at)
            .as_secs_f64();
        if work >= MIN_LEARN_TOKENS && elapsed >= MIN_LEARN_SECONDS {
            self.counters.work.learn_rate(work as f64 / elapsed);
        }
    }

    fn release_prefill(&self) {
        let w = &self.counters.work;
        sub(&w.prefill_tokens, self.tokens);
        let _ = w
            .prefilling
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

fn sub(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        match self.phase {
            Phase::Prefill => self.release_prefill(),
            Phase::Decode => {
                let _ = self.counters.work.decoding.fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |n| n.checked_sub(1),
                );
            }
            Phase::Done => {}
        }
        self.phase = Phase::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn prefill_then_decode_then_released() {
        let d = Arc::new(DispatchCounters::default());
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut a = WorkGuard::dispatch(&d, 1000, t0);
        let b = WorkGuard::dispatch(&d, 3000, t0);
        assert_eq!(
            d.work.view(t0),
            WorkView {
                prefill_tokens: 4000,
                prefilling: 2,
                decoding: 0,
                prefill_rate: None,
                draining_s: 0.0,
            }
        );
        // 0.25 s in, at 4000 tokens/s, 1000 of the 4000 are done.
        assert_eq!(d.work.view(ms(250)).remaining_prefill(4000.0), 3000);
        // a's 1000 tokens (nothing ahead) took 0.5 s: 2000 tokens/s; idempotent.
        a.first_token(ms(500));
        a.first_token(ms(900));
        let v = d.work.view(ms(500));
        assert_eq!((v.prefill_tokens, v.prefilling, v.decoding), (3000, 1, 1));
        assert_eq!(v.prefill_rate, Some(2000.0));
        // The drain clock restarted at a's first token: b has had 0.5 s more at 2000/s.
        assert_eq!(d.work.view(ms(1000)).remaining_prefill(2000.0), 2000);
        assert_eq!(d.work.view(ms(9000)).remaining_prefill(2000.0), 0);
        drop(b);
        drop(a);
        assert_eq!(
            d.work.view(ms(1000)),
            WorkView {
                prefill_rate: Some(2000.0),
                ..WorkView::default()
            }
        );
    }

    #[test]
    fn rate_counts_the_work_ahead_and_averages() {
        let d = Arc::new(DispatchCounters::default());
        let t0 = Instant::now();
        let _a = WorkGuard::dispatch(&d, 3000, t0);
        // Dispatched at once: all of a's 3000 tokens are still ahead of b.
        let mut b = WorkGuard::dispatch(&d, 1000, t0);
        // b waited for a's 3000 tokens and its own 1000: 4000 tokens in 1 s.
        b.first_token(t0 + Duration::from_secs(1));
        assert_eq!(d.work.view(t0).prefill_rate, Some(4000.0));
        // A second sample of 1000 tokens/s moves the average by a fifth of the gap.
        let mut c = WorkGuard::dispatch(&d, 0, t0);
        d.work.learn_rate(1000.0);
        assert_eq!(d.work.view(t0).prefill_rate, Some(3400.0));
        // Small samples (mostly step overhead) and nonsense teach nothing.
        let mut small = WorkGuard::dispatch(&Arc::new(DispatchCounters::default()), 100, t0);
        small.first_token(t0 + Duration::from_secs(10));
        d.work.learn_rate(f64::NAN);
        d.work.learn_rate(0.0);
        assert_eq!(d.work.view(t0).prefill_rate, Some(3400.0));
        c.first_token(t0);
    }
}
