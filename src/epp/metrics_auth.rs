//! Protects the EPP's `/metrics` the way the reference does (controller-runtime's
//! `WithAuthenticationAndAuthorization` filter): the bearer token is checked with a TokenReview,
//! then the user it names must be allowed `get` on the non-resource URL `/metrics` by a
//! SubjectAccessReview. Decisions are cached briefly in a bounded map so a scraper polling every
//! few seconds costs two API calls per cache period, not per scrape.

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

/// Cache sizing and lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthCacheConfig {
    /// Most tokens remembered; at the cap expired entries go first, then the oldest.
    pub capacity: usize,
    /// How long an allowed token stays allowed without asking again.
    pub allow_ttl: Duration,
    /// How long a refused token stays refused without asking again.
    pub deny_ttl: Duration,
}

impl Default for AuthCacheConfig {
    fn default() -> Self {
        AuthCacheConfig {
            capacity: 1024,
            allow_ttl: Duration::from_secs(60),
            deny_ttl: Duration::from_secs(10),
        }
    }
}

struct Cached {
    decision: Result<(), MetricsAuthError>,
    expires: Instant,
}

/// TokenReview + SubjectAccessReview authoriser for `/metrics`.
pub struct MetricsAuth {
    client: kube::Client,
    config: AuthCacheConfig,
    /// Keyed by the token itself: a hash would let a collision borrow another caller's decision.
    cache: Mutex<HashMap<String, Cached>>,
}

impl MetricsAuth {
    pub fn new(client: kube::Client) -> Self {
        Self::with_cache(client, AuthCacheConfig::default())
    }

    pub fn with_cache(client: kube::Client, config: AuthCacheConfig) -> Self {
        MetricsAuth {
            client,
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Checks the `Authorization` header of a `/metrics` request.
    pub async fn authorize(
        &self,
        authorization_header: Option<&str>,
    ) -> Result<(), MetricsAuthError> {
        let token = bearer_token(authorization_header).ok_or(MetricsAuthError::MissingToken)?;
        let now = Instant::now();
        if let Some(hit) = self.cache.lock().get(token).filter(|c| c.expires > now) {
            tracing::trace!("metrics auth decision from cache");
            return hit.decision.clone();
        }
        let decision = self.review(token).await;
        if decision
            .as_ref()
            .err()
            .is_none_or(MetricsAuthError::is_decision)
        {
            let ttl = if decision.is_ok() {
                self.config.allow_ttl
            } else {
                self.config.deny_ttl
            };
            self.remember(token, decision.clone(), now + ttl);
        }
        if let Err(e) = &decision {
            tracing::debug!(error = %e, "metrics request refused");
        }
        decision
    }

    /// Number of cached decisions (for tests and diagnostics).
    pub fn cached(&self) -> usize {
        self.cache.lock().len()
    }

    fn remember(&self, token: &str, decision: Result<(), MetricsAuthError>, expires: Instant) {
        if self.config.capacity == 0 {
            return;
        }
        let mut cache = self.cache.lock();
        if cache.len() >= self.config.capacity && !cache.contains_key(token) {
            let now = Instant::now();
            cache.retain(|_, c| c.expires > now);
            // O(capacity) only when the cache is full of live entries.
            if cache.len() >= self.config.capacity {
                let oldest = cache
                    .iter()
                    .min_by_key(|(_, c)| c.expires)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(token.to_string(), Cached { decision, expires });
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
fn bearer_token(header: Option<&str>) -> Option<&str> {
    let header = header?.trim();
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
