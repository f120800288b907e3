//! `/metrics` authorisation by TokenReview + SubjectAccessReview against the fake API server
//! (tests/fake_apiserver; no real API server can be installed on these machines): missing and bad
//! tokens are 401, an authenticated but unauthorised service account is 403, a metrics reader is
//! let in, and decisions are cached within bounds.

mod fake_apiserver;

use std::time::Duration;

use fake_apiserver::FakeApiServer;
use switchyard::epp::metrics_auth::{AuthCacheConfig, MetricsAuth, MetricsAuthError};

const TOKEN_REVIEWS: &str = "create authentication.k8s.io/tokenreviews";
const ACCESS_REVIEWS: &str = "create authorization.k8s.io/subjectaccessreviews";
const READER: &str = "system:serviceaccount:default:inference-gateway-sa-metrics-reader";

async fn fake() -> FakeApiServer {
    let fake = FakeApiServer::start().await;
    fake.add_token("reader-token", READER, &["system:serviceaccounts"]);
    fake.add_token(
        "app-token",
        "system:serviceaccount:default:app",
        &["system:serviceaccounts"],
    );
    fake.allow_metrics(READER);
    fake
}

#[tokio::test]
async fn rejects_bad_tokens_and_unauthorised_users() {
    let fake = fake().await;
    let auth = MetricsAuth::new(fake.client());

    let missing = auth.authorize(None).await.unwrap_err();
    assert_eq!(missing, MetricsAuthError::MissingToken);
    assert_eq!(missing.status(), 401);
    assert_eq!(
        auth.authorize(Some("Basic cmVhZGVy"))
            .await
            .unwrap_err()
            .status(),
        401
    );

    let bad = auth
        .authorize(Some("Bearer not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(
        bad,
        MetricsAuthError::Unauthenticated {
            reason: "invalid bearer token".into()
        }
    );
    assert_eq!(bad.status(), 401);

    let forbidden = auth.authorize(Some("Bearer app-token")).await.unwrap_err();
    assert_eq!(
        forbidden,
        MetricsAuthError::Forbidden {
            user: "system:serviceaccount:default:app".into(),
            reason: String::new()
        }
    );
    assert_eq!(forbidden.status(), 403);

    auth.authorize(Some("Bearer reader-token")).await.unwrap();
    // Missing and malformed headers never reach the API server; the others took one review each,
    // and only authenticated users were access-reviewed.
    assert_eq!(fake.requests(TOKEN_REVIEWS), 3);
    assert_eq!(fake.requests(ACCESS_REVIEWS), 2);
}

#[tokio::test]
async fn caches_decisions_briefly_and_within_capacity() {
    let fake = fake().await;
    let config = AuthCacheConfig {
        capacity: 2,
        deny_capacity: 1,
        allow_ttl: Duration::from_millis(300),
        deny_ttl: Duration::from_millis(300),
        ..AuthCacheConfig::default()
    };
    let auth = MetricsAuth::with_cache(fake.client(), config);

    for _ in 0..5 {
        auth.authorize(Some("Bearer reader-token")).await.unwrap();
        assert_eq!(
            auth.authorize(Some("Bearer bogus"))
                .await
                .unwrap_err()
                .status(),
            401
        );
    }
    assert_eq!(
        fake.requests(TOKEN_REVIEWS),
        2,
        "one review per token while cached"
    );
    assert_eq!(auth.cached(), 2);

    // A second refusal at the refusal cap evicts the first refusal, never the allowed token.
    assert_eq!(
        auth.authorize(Some("Bearer app-token"))
            .await
            .unwrap_err()
            .status(),
        403
    );
    assert_eq!(auth.cached(), 2);
    auth.authorize(Some("Bearer reader-token")).await.unwrap();
    assert_eq!(fake.requests(TOKEN_REVIEWS), 3, "reader still cached");

    // After the TTL the token is reviewed again (revocation takes effect).
    tokio::time::sleep(Duration::from_millis(400)).await;
    auth.authorize(Some("Bearer reader-token")).await.unwrap();
    assert_eq!(fake.requests(TOKEN_REVIEWS), 4);
}

/// Issue 11 item 7: a flood of distinct bad tokens (each one a TokenReview before) is rate
/// limited, cached by digest within its own bound, and cannot evict or starve the real scraper.
#[tokio::test]
async fn token_flood_is_rate_limited_and_cannot_evict_the_scraper() {
    let fake = fake().await;
    let config = AuthCacheConfig {
        capacity: 4,
        deny_capacity: 4,
        allow_ttl: Duration::from_millis(600),
        deny_ttl: Duration::from_secs(60),
        reviews_per_second: 2.0,
        review_burst: 4,
    };
    let auth = std::sync::Arc::new(MetricsAuth::with_cache(fake.client(), config));
    auth.authorize(Some("Bearer reader-token")).await.unwrap();
    assert_eq!(fake.requests(TOKEN_REVIEWS), 1);

    // 200 distinct bad tokens, 8 KB each, from 8 concurrent attackers.
    let start = std::time::Instant::now();
    let mut attackers = Vec::new();
    for a in 0..8 {
        let auth = auth.clone();
        attackers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..25 {
                let token = format!("Bearer {a}-{i}-{}", "z".repeat(8 << 10));
                statuses.push(
                    auth.authorize(Some(&token))
                        .await
                        .unwrap_err()
                        .status()
                        .as_u16(),
                );
            }
            statuses
        }));
    }
    // The scraper, meanwhile, is answered from the cache at once.
    for _ in 0..20 {
        let t = std::time::Instant::now();
        auth.authorize(Some("Bearer reader-token")).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "scraper waited {:?}",
            t.elapsed()
        );
        tokio::task::yield_now().await;
    }
    let mut statuses = Vec::new();
    for a in attackers {
        statuses.extend(a.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let reviewed = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(reviewed + limited, 200, "{statuses:?}");
    // Burst of 4, then 2/s.
    let most = 4 + (2.0 * elapsed).ceil() as usize;
    assert!(
        reviewed <= most,
        "{reviewed} reviews in {elapsed:.2}s (at most {most})"
    );
    assert_eq!(fake.requests(TOKEN_REVIEWS), 1 + reviewed);
    assert!(auth.cached() <= 5, "cache holds {}", auth.cached());

    // The bucket is empty now, yet the scraper's token is re-reviewed at its expiry at once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for i in 0..10 {
        let _ = auth.authorize(Some(&format!("Bearer drain-{i}"))).await;
    }
    let before = fake.requests(TOKEN_REVIEWS);
    auth.authorize(Some("Bearer reader-token")).await.unwrap();
    assert_eq!(fake.requests(TOKEN_REVIEWS), before + 1);

    // A 400 KB token is refused without a review.
    let huge = format!("Bearer {}", "h".repeat(400 << 10));
    let err = auth.authorize(Some(&huge)).await.unwrap_err();
    assert_eq!(err.status(), 401);
    assert_eq!(fake.requests(TOKEN_REVIEWS), before + 1);
}

#[tokio::test]
async fn api_failures_are_not_cached() {
    let fake = fake().await;
    let auth = MetricsAuth::new(fake.client());
    fake.set_failing("authentication.k8s.io/tokenreviews", true);
    let err = auth
        .authorize(Some("Bearer reader-token"))
        .await
        .unwrap_err();
    assert!(matches!(err, MetricsAuthError::TokenReview(_)), "{err:?}");
    assert_eq!(err.status(), 401);
    assert_eq!(auth.cached(), 0);

    fake.set_failing("authentication.k8s.io/tokenreviews", false);
    fake.set_failing("authorization.k8s.io/subjectaccessreviews", true);
    let err = auth
        .authorize(Some("Bearer reader-token"))
        .await
        .unwrap_err();
    assert!(matches!(err, MetricsAuthError::AccessReview(_)), "{err:?}");
    assert_eq!(err.status(), 500);

    fake.set_failing("authorization.k8s.io/subjectaccessreviews", false);
    auth.authorize(Some("Bearer reader-token")).await.unwrap();
}
