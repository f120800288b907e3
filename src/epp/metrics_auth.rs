//! Protects the EPP's `/metrics` the way the reference does (controller-runtime's
//! `WithAuthenticationAndAuthorization` filter): the bearer token is checked with a TokenReview,
//! then the user it names must be allowed `get` on the non-resource URL `/metrics` by a
//! SubjectAccessReview.
//!
//! Hardening (docs/security.md): decisions are cached under the SHA-256 digest of the token,
//! never the token itself, in two bounded maps — allowed and refused — so a flood of bad tokens
//! only ever evicts other refusals and the real scraper's entry stays. Reviews of tokens with no
//! live decision go through a token-bucket rate limit (a flood costs the API server at most
//! `review_burst` + `reviews_per_second` × seconds reviews, and the flooder gets 429s); a token
//! that was allowed before is re-reviewed at expiry without waiting for the bucket. Tokens longer
//! than [`MAX_TOKEN_BYTES`] are refused without a review.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use parking_lot::Mutex;

/// The path and verb authorised, as the reference's metrics filter asks for a GET of `/metrics`.
pub const METRICS_PATH: &str = "/metrics";
pub const METRICS_VERB: &str = "get";

/// Longest bearer token sent for review (Kubernetes service-account tokens are 1–2 KB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a scrape was refused; [`MetricsAuthError::status`] gives the HTTP status to answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MetricsAuthError {
    #[error("missing bearer token")]
    MissingToken,
    #[error("invalid bearer token: {reason}")]
    Unauthenticated { reason: String },
    #[error("user {user:?} is not allowed to {METRICS_VERB} {METRICS_PATH}: {reason}")]
    Forbidden { user: String, reason: String },
    #[error("token review failed: {0}")]
    TokenReview(String),
    #[error("subject access review failed: {0}")]
    AccessReview(String),
    #[error("too many token reviews; retry later")]
    RateLimited,
}

impl MetricsAuthError {
    /// 401 when the caller is not authenticated (including a failed TokenReview, as the
    /// reference), 403 when it is not allowed, 500 when the access review itself failed.
    pub fn status(&self) -> http::StatusCode {
        match self {
            MetricsAuthError::MissingToken
            | MetricsAuthError::Unauthenticated { .. }
            | MetricsAuthError::TokenReview(_) => http::StatusCode::UNAUTHORIZED,
            MetricsAuthError::Forbidden { .. } => http::StatusCode::FORBIDDEN,
            MetricsAuthError::AccessReview(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
            MetricsAuthError::RateLimited => http::StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Only real decisions are cached; API failures are retried on the next scrape.
    fn is_decision(&self) -> bool {
        matches!(
            self,
            MetricsAuthError::Unauthenticated { .. } | MetricsAuthError::Forbidden { .. }
        )
    }
}

/// Cache sizing, lifetimes and the review rate limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuthCacheConfig {
    /// Most allowed tokens remembered; at the cap expired entries go first, then the oldest.
    pub capacity: usize,
    /// Most refused tokens remembered (a separate map: refusals never evict an allowed token).
    pub deny_capacity: usize,
    /// How long an allowed token stays allowed without asking again.
    pub allow_ttl: Duration,
    /// How long a refused token stays refused without asking again.
    pub deny_ttl: Duration,
    /// Sustained rate of reviews for tokens with no live cached decision (`--metrics-auth-reviews-per-second`).
    pub reviews_per_second: f64,
    /// Reviews allowed in a burst above that rate.
    pub review_burst: u32,
}

impl Default for AuthCacheConfig {
    fn default() -> Self {
        AuthCacheConfig {
            capacity: 1024,
            deny_capacity: 1024,
            allow_ttl: Duration::from_secs(60),
            deny_ttl: Duration::from_secs(10),
            reviews_per_second: 5.0,
            review_burst: 10,
        }
    }
}

/// SHA-256 of the token: the cache key (a collision is not a practical concern, and the map
/// holds 32 bytes per token however long the token was).
pub type TokenDigest = [u8; 32];

/// The cache key of a token (public for the fuzz target).
pub fn digest(token: &str) -> TokenDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

struct Cached<T> {
    value: T,
    expires: Instant,
}

/// A bounded map of decisions; at the cap expired entries go first, then the soonest to expire.
struct DecisionMap<T> {
    capacity: usize,
    entries: HashMap<TokenDigest, Cached<T>>,
}

impl<T> DecisionMap<T> {
    fn new(capacity: usize) -> Self {
        DecisionMap {
            capacity,
            entries: HashMap::new(),
        }
    }

    fn insert(&mut self, key: TokenDigest, value: T, expires: Instant, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, c| c.expires > now);
            // O(capacity) only when the map is full of live entries.
            if self.entries.len() >= self.capacity {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, c)| c.expires)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.entries.remove(&k);
                }
            }
        }
        self.entries.insert(key, Cached { value, expires });
    }
}

/// Token bucket for reviews of unknown tokens.
struct Bucket {
    tokens: f64,
    last: Instant,
}

struct Caches {
    /// Allowed tokens; kept past expiry (until evicted) so that their re-review skips the rate
    /// limit.
    allowed: DecisionMap<()>,
    denied: DecisionMap<MetricsAuthError>,
    bucket: Bucket,
}

/// TokenReview + SubjectAccessReview authoriser for `/metrics`.
pub struct MetricsAuth {
    client: kube::Client,
    config: AuthCacheConfig,
    caches: Mutex<Caches>,
    reviews: std::sync::atomic::AtomicU64,
}

/// What the cache says about a token.
enum Lookup {
    Hit(Result<(), MetricsAuthError>),
    /// Allowed before (expired): review now, whatever the bucket holds.
    Known,
    /// Never seen, or its refusal expired: review if the bucket allows.
    Unknown,
}

impl MetricsAuth {
    pub fn new(client: kube::Client) -> Self {
        Self::with_cache(client, AuthCacheConfig::default())
    }

    pub fn with_cache(client: kube::Client, config: AuthCacheConfig) -> Self {
        MetricsAuth {
            client,
            config,
            caches: Mutex::new(Caches {
                allowed: DecisionMap::new(config.capacity),
                denied: DecisionMap::new(config.deny_capacity),
                bucket: Bucket {
                    tokens: f64::from(config.review_burst),
                    last: Instant::now(),
                },
            }),
            reviews: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Checks the `Authorization` header of a `/metrics` request.
    pub async fn authorize(
        &self,
        authorization_header: Option<&str>,
    ) -> Result<(), MetricsAuthError> {
        let token = bearer_token(authorization_header).ok_or(MetricsAuthError::MissingToken)?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(MetricsAuthError::Unauthenticated {
                reason: format!("token longer than {MAX_TOKEN_BYTES} bytes"),
            });
        }
        let key = digest(token);
        let now = Instant::now();
        match self.lookup(&key, now) {
            Lookup::Hit(decision) => {
                tracing::trace!("metrics auth decision from cache");
                return decision;
            }
            Lookup::Known => {}
            Lookup::Unknown => {
                if !self.take_review_token(now) {
                    tracing::debug!("metrics auth review rate limit reached; refused with 429");
                    return Err(MetricsAuthError::RateLimited);
                }
            }
        }
        self.reviews
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let decision = self.review(token).await;
        let now = Instant::now();
        match &decision {
            Ok(()) => {
                let mut caches = self.caches.lock();
                caches.denied.entries.remove(&key);
                caches
                    .allowed
                    .insert(key, (), now + self.config.allow_ttl, now);
            }
            // Only real decisions are cached; API failures are retried on the next scrape.
            Err(e) if e.is_decision() => {
                let mut caches = self.caches.lock();
                caches.allowed.entries.remove(&key);
                caches
                    .denied
                    .insert(key, e.clone(), now + self.config.deny_ttl, now);
            }
            Err(_) => {}
        }
        if let Err(e) = &decision {
            tracing::debug!(error = %e, "metrics request refused");
        }
        decision
    }

    fn lookup(&self, key: &TokenDigest, now: Instant) -> Lookup {
        let caches = self.caches.lock();
        if let Some(c) = caches.allowed.entries.get(key) {
            return if c.expires > now {
                Lookup::Hit(Ok(()))
            } else {
                Lookup::Known
            };
        }
        match caches.denied.entries.get(key) {
            Some(c) if c.expires > now => Lookup::Hit(Err(c.value.clone())),
            _ => Lookup::Unknown,
        }
    }

    fn take_review_token(&self, now: Instant) -> bool {
        let mut caches = self.caches.lock();
        let burst = f64::from(self.config.review_burst);
        let b = &mut caches.bucket;
        let refill =
            now.saturating_duration_since(b.last).as_secs_f64() * self.config.reviews_per_second;
        b.tokens = (b.tokens + refill).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Number of cached decisions, allowed and refused (for tests and diagnostics).
    pub fn cached(&self) -> usize {
        let caches = self.caches.lock();
        caches.allowed.entries.len() + caches.denied.entries.len()
    }

    /// TokenReviews sent so far (for tests and diagnostics).
    pub fn reviews(&self) -> u64 {
        self.reviews.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn review(&self, token: &str) -> Result<(), MetricsAuthError> {
        let user = self.authenticate(token).await?;
        self.check_access(user).await
    }

    async fn authenticate(&self, token: &str) -> Result<UserInfo, MetricsAuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reply = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| MetricsAuthError::TokenReview(e.to_string()))?;
        let status = reply.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(MetricsAuthError::Unauthenticated {
                reason: status
                    .error
                    .unwrap_or_else(|| "token not authenticated".to_string()),
            });
        }
        status
            .user
            .ok_or_else(|| MetricsAuthError::Unauthenticated {
                reason: "token review returned no user".to_string(),
            })
    }

    async fn check_access(&self, user: UserInfo) -> Result<(), MetricsAuthError> {
        let username = user.username.clone().unwrap_or_default();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(METRICS_PATH.to_string()),
                    verb: Some(METRICS_VERB.to_string()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let reply = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| MetricsAuthError::AccessReview(e.to_string()))?;
        let status = reply.status.unwrap_or_default();
        if status.allowed && status.denied != Some(true) {
            Ok(())
        } else {
            Err(MetricsAuthError::Forbidden {
                user: username,
                reason: status.reason.unwrap_or_default(),
            })
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(header: Option<&str>) -> Option<&str> {
    let header = header?.trim();
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_map_stays_bounded_and_evicts_the_soonest_to_expire() {
        let now = Instant::now();
        let mut m = DecisionMap::new(2);
        m.insert(digest("a"), (), now + Duration::from_secs(30), now);
        m.insert(digest("b"), (), now + Duration::from_secs(10), now);
        m.insert(digest("c"), (), now + Duration::from_secs(20), now);
        assert_eq!(m.entries.len(), 2);
        assert!(m.entries.contains_key(&digest("a")) && m.entries.contains_key(&digest("c")));
        // Expired entries go first.
        let later = now + Duration::from_secs(25);
        m.insert(digest("d"), (), later + Duration::from_secs(1), later);
        assert!(m.entries.contains_key(&digest("a")) && m.entries.contains_key(&digest("d")));
        assert_eq!(m.entries.len(), 2);
    }

    #[test]
    fn digest_is_sha256() {
        // sha256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(digest("abc")[..4], [0xba, 0x78, 0x16, 0xbf]);
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some("bearer   abc ")), Some("abc"));
        assert_eq!(bearer_token(Some("Basic abc")), None);
        assert_eq!(bearer_token(Some("Bearer ")), None);
        assert_eq!(bearer_token(Some("abc")), None);
        assert_eq!(bearer_token(None), None);
    }

    #[test]
    fn statuses() {
        assert_eq!(MetricsAuthError::MissingToken.status(), 401);
        assert_eq!(
            MetricsAuthError::Unauthenticated {
                reason: String::new()
            }
            .status(),
            401
        );
        assert_eq!(MetricsAuthError::TokenReview(String::new()).status(), 401);
        assert_eq!(
            MetricsAuthError::Forbidden {
                user: String::new(),
                reason: String::new()
            }
            .status(),
            403
        );
        assert_eq!(MetricsAuthError::AccessReview(String::new()).status(), 500);
        assert_eq!(MetricsAuthError::RateLimited.status(), 429);
    }
}
