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
        allow_ttl: Duration::from_millis(300),
        deny_ttl: Duration::from_millis(300),
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

    // A third token at capacity evicts one entry; the cache never grows past its cap.
    assert_eq!(
        auth.authorize(Some("Bearer app-token"))
            .await
            .unwrap_err()
            .status(),
        403
    );
    assert_eq!(auth.cached(), 2);

    // After the TTL the token is reviewed again (revocation takes effect).
    tokio::time::sleep(Duration::from_millis(400)).await;
    auth.authorize(Some("Bearer reader-token")).await.unwrap();
    assert_eq!(fake.requests(TOKEN_REVIEWS), 4);
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
