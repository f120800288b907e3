//! Scheduling plugin traits (`Filter`, `Scorer`, `Picker`, `ProfileHandler`) and the per-cycle
//! state they share; one file per plugin family below.
//!
//! Contracts: plugins are stateless across requests except for shared, internally synchronised
//! structures (the prefix index). Scorers write one score per endpoint into a caller-provided
//! slice indexed like the endpoint slice; the scheduler clamps scores to [0, 1] and weights them.

use std::fmt;
use std::sync::Arc;

use rand::RngCore;

use super::SchedulingRequest;
use crate::epp::endpoint::EndpointSnapshot;

pub mod conformance;
pub mod freshness;
pub mod load;
pub mod pickers;
pub mod predicted_ttft;
pub mod prefix_affinity;
pub mod profile;
pub mod scorers;
pub mod scratch;
pub mod session_affinity;

pub use scratch::{RequestScratch, ScratchOwner};

/// What every plugin has: its config `type` and its instance name (used in logs and metrics).
pub trait Plugin: Send + Sync + fmt::Debug {
    fn plugin_type(&self) -> &'static str;
    fn name(&self) -> &str;
}

/// What the scorers of one profile see for one request: the request and the data prepared for
/// it before scoring (the reference's PrepareData step). Read-only: a score is a pure function
/// of (request, endpoints, this); what was routed is recorded by the director afterwards.
#[derive(Debug, Clone, Copy)]
pub struct CycleState<'a> {
    pub request: &'a SchedulingRequest<'a>,
    /// The request's chained prefix-block hashes (empty without a prefix plugin, or when the
    /// prompt is shorter than one block). Computed once per request.
    pub prefix_hashes: &'a [u64],
    /// Block size (tokens) the hashes were computed with.
    pub prefix_block_tokens: usize,
    /// Matched prefix blocks per endpoint of the slice being scored, looked up in the prefix
    /// index when a scorer of the profile [asks for them](Scorer::uses_prefix_matches); else
    /// empty.
    pub prefix_matches: &'a [usize],
    /// Values plugins derived from this request earlier in the decision (see [`scratch`]).
    pub scratch: &'a RequestScratch,
}

/// Removes endpoints that must not serve the request. Runs in profile order; a filter that
/// leaves no endpoint fails the profile.
pub trait Filter: Plugin {
    fn filter(&self, request: &SchedulingRequest<'_>, endpoints: &mut Vec<Arc<EndpointSnapshot>>);

    /// Whether this filter reads prefix matches (then [`Filter::filter_with_prefix`] is called
    /// instead of `filter` when a prefix index exists).
    fn uses_prefix_matches(&self) -> bool {
        false
    }

    /// `filter` with `matches[i]`, the matched prefix blocks of `endpoints[i]`, and the
    /// request's block count.
    fn filter_with_prefix(
        &self,
        request: &SchedulingRequest<'_>,
        endpoints: &mut Vec<Arc<EndpointSnapshot>>,
        _matches: &[usize],
        _total_blocks: usize,
    ) {
        self.filter(request, endpoints);
    }
}

/// Scores each endpoint; `out[i]` is the score of `endpoints[i]` (expected in 0..=1; values
/// outside are clamped by the caller). `out.len() == endpoints.len()`; every element must be set.
pub trait Scorer: Plugin {
    fn score(&self, cycle: &CycleState<'_>, endpoints: &[Arc<EndpointSnapshot>], out: &mut [f64]);

    /// Whether this scorer reads [`CycleState::prefix_matches`] (the lookup is skipped for
    /// profiles where no scorer does).
    fn uses_prefix_matches(&self) -> bool {
        false
    }

    /// The cached prompt tokens this scorer's index expects `endpoint` to report for `request`
    /// (`usage.prompt_tokens_details.cached_tokens`), or `None` for no prediction. Asked once
    /// per routed request, for the primary, after [`Scorer::score`] ran for the same request
    /// (what `score` stored in `scratch` is still there).
    fn predicted_cached_tokens(
        &self,
        _request: &SchedulingRequest<'_>,
        _endpoint: &Arc<EndpointSnapshot>,
        _scratch: &RequestScratch,
    ) -> Option<u64> {
        None
    }
}

/// An endpoint's position in the profile's endpoint list and its weighted score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub index: usize,
    pub score: f64,
}

/// Chooses endpoints: reorders `scored` so the picked ones come first, best first, and returns
/// how many were picked (at least 1 when `scored` is non-empty, at most its length).
pub trait Picker: Plugin {
    fn pick(&self, scored: &mut [Scored], rng: &mut dyn RngCore) -> usize;
}

/// Outcome of running one profile, as seen by the profile handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileOutcome {
    NotRun,
    Failed,
    Picked,
}

/// Decides which profiles run and which result is primary.
pub trait ProfileHandler: Plugin {
    /// Appends to `next` the indices of the profiles to run now, given `outcomes` so far
    /// (one per profile); appending nothing ends the cycle.
    fn pick_profiles(&self, outcomes: &[ProfileOutcome], next: &mut Vec<usize>);
    /// Returns the index of the primary profile, or the error the request fails with.
    fn process_results(
        &self,
        profile_names: &[String],
        outcomes: &[ProfileOutcome],
    ) -> Result<usize, super::ScheduleError>;
}

/// Runs after a decision (the reference's PreRequest and ResponseHeader extension points):
/// `pre_request` learns where the request went, `response_headers` appends headers to set on
/// the response the client gets. Both see the primary endpoint; `pre_request` also sees what
/// the plugins stored for the request while deciding. Must not block.
pub trait RequestHook: Plugin {
    fn pre_request(
        &self,
        _request: &SchedulingRequest<'_>,
        _primary: &EndpointSnapshot,
        _scratch: &RequestScratch,
    ) {
    }
    fn response_headers(
        &self,
        _request: &SchedulingRequest<'_>,
        _primary: &EndpointSnapshot,
        _out: &mut Vec<(String, String)>,
    ) {
    }
}
