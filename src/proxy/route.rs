//! What a proxied request is, from its method, path and headers.

use http::{HeaderMap, Method};

use super::headers::query_param;
use crate::admission::Ask;
use crate::metering::scan::Format;

/// The kind of a proxied request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `models/{model}:generateContent` or `:streamGenerateContent`.
    Generate {
        /// Model id, e.g. `gemini-2.5-flash` (or `tunedModels/x`).
        model: String,
        /// True for `streamGenerateContent`.
        stream: bool,
    },
    /// `POST /v1beta/openai/chat/completions` (model and stream flag are in the body).
    OpenAiChat,
    /// `models/{model}:embedContent` or `:batchEmbedContents`: metered like a model call, with
    /// prompt tokens estimated from the text (Gemini reports no usage for embeddings).
    Embed {
        /// Model id, e.g. `gemini-embedding-001`.
        model: String,
    },
    /// `POST /v1beta/openai/embeddings` (model in the body; the answer's `usage` is read).
    OpenAiEmbed,
    /// `POST cachedContents`: billed for storage once created (model in the body).
    CacheCreate,
    /// `models/{model}:predict` (Imagen): billed per image returned.
    Predict {
        /// Model id.
        model: String,
    },
    /// `models/{model}:predictLongRunning` (Veo): billed per second of video when its owner
    /// reads the operation finished.
    VideoCreate {
        /// Model id.
        model: String,
    },
    /// `models/{model}:batchGenerateContent`: billed when its owner reads it finished.
    BatchCreate {
        /// Model id.
        model: String,
    },
    /// Start of a resumable upload.
    UploadStart {
        /// Declared size (`X-Goog-Upload-Header-Content-Length`).
        declared: Option<u64>,
    },
    /// Bytes of a resumable upload session.
    UploadChunk {
        /// The session id.
        upload_id: String,
    },
    /// Any other upload request (bytes are metered, caller key required).
    UploadOther,
    /// Anything else: forwarded, authenticated and rate limited, not metered.
    Other {
        /// The model the path names, if any.
        model: Option<String>,
    },
}

/// What the gateway does with the upstream's answer to a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<'a> {
    /// Meter the response body (a model call).
    Metered,
    /// Remember the upload session and point its URL at the gateway.
    UploadStart {
        /// The declared size.
        declared: Option<u64>,
    },
    /// Bill the bytes sent; forget the session once final.
    UploadBytes {
        /// The session, when the request names one.
        upload_id: Option<&'a str>,
    },
    /// Bill the images returned (read whole).
    Images,
    /// Pass it through.
    Plain,
}

impl Route {
    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Generate { stream: false, .. } => "generate",
            Route::Generate { stream: true, .. } => "stream",
            Route::OpenAiChat => "openai",
            Route::Embed { .. } | Route::OpenAiEmbed => "embed",
            Route::UploadStart { .. } | Route::UploadChunk { .. } | Route::UploadOther => "upload",
            Route::Other { .. }
            | Route::CacheCreate
            | Route::BatchCreate { .. }
            | Route::Predict { .. }
            | Route::VideoCreate { .. } => "other",
        }
    }

    /// The upload session a request continues (its caller is the session's key).
    pub fn upload_session(&self) -> Option<&str> {
        match self {
            Route::UploadChunk { upload_id } => Some(upload_id),
            _ => None,
        }
    }

    /// Whether the model is named in the body (read whole before admission).
    pub fn model_in_body(&self) -> bool {
        matches!(self, Route::OpenAiChat | Route::OpenAiEmbed | Route::CacheCreate)
    }

    /// Whether the call speaks the OpenAI-compatible dialect (the upstream key goes as Bearer).
    pub fn is_openai(&self) -> bool {
        matches!(self, Route::OpenAiChat | Route::OpenAiEmbed)
    }

    /// Whether the call has output whose cap a hard budget may lower (embeddings have none).
    pub fn has_output(&self) -> bool {
        matches!(self, Route::Generate { .. } | Route::OpenAiChat)
    }

    /// Whether the request body's prompt text is counted as it streams (for estimates).
    pub fn counts_prompt_text(&self) -> bool {
        matches!(self, Route::Generate { .. } | Route::Embed { .. })
    }

    /// Whether the caller's URL for the gateway is needed (to rewrite an upload's URL).
    pub fn needs_gateway_base(&self) -> bool {
        matches!(self, Route::UploadStart { .. })
    }

    /// The model a metered call is for: the path's, or `body_model` for the OpenAI route.
    pub fn metered_model<'a>(&'a self, body_model: Option<&'a str>) -> Option<&'a str> {
        match self {
            Route::Generate { model, .. } | Route::Embed { model } => Some(model),
            Route::OpenAiChat | Route::OpenAiEmbed => body_model,
            _ => None,
        }
    }

    /// What admission is asked for this request.
    pub fn ask<'a>(&'a self, body_model: Option<&'a str>) -> Ask<'a> {
        match self {
            Route::Generate { model, .. } | Route::Embed { model } => Ask::Generate { model, worst: None },
            Route::OpenAiChat | Route::OpenAiEmbed => Ask::Generate {
                model: body_model.unwrap_or_default(),
                worst: None,
            },
            Route::UploadStart { declared } => Ask::UploadStart { declared: *declared },
            Route::UploadChunk { .. } | Route::UploadOther => Ask::UploadBytes,
            Route::CacheCreate => Ask::Billed {
                model: body_model.unwrap_or_default(),
            },
            Route::BatchCreate { model } | Route::Predict { model } | Route::VideoCreate { model } => {
                Ask::Billed { model }
            }
            Route::Other { model } => Ask::Other {
                model: model.as_deref(),
            },
        }
    }

    /// What to do with the upstream's answer.
    pub fn answer(&self) -> Answer<'_> {
        match self {
            Route::Generate { .. } | Route::OpenAiChat | Route::Embed { .. } | Route::OpenAiEmbed => Answer::Metered,
            Route::UploadStart { declared } => Answer::UploadStart { declared: *declared },
            Route::UploadChunk { upload_id } => Answer::UploadBytes {
                upload_id: Some(upload_id),
            },
            Route::UploadOther => Answer::UploadBytes { upload_id: None },
            Route::Other { .. } | Route::CacheCreate | Route::BatchCreate { .. } | Route::VideoCreate { .. } => {
                Answer::Plain
            }
            Route::Predict { .. } => Answer::Images,
        }
    }

    /// The framing of a metered response: `status` and whether the upstream answered with
    /// Server-Sent Events (`sse`); `body_stream` is the OpenAI body's `stream` flag.
    pub fn response_format(&self, status: http::StatusCode, sse: bool, body_stream: bool) -> Format {
        let openai = matches!(self, Route::OpenAiChat | Route::OpenAiEmbed);
        let stream = matches!(self, Route::Generate { stream: true, .. }) || (openai && body_stream);
        match (openai, status.is_success() && (stream || sse), sse) {
            (true, true, _) => Format::OpenAiSse,
            (true, false, _) => Format::OpenAiJson,
            (false, true, true) => Format::Sse,
            (false, true, false) => Format::JsonArray,
            (false, false, _) => Format::UnaryJson,
        }
    }
}

/// True when the path is forwarded upstream.
pub fn is_proxied(path: &str) -> bool {
    path.starts_with("/v1beta/")
        || path.starts_with("/v1/")
        || path.starts_with("/v1alpha/")
        || path.starts_with("/upload/")
        // The Live API's WebSocket: refused by the route policy, with a clear error.
        || path.starts_with("/ws/")
}

/// The model id and method named by a path such as `/v1beta/models/x:generateContent`.
pub fn model_and_method(path: &str) -> Option<(String, std::borrow::Cow<'_, str>)> {
    let (prefix, rest) = if let Some(i) = path.find("/models/") {
        ("", &path[i + "/models/".len()..])
    } else if let Some(i) = path.find("/tunedModels/") {
        ("tunedModels/", &path[i + "/tunedModels/".len()..])
    } else {
        return None;
    };
    // An escaped colon is rare: only then is the rest copied.
    if rest.contains('%') {
        let unescaped = rest.replace("%3A", ":").replace("%3a", ":");
        let (model, method) = split_model(prefix, &unescaped)?;
        return Some((model, std::borrow::Cow::Owned(method.to_string())));
    }
    let (model, method) = split_model(prefix, rest)?;
    Some((model, std::borrow::Cow::Borrowed(method)))
}

/// `model:method` into the model id (with `prefix`) and the method.
fn split_model<'a>(prefix: &str, rest: &'a str) -> Option<(String, &'a str)> {
    let (model, method) = rest.split_once(':').unwrap_or((rest, ""));
    if model.is_empty() || model.contains('/') {
        return None;
    }
    let mut id = String::with_capacity(prefix.len() + model.len());
    id.push_str(prefix);
    id.push_str(model);
    Some((id, method))
}

/// Classifies a proxied request.
pub fn classify(method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> Route {
    if path.starts_with("/upload/") {
        if let Some(id) = query.and_then(|q| query_param(q, "upload_id")) {
            return Route::UploadChunk { upload_id: id };
        }
        let command = headers
            .get("x-goog-upload-command")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if command.to_ascii_lowercase().contains("start") {
            let declared = headers
                .get("x-goog-upload-header-content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            return Route::UploadStart { declared };
        }
        return Route::UploadOther;
    }
    if method == Method::POST && path.ends_with("/openai/chat/completions") {
        return Route::OpenAiChat;
    }
    if method == Method::POST && path.ends_with("/openai/embeddings") {
        return Route::OpenAiEmbed;
    }
    if method == Method::POST && path.ends_with("/cachedContents") {
        return Route::CacheCreate;
    }
    match model_and_method(path) {
        Some((model, m)) if method == Method::POST && m == "generateContent" => {
            Route::Generate { model, stream: false }
        }
        Some((model, m)) if method == Method::POST && m == "streamGenerateContent" => {
            Route::Generate { model, stream: true }
        }
        Some((model, m)) if method == Method::POST && (m == "embedContent" || m == "batchEmbedContents") => {
            Route::Embed { model }
        }
        Some((model, m)) if method == Method::POST && m == "batchGenerateContent" => Route::BatchCreate { model },
        Some((model, m)) if method == Method::POST && m == "predict" => Route::Predict { model },
        Some((model, m)) if method == Method::POST && m == "predictLongRunning" => Route::VideoCreate { model },
        Some((model, _)) => Route::Other { model: Some(model) },
        None => Route::Other { model: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_contract_routes() {
        let h = HeaderMap::new();
        assert_eq!(
            classify(
                &Method::POST,
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                Some("alt=sse"),
                &h
            ),
            Route::Generate {
                model: "gemini-2.5-flash".into(),
                stream: true
            }
        );
        assert_eq!(
            classify(&Method::POST, "/v1/models/gemini-2.5-flash:generateContent", None, &h),
            Route::Generate {
                model: "gemini-2.5-flash".into(),
                stream: false
            }
        );
        assert_eq!(
            classify(
                &Method::POST,
                "/v1beta/models/gemini-2.5-flash%3agenerateContent",
                None,
                &h
            ),
            Route::Generate {
                model: "gemini-2.5-flash".into(),
                stream: false
            }
        );
        assert_eq!(
            classify(&Method::POST, "/v1beta/tunedModels/my-tune:generateContent", None, &h),
            Route::Generate {
                model: "tunedModels/my-tune".into(),
                stream: false
            }
        );
        assert_eq!(
            classify(&Method::POST, "/v1beta/models/gemini-2.5-flash:countTokens", None, &h),
            Route::Other {
                model: Some("gemini-2.5-flash".into())
            }
        );
        assert_eq!(
            classify(&Method::GET, "/v1beta/models", None, &h),
            Route::Other { model: None }
        );
        assert_eq!(
            classify(&Method::POST, "/v1beta/openai/chat/completions", None, &h),
            Route::OpenAiChat
        );
        assert_eq!(
            classify(
                &Method::POST,
                "/upload/v1beta/files",
                Some("upload_id=abc&upload_protocol=resumable"),
                &h
            ),
            Route::UploadChunk {
                upload_id: "abc".into()
            }
        );
        let mut h2 = HeaderMap::new();
        h2.insert("x-goog-upload-command", "start".parse().unwrap());
        h2.insert("x-goog-upload-header-content-length", "2010585".parse().unwrap());
        assert_eq!(
            classify(&Method::POST, "/upload/v1beta/files", None, &h2),
            Route::UploadStart {
                declared: Some(2010585)
            }
        );
    }
}
