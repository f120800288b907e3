//! The open-loop driver: sends each planned request at its scheduled time whatever happened to
//! the earlier ones, with a cap on requests in flight (beyond it a request is recorded as
//! dropped rather than queued, which would turn the load closed-loop), and a progress line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::client::{self, RequestOutcome};

/// One request to send at `at` after the start.
#[derive(Debug, Clone)]
pub struct Scheduled {
    pub at: Duration,
    pub body: Bytes,
    /// `x-gateway-inference-objective` to send (mixed-priority workload).
    pub objective: Option<&'static str>,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Per-request limit (whole stream).
    pub request_timeout: Duration,
    /// Requests in flight at most.
    pub max_in_flight: usize,
    /// Shown in the progress line; `None` disables it.
    pub progress_label: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(600),
            max_in_flight: 4096,
            progress_label: None,
        }
    }
}

/// Outcomes (in sending order) and how long the run took, first send to last answer.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub outcomes: Vec<RequestOutcome>,
    pub wall_s: f64,
}

#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
}

/// Runs `plan` against `url`.
pub async fn run(url: &str, plan: &[Scheduled], opts: &LoadOptions) -> LoadResult {
    let http = client::http_client();
    let slots = Arc::new(Semaphore::new(opts.max_in_flight.max(1)));
    let progress = Arc::new(Progress::default());
    let total = plan.len();
    let start = Instant::now();
    let ticker = opts.progress_label.clone().map(|label| {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                print_progress(&label, &progress, total, start);
            }
        })
    });
    let mut tasks = JoinSet::new();
    let mut outcomes: Vec<Option<RequestOutcome>> = vec![None; total];
    for (i, item) in plan.iter().enumerate() {
        tokio::time::sleep_until((start + item.at).into()).await;
        let sent_at_s = start.elapsed().as_secs_f64();
        progress.sent.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            progress.done.fetch_add(1, Ordering::Relaxed);
            progress.errors.fetch_add(1, Ordering::Relaxed);
            if let Some(o) = outcomes.get_mut(i) {
                *o = Some(RequestOutcome {
                    sent_at_s,
                    error: Some(format!(
                        "dropped: {} requests already in flight",
                        opts.max_in_flight
                    )),
                    ..RequestOutcome::default()
                });
            }
            continue;
        };
        let (http, url, body) = (http.clone(), url.to_owned(), item.body.clone());
        let (timeout, progress, objective) =
            (opts.request_timeout, Arc::clone(&progress), item.objective);
        tasks.spawn(async move {
            let mut out =
                client::stream_completion_with(&http, &url, body, objective, timeout).await;
            drop(permit);
            out.sent_at_s = sent_at_s;
            progress.done.fetch_add(1, Ordering::Relaxed);
            if !out.ok() {
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
            (i, out)
        });
        // Reap finished tasks as we go so the set stays small on long runs.
        while let Some(Ok((j, out))) = tasks.try_join_next() {
            if let Some(o) = outcomes.get_mut(j) {
                *o = Some(out);
            }
        }
    }
    while let Some(res) = tasks.join_next().await {
        if let Ok((j, out)) = res {
            if let Some(o) = outcomes.get_mut(j) {
                *o = Some(out);
            }
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
        if let Some(label) = &opts.progress_label {
            print_progress(label, &progress, total, start);
        }
    }
    LoadResult {
        outcomes: outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| RequestOutcome {
                    error: Some("request task failed".to_owned()),
                    ..RequestOutcome::default()
                })
            })
            .collect(),
        wall_s,
    }
}

fn print_progress(label: &str, p: &Progress, total: usize, start: Instant) {
    let sent = p.sent.load(Ordering::Relaxed);
    let done = p.done.load(Ordering::Relaxed);
    eprintln!(
        "  [{label}] {:>6.1}s  sent {sent}/{total}  done {done}  in flight {}  errors {}",
        start.elapsed().as_secs_f64(),
        sent.saturating_sub(done),
        p.errors.load(Ordering::Relaxed)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests beyond the in-flight cap are dropped, not queued; the rest succeed on time.
    #[tokio::test]
    async fn open_loop_with_in_flight_cap() {
        use axum::response::IntoResponse;
        async fn slow() -> impl IntoResponse {
            tokio::time::sleep(Duration::from_millis(300)).await;
            (
                [(http::header::CONTENT_TYPE, "text/event-stream")],
                "data: {\"choices\":[{\"text\":\"x\"}]}\n\ndata: [DONE]\n\n",
            )
        }
        let app = axum::Router::new().route("/v1/completions", axum::routing::post(slow));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let plan: Vec<Scheduled> = (0..5)
            .map(|i| Scheduled {
                at: Duration::from_millis(i * 10),
                body: Bytes::from_static(b"{}"),
                objective: None,
            })
            .collect();
        let opts = LoadOptions {
            max_in_flight: 3,
            ..LoadOptions::default()
        };
        let res = run(&format!("http://{addr}/v1/completions"), &plan, &opts).await;
        let errors: Vec<_> = res.outcomes.iter().map(|o| o.error.is_some()).collect();
        assert_eq!(errors, [false, false, false, true, true]);
        assert_eq!(res.outcomes[0].output_tokens, 1);
        // Open loop: all five were sent within the first ~40 ms, none waited for an answer.
        assert!(res.outcomes[4].sent_at_s < 0.2);
        assert!(res.wall_s >= 0.3 && res.wall_s < 2.0, "{}", res.wall_s);
    }
}
