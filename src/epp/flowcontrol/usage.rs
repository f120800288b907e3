//! Usage-limit policies: how full the pool may be before a priority band stops dispatching
//! (llm-d-router `flowControl.usageLimitPolicyPluginRef`).
//!
//! - `static-usage-limit-policy` (the reference default): every band dispatches while some
//!   endpoint's saturation score is below 1.0.
//! - `priority-holdback-policy`: each active priority gets its own ceiling, linear from
//!   `maxCeiling` (highest priority) down to `minCeiling` (lowest), so lower bands stop
//!   dispatching earlier and leave headroom on every endpoint for higher ones. Nothing already
//!   running is touched; a held request only waits longer in the queue.
//!
//! Ceilings never increase as priority decreases, so once the highest waiting band is held
//! back every lower band is too: the dispatcher can stop at the first band that has no room.

use std::collections::BTreeSet;

/// How priorities map onto positions between the ceilings (upstream `domain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HoldbackDomain {
    /// Equal steps by rank among the active priorities, whatever their values.
    #[default]
    Rank,
    /// Proportional to the priority value within the active range.
    Value,
}

impl HoldbackDomain {
    pub fn name(self) -> &'static str {
        match self {
            HoldbackDomain::Rank => "rank",
            HoldbackDomain::Value => "value",
        }
    }
}

/// Validated `priority-holdback-policy` parameters: `0 ≤ min_ceiling < 1`,
/// `0 < max_ceiling ≤ 1`, `min_ceiling ≤ max_ceiling` (checked by `epp::config`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HoldbackParams {
    pub domain: HoldbackDomain,
    pub min_ceiling: f64,
    pub max_ceiling: f64,
}

/// The usage-limit policy in force.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum UsageLimit {
    /// One ceiling, 1.0, for every priority.
    #[default]
    Static,
    PriorityHoldback(HoldbackParams),
}

impl UsageLimit {
    /// The saturation below which `priority` may dispatch, given the active priorities. A
    /// priority that is not active itself is placed among them as if it were.
    pub fn ceiling(&self, priority: i32, active: &BTreeSet<i32>) -> f64 {
        let p = match self {
            UsageLimit::Static => return 1.0,
            UsageLimit::PriorityHoldback(p) => p,
        };
        let span = p.max_ceiling - p.min_ceiling;
        // With one active priority there is nothing to hold back for.
        let (Some(&low), Some(&high)) = (active.first(), active.last()) else {
            return p.max_ceiling;
        };
        let (low, high) = (low.min(priority), high.max(priority));
        if low == high {
            return p.max_ceiling;
        }
        let position = match p.domain {
            HoldbackDomain::Value => {
                (f64::from(priority) - f64::from(low)) / (f64::from(high) - f64::from(low))
            }
            HoldbackDomain::Rank => {
                let n = active.len() + usize::from(!active.contains(&priority));
                // Rank from the top: 0 for the highest priority.
                let above = active.range(priority.saturating_add(1)..).count();
                1.0 - above as f64 / (n - 1) as f64
            }
        };
        p.min_ceiling + position * span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holdback(domain: HoldbackDomain, min: f64, max: f64) -> UsageLimit {
        UsageLimit::PriorityHoldback(HoldbackParams {
            domain,
            min_ceiling: min,
            max_ceiling: max,
        })
    }

    #[test]
    fn static_policy_is_one_for_every_priority() {
        let active = BTreeSet::from([-10, 0, 5]);
        for p in [-10, 0, 5, 99] {
            assert_eq!(UsageLimit::Static.ceiling(p, &active), 1.0);
        }
    }

    #[test]
    fn rank_domain_steps_evenly_from_max_to_min() {
        let policy = holdback(HoldbackDomain::Rank, 0.5, 1.0);
        let active = BTreeSet::from([-10, -1, 0, 100]);
        // Four ranks: 1.0, 0.5 + 2/3 · 0.5, 0.5 + 1/3 · 0.5, 0.5.
        let want = [(100, 1.0), (0, 5.0 / 6.0), (-1, 2.0 / 3.0), (-10, 0.5)];
        for (p, c) in want {
            assert!((policy.ceiling(p, &active) - c).abs() < 1e-12, "{p}");
        }
    }

    #[test]
    fn value_domain_scales_with_the_priority_value() {
        let policy = holdback(HoldbackDomain::Value, 0.2, 0.9);
        let active = BTreeSet::from([-10, 0, 10]);
        assert!((policy.ceiling(10, &active) - 0.9).abs() < 1e-12);
        assert_eq!(policy.ceiling(-10, &active), 0.2);
        // Halfway in value: halfway between the ceilings.
        assert!((policy.ceiling(0, &active) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn a_single_or_no_active_priority_gets_the_max_ceiling() {
        let policy = holdback(HoldbackDomain::Rank, 0.25, 0.75);
        assert_eq!(policy.ceiling(-1, &BTreeSet::new()), 0.75);
        assert_eq!(policy.ceiling(-1, &BTreeSet::from([-1])), 0.75);
    }

    #[test]
    fn an_inactive_priority_is_ranked_among_the_active_ones() {
        let policy = holdback(HoldbackDomain::Rank, 0.5, 1.0);
        // -1 joins {1}: two ranks, -1 is the lower.
        assert_eq!(policy.ceiling(-1, &BTreeSet::from([1])), 0.5);
        assert_eq!(policy.ceiling(2, &BTreeSet::from([1])), 1.0);
    }

    #[test]
    fn ceilings_never_rise_as_priority_falls() {
        for domain in [HoldbackDomain::Rank, HoldbackDomain::Value] {
            let policy = holdback(domain, 0.1, 0.95);
            let active = BTreeSet::from([-7, -3, 0, 2, 40]);
            let ceilings: Vec<f64> = active
                .iter()
                .rev()
                .map(|&p| policy.ceiling(p, &active))
                .collect();
            assert!(ceilings.windows(2).all(|w| w[0] >= w[1]), "{ceilings:?}");
        }
    }
}
