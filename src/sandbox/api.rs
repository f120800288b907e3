//! The agent-sandbox runtime API (upstream `examples/python-runtime-sandbox/main.py`, which the
//! Python and Go clients speak): routes, request and reply shapes.
//!
//! | route | reply |
//! |---|---|
//! | `GET /` | `{"status":"ok","message":"Sandbox Runtime is active."}` |
//! | `POST /execute` `{"command"}` | `{"stdout","stderr","exit_code"}` (failures to run are exit 1 with `Failed to execute command: ...`) |
//! | `POST /upload` multipart `file` | `{"message":"File '<name>' uploaded successfully."}`; 403 `Access denied` |
//! | `GET /download/{path}` | the bytes, `application/octet-stream`; 404 `File not found` |
//! | `GET /list/{path}` | `[{"name","size","type","mod_time"}]`; 404 `Path is not a directory` |
//! | `GET /exists/{path}` | `{"path","exists"}` |

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::ApiError;
use super::exec::{ExecError, Executor};
use super::workspace::{Entry, Workspace};

/// Shared state of the runtime's handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub workspace: Arc<Workspace>,
    pub executor: Executor,
    pub max_upload_bytes: u64,
    pub max_list_entries: usize,
}

#[derive(Debug, Deserialize)]
struct ExecuteRequest {
    command: String,
}

/// Upstream's `ExecuteResponse`, field for field.
#[derive(Debug, Serialize)]
struct ExecuteResponse {
    stdout: String,
    stderr: String,
    exit_code: i32,
}

/// `/execute` bodies are a command line; this is generous.
const MAX_EXECUTE_BODY: usize = 1024 * 1024;

pub fn router(state: AppState) -> Router {
    // The multipart framing adds a little around the file itself.
    let upload_body = usize::try_from(state.max_upload_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(64 * 1024);
    Router::new()
        .route("/", get(health))
        .route(
            "/execute",
            post(execute).layer(DefaultBodyLimit::max(MAX_EXECUTE_BODY)),
        )
        .route(
            "/upload",
            post(upload).layer(DefaultBodyLimit::max(upload_body)),
        )
        .route("/download/{*path}", get(download))
        .route("/list/", get(list_root))
        .route("/list/{*path}", get(list))
        .route("/exists/{*path}", get(exists))
        .with_state(state)
}

/// Upstream's health reply (a struct: field order is part of the bytes clients may compare).
#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
    message: &'static str,
}

/// Upstream's `/exists` reply.
#[derive(Debug, Serialize)]
struct Exists {
    path: String,
    exists: bool,
}

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok",
        message: "Sandbox Runtime is active.",
    })
}

async fn execute(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request: ExecuteRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Unprocessable(format!("invalid /execute body: {e}")))?;
    let reply = match state.executor.execute(&request.command).await {
        Ok(outcome) => ExecuteResponse {
            stdout: outcome.stdout,
            stderr: outcome.stderr,
            exit_code: outcome.exit_code,
        },
        Err(ExecError::Busy { running, limit }) => {
            return Err(ApiError::Busy(format!(
                "{running} commands are running (limit {limit}); retry later"
            )))
        }
        // Upstream answers every failure to run with 200 and exit code 1.
        Err(e) => {
            if let ExecError::Supervisor(_) = e {
                tracing::warn!(error = %e, "execute failed");
            }
            ExecuteResponse {
                stdout: String::new(),
                stderr: format!("Failed to execute command: {e}"),
                exit_code: 1,
            }
        }
    };
    Ok(Json(reply).into_response())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("worker failed: {e}")))
}

async fn upload(State(state): State<AppState>, mut form: Multipart) -> Result<Response, ApiError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::Unprocessable(format!("invalid multipart body: {e}"))
    };
    while let Some(mut field) = form.next_field().await.map_err(bad)? {
        if field.name() != Some("file") {
            continue;
        }
        let Some(filename) = field.file_name().map(str::to_string) else {
            return Err(ApiError::Unprocessable(
                "the `file` field has no filename".into(),
            ));
        };
        let ws = state.workspace.clone();
        let name = filename.clone();
        let mut upload = blocking(move || ws.create(&name))
            .await?
            .map_err(ApiError::writing)?;
        let file = upload
            .file()
            .and_then(|f| f.try_clone().ok())
            .ok_or_else(|| ApiError::UploadFailed("no file to write".into()))?;
        let mut file = tokio::fs::File::from_std(file);
        let mut written: u64 = 0;
        while let Some(chunk) = field.chunk().await.map_err(bad)? {
            written = written.saturating_add(chunk.len() as u64);
            if written > state.max_upload_bytes {
                // Dropping `upload` removes the partial file.
                return Err(ApiError::UploadTooLarge {
                    limit: state.max_upload_bytes,
                });
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| ApiError::UploadFailed(e.to_string()))?;
        }
        file.flush()
            .await
            .map_err(|e| ApiError::UploadFailed(e.to_string()))?;
        drop(file);
        blocking(move || upload.commit())
            .await?
            .map_err(ApiError::writing)?;
        tracing::debug!(path = %filename, bytes = written, "uploaded");
        return Ok(Json(serde_json::json!({
            "message": format!("File '{filename}' uploaded successfully.")
        }))
        .into_response());
    }
    Err(ApiError::Unprocessable(
        "missing multipart field `file`".into(),
    ))
}

/// `Content-Disposition` as Starlette's `FileResponse` writes it.
fn content_disposition(name: &str) -> HeaderValue {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b));
    let value = if plain {
        format!("attachment; filename=\"{name}\"")
    } else {
        let encoded: String = name
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!("attachment; filename*=utf-8''{encoded}")
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

async fn download(
    State(state): State<AppState>,
    Path(path): Path<String>,
) -> Result<Response, ApiError> {
    let ws = state.workspace.clone();
    let lookup = path.clone();
    let file = blocking(move || ws.read(&lookup))
        .await?
        .map_err(ApiError::reading)?;
    let len = file.metadata().map(|m| m.len()).ok();
    let file = tokio::fs::File::from_std(file);
    // Streamed in 64 KiB chunks: a large file never sits in memory whole.
    let stream = futures::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_DISPOSITION, content_disposition(&path));
    if let Some(len) = len {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(response)
}

async fn list_entries(state: AppState, path: String) -> Result<Json<Vec<Entry>>, ApiError> {
    let ws = state.workspace.clone();
    let max = state.max_list_entries;
    let entries = blocking(move || ws.list(&path, max))
        .await?
        .map_err(ApiError::listing)?;
    Ok(Json(entries))
}

async fn list_root(State(state): State<AppState>) -> Result<Json<Vec<Entry>>, ApiError> {
    list_entries(state, String::new()).await
}

async fn list(
    State(state): State<AppState>,
    Path(path): Path<String>,
) -> Result<Json<Vec<Entry>>, ApiError> {
    list_entries(state, path).await
}

async fn exists(
    State(state): State<AppState>,
    Path(path): Path<String>,
) -> Result<Json<Exists>, ApiError> {
    let ws = state.workspace.clone();
    let lookup = path.clone();
    let found = blocking(move || ws.exists(&lookup))
        .await?
        .map_err(ApiError::reading)?;
    Ok(Json(Exists {
        path,
        exists: found,
    }))
}
