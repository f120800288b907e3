//! API errors and the one place they become OpenAI error JSON
//! (`{"error":{"message","type","param","code"}}`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::serve::protocol::SubmitError;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested \
         {} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). Please \
         reduce the length of the messages or completion.",
        prompt_tokens + max_tokens
    )]
    ContextTooLong {
        max_model_len: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    #[error(
        "The prompt is {bytes} bytes, more than the {max_bytes} bytes that can fit this model's \
         maximum context length of {max_model_len} tokens. Please reduce the length of the prompt."
    )]
    PromptTooLarge {
        bytes: usize,
        max_bytes: usize,
        max_model_len: usize,
        param: &'static str,
    },
    #[error("Too many open connections (limit {max}). Retry later.")]
    TooManyConnections { max: usize },
    #[error("The model `{model}` does not exist.")]
    ModelNotFound { model: String },
    #[error("Server overloaded: {waiting} requests waiting (limit {max}). Retry later.")]
    Overloaded { waiting: usize, max: usize },
    #[error("The engine is not running.")]
    EngineDead,
    #[error("Request body too large (limit {limit} bytes).")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. }
            | ApiError::ContextTooLong { .. }
            | ApiError::PromptTooLarge { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Overloaded { .. }
            | ApiError::EngineDead
            | ApiError::TooManyConnections { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_type(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. }
            | ApiError::ContextTooLong { .. }
            | ApiError::PromptTooLarge { .. } => "BadRequestError",
            ApiError::ModelNotFound { .. } => "NotFoundError",
            ApiError::Overloaded { .. }
            | ApiError::EngineDead
            | ApiError::TooManyConnections { .. } => "ServiceUnavailableError",
            ApiError::PayloadTooLarge { .. } => "RequestEntityTooLargeError",
            ApiError::Internal(_) => "InternalServerError",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ApiError::BadRequest { param, .. } => *param,
            ApiError::ContextTooLong { .. } => Some("max_tokens"),
            ApiError::PromptTooLarge { param, .. } => Some(*param),
            ApiError::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    /// The `{"error": …}` body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                r#type: self.error_type(),
                param: self.param(),
                code: self.status().as_u16(),
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    pub r#type: &'static str,
    pub param: Option<&'static str>,
    pub code: u16,
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded { waiting, max } => ApiError::Overloaded { waiting, max },
            SubmitError::EngineDead => ApiError::EngineDead,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if matches!(
            self,
            ApiError::Overloaded { .. }
                | ApiError::EngineDead
                | ApiError::TooManyConnections { .. }
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
