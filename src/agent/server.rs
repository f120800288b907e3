//! `switchyard agent serve`'s HTTP API: `GET /healthz`, and `POST /v1/tasks` whose reply streams
//! the task's events as NDJSON (`application/x-ndjson`, one [`Event`] per line, the last one
//! `done` or `failed`). At most `max_tasks` run at once; more get 429.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use super::events::Event;
use super::runner::{Agent, TaskRequest};

/// Largest task text accepted.
const MAX_TASK_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
struct AppState {
    agent: Arc<Agent>,
    slots: Arc<Semaphore>,
    max_tasks: usize,
}

/// `POST /v1/tasks` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskBody {
    task: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_steps: Option<u32>,
}

/// Errors before the stream starts, as `{"error": {"message", "type"}}`.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{limit} tasks are running, the limit; retry later")]
    Busy { limit: usize },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ApiError::Busy { .. } => (StatusCode::TOO_MANY_REQUESTS, "busy"),
        };
        (
            status,
            Json(json!({"error": {"message": self.to_string(), "type": kind}})),
        )
            .into_response()
    }
}

pub fn router(agent: Arc<Agent>, max_tasks: usize) -> Router {
    let max_tasks = max_tasks.max(1);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/tasks", post(create_task))
        .with_state(AppState {
            agent,
            slots: Arc::new(Semaphore::new(max_tasks)),
            max_tasks,
        })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

fn parse(state: &AppState, body: &[u8]) -> Result<TaskRequest, ApiError> {
    if body.len() > MAX_TASK_BYTES {
        return Err(ApiError::BadRequest(format!(
            "body larger than {MAX_TASK_BYTES} bytes"
        )));
    }
    let body: TaskBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid task body: {e}")))?;
    if body.task.trim().is_empty() {
        return Err(ApiError::BadRequest("`task` is empty".into()));
    }
    let limit = state.agent.config().max_steps_limit;
    if let Some(n) = body.max_steps {
        if n == 0 || n > limit {
            return Err(ApiError::BadRequest(format!(
                "`max_steps` must be between 1 and {limit}, got {n}"
            )));
        }
    }
    if body.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
        return Err(ApiError::BadRequest("`model` is empty".into()));
    }
    Ok(TaskRequest {
        task: body.task,
        model: body.model,
        max_steps: body.max_steps,
    })
}

async fn create_task(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request = parse(&state, &body)?;
    let permit = state
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy {
            limit: state.max_tasks,
        })?;
    let (tx, rx) = mpsc::channel::<Event>(64);
    let agent = state.agent.clone();
    // The task runs on its own so that a client that leaves still gets its claim deleted: the
    // closed channel ends the loop, and `run` releases the sandbox before returning.
    tokio::spawn(async move {
        agent.run(request, tx).await;
        drop(permit);
    });
    let lines = ReceiverStream::new(rx)
        .map(|event| Ok::<_, std::convert::Infallible>(Bytes::from(event.to_line())));
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    max_tasks: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(agent, max_tasks))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` (port 0 picks one) and serves in the background; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    agent: Arc<Agent>,
    max_tasks: usize,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(serve(listener, agent, max_tasks, std::future::pending()));
    Ok((bound, task))
}
