//! Latency statistics: percentiles over samples and the per-run summary a routing policy gets.

use serde::Serialize;

/// The `q`-th percentile (0 ≤ q ≤ 100) of ascending `sorted` samples, interpolating linearly
/// between the two closest ranks (numpy's default, so numbers compare with Python tooling).
/// `None` for no samples or a `q` outside [0, 100].
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&q) {
        return None;
    }
    let rank = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let (a, b) = (*sorted.get(lo)?, *sorted.get(hi)?);
    Some(a + (b - a) * (rank - lo as f64))
}

/// Sorts `values` ascending (NaNs last) so [`percentile`] can read them.
pub fn sort(values: &mut [f64]) {
    values.sort_by(|a, b| a.total_cmp(b));
}

/// p50/p90/p95/p99 of one metric, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Quantiles {
    /// Quantiles of `values` (unsorted, any order); zeros when there are none.
    pub fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        sort(&mut v);
        Quantiles {
            p50: percentile(&v, 50.0).unwrap_or(0.0),
            p90: percentile(&v, 90.0).unwrap_or(0.0),
            p95: percentile(&v, 95.0).unwrap_or(0.0),
            p99: percentile(&v, 99.0).unwrap_or(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_between_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        // rank 0.9 * 3 = 2.7 → 3 + 0.7
        assert!((percentile(&v, 90.0).unwrap() - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }

    #[test]
    fn percentile_rejects_empty_and_out_of_range() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0], -1.0), None);
        assert_eq!(percentile(&[1.0], 100.5), None);
        assert_eq!(percentile(&[1.0], f64::NAN), None);
    }

    #[test]
    fn quantiles_sort_their_input() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let q = Quantiles::of(&v);
        assert!((q.p50 - 50.5).abs() < 1e-9);
        assert!((q.p90 - 90.1).abs() < 1e-9);
        assert!((q.p99 - 99.01).abs() < 1e-9);
        assert_eq!(Quantiles::of(&[]), Quantiles::default());
    }
}
