//! Errors the gateway itself answers with, always in Gemini's error envelope so SDKs show them.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Value, json};

use crate::admission::Refusal;
use crate::body::ProxyBody;
use crate::clock::rfc3339;

/// A refusal or failure the gateway reports to its caller.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub status: StatusCode,
    /// The google.rpc status name (`PERMISSION_DENIED`, ...).
    pub rpc_status: &'static str,
    /// Human-readable message; SDKs display it.
    pub message: String,
    /// An `ErrorInfo` detail (reason and metadata), when there is one.
    pub reason: Option<Box<(&'static str, Value)>>,
    /// Seconds for the `Retry-After` header (429 only).
    pub retry_after: Option<u64>,
    /// Low-cardinality label for metrics and logs.
    pub label: &'static str,
}

impl ApiError {
    /// A plain error with no details.
    pub fn new(status: StatusCode, rpc_status: &'static str, label: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            rpc_status,
            message: message.into(),
            reason: None,
            retry_after: None,
            label,
        }
    }

    /// 401: no key at all.
    pub fn missing_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "missing_key",
            "Missing API key. Pass the key the gateway issued you as the x-goog-api-key header, the key query parameter, or a Bearer token.",
        )
    }

    /// 401: a key that is unknown or revoked.
    pub fn invalid_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "invalid_key",
            "API key not valid. Please pass a valid API key issued by this gateway.",
        )
    }

    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "bad_request", message)
    }

    /// 404 with a message.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", "not_found", message)
    }

    /// 413: request body over `max_request_bytes`.
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "INVALID_ARGUMENT",
            "too_large",
            format!("Request body too large: the limit is {limit} bytes."),
        )
    }

    /// 502: the upstream could not be reached or broke before answering.
    pub fn upstream_unavailable(detail: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "UNAVAILABLE",
            "upstream_unavailable",
            format!("Upstream unavailable: {detail}"),
        )
    }

    /// 504: the upstream did not answer in time.
    pub fn upstream_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "DEADLINE_EXCEEDED",
            "upstream_timeout",
            "Upstream did not answer in time.",
        )
    }

    /// 500: something inside the gateway failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "internal", message)
    }

    /// 503 while the gateway is shutting down or degraded.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "unavailable", message)
    }

    /// Attaches an `ErrorInfo` detail.
    pub fn with_reason(mut self, reason: &'static str, metadata: Value) -> Self {
        self.reason = Some(Box::new((reason, metadata)));
        self
    }

    /// The Gemini-style JSON envelope.
    pub fn envelope(&self) -> Value {
        let mut error = json!({
            "code": self.status.as_u16(),
            "status": self.rpc_status,
            "message": self.message,
        });
        if let Some(r) = &self.reason {
            let (reason, metadata) = &**r;
            error["details"] = json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "gemini-meter",
                "metadata": metadata,
            }]);
        }
        json!({ "error": error })
    }

    /// The HTTP response for this error.
    pub fn into_response(self) -> Response<ProxyBody> {
        let body = Bytes::from(self.envelope().to_string());
        let mut resp = Response::new(ProxyBody::full(body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// Builds a JSON response with the given status.
pub fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::UnknownTier { tier } => ApiError::new(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "unknown_tier",
                format!("Plan '{tier}' is not configured on this gateway; ask the operator to assign a valid plan."),
            ),
            Refusal::ModelNotAllowed { model, tier } => ApiError::new(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "model_not_allowed",
                format!("Model {model} is not available on the {tier} plan. Upgrade your plan to use it."),
            )
            .with_reason("MODEL_NOT_ALLOWED", json!({"model": model, "tier": &*tier})),
            Refusal::StoreUnavailable { retry_secs } => {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "usage_store_unavailable",
                    "Usage store unavailable",
                );
                e.retry_after = Some(retry_secs.max(1));
                e
            }
            Refusal::RateLimited { limit, retry_secs } => {
                let what = limit.describe();
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RESOURCE_EXHAUSTED",
                    "rate_limited",
                    format!("Rate limit exceeded: {what}. Retry in {} s.", retry_secs.max(1)),
                )
                .with_reason("RATE_LIMIT_EXCEEDED", json!({"limit": what}));
                e.retry_after = Some(retry_secs.max(1));
                e
            }
            Refusal::Quota {
                quota,
                used,
                limit,
                resets_at,
            } => ApiError::new(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                quota.as_str(),
                crate::admission::quota_message(quota),
            )
            .with_reason(
                "MONTHLY_QUOTA_EXCEEDED",
                json!({"quota": quota.as_str(), "used": used, "limit": limit, "resets_at": rfc3339(resets_at)}),
            ),
        }
    }
}
