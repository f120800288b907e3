//! The runtime's HTTP errors and the one place they become replies. Bodies are upstream's:
//! `{"message": ...}`, and FastAPI's `{"detail": ...}` for a request that does not validate.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::workspace::PathError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Access denied")]
    Denied,
    #[error("File not found")]
    FileNotFound,
    #[error("Path is not a directory")]
    NotADirectory,
    #[error("File upload failed: the file is larger than {limit} bytes")]
    UploadTooLarge { limit: u64 },
    #[error("File upload failed: {0}")]
    UploadFailed(String),
    #[error("List files failed: {0}")]
    ListFailed(String),
    /// The request body does not match the endpoint's schema (FastAPI answers 422).
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Denied => StatusCode::FORBIDDEN,
            ApiError::FileNotFound | ApiError::NotADirectory => StatusCode::NOT_FOUND,
            ApiError::UploadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            // 503 is in the upstream client's retry list; a busy runtime is worth a retry.
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UploadFailed(_) | ApiError::ListFailed(_) | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A path error met while reading a file (`/download`).
    pub fn reading(e: PathError) -> Self {
        match e {
            PathError::Denied => ApiError::Denied,
            PathError::NotFound | PathError::NotAFile | PathError::NotADirectory => {
                ApiError::FileNotFound
            }
            PathError::Io(e) => ApiError::Internal(format!("File download failed: {e}")),
        }
    }

    /// A path error met while listing (`/list`).
    pub fn listing(e: PathError) -> Self {
        match e {
            PathError::Denied => ApiError::Denied,
            PathError::NotFound | PathError::NotAFile | PathError::NotADirectory => {
                ApiError::NotADirectory
            }
            PathError::Io(e) => ApiError::ListFailed(e.to_string()),
        }
    }

    /// A path error met while writing (`/upload`).
    pub fn writing(e: PathError) -> Self {
        match e {
            PathError::Denied => ApiError::Denied,
            PathError::NotAFile => ApiError::UploadFailed("the path names a directory".into()),
            PathError::NotFound | PathError::NotADirectory => {
                ApiError::UploadFailed("a parent of the path is not a directory".into())
            }
            PathError::Io(e) => ApiError::UploadFailed(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "sandbox request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "sandbox request refused");
        }
        let body = match self {
            ApiError::Unprocessable(detail) => serde_json::json!({ "detail": detail }),
            other => serde_json::json!({ "message": other.to_string() }),
        };
        (status, Json(body)).into_response()
    }
}
