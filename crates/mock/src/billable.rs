//! Billable methods the gateway refuses by default, answered realistically so a test can prove
//! they never reach the mock: embedContent, batchEmbedContents, Imagen `predict`, and the
//! OpenAI-compatible embeddings and image generations. Deterministic, stateless.

use http::{Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::body::MockBody;
use super::store::{invalid, pretty};
use super::wire::{self, Embedding};

/// A 1×1 transparent PNG, base64.
const PNG_1X1: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn parse(body: &[u8]) -> Result<Value, Box<Response<MockBody>>> {
    serde_json::from_slice(body).map_err(|_| Box::new(invalid("Invalid JSON payload received.")))
}

fn compact(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// `models/{m}:embedContent` → `{"embedding": {"values": [8 floats]}}`.
pub(crate) fn embed_content(body: &[u8]) -> Response<MockBody> {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    #[derive(Serialize)]
    struct Answer {
        embedding: Embedding,
    }
    let seed = compact(v.get("content").unwrap_or(&Value::Null));
    pretty(
        StatusCode::OK,
        &Answer {
            embedding: Embedding {
                values: wire::embedding(&seed),
            },
        },
    )
}

/// `models/{m}:batchEmbedContents` → `{"embeddings": [...]}`, one per request, no usage.
pub(crate) fn batch_embed_contents(body: &[u8]) -> Response<MockBody> {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(requests) = v.get("requests").and_then(Value::as_array) else {
        return invalid("requests is required.");
    };
    #[derive(Serialize)]
    struct Answer {
        embeddings: Vec<Embedding>,
    }
    let embeddings = requests
        .iter()
        .map(|r| Embedding {
            values: wire::embedding(&compact(r.get("content").unwrap_or(&Value::Null))),
        })
        .collect();
    pretty(StatusCode::OK, &Answer { embeddings })
}

/// `models/{m}:predict` (Imagen) → `parameters.sampleCount` PNGs (default 4, as Imagen).
pub(crate) fn predict(body: &[u8]) -> Response<MockBody> {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let n = v
        .pointer("/parameters/sampleCount")
        .and_then(Value::as_u64)
        .unwrap_or(4)
        .clamp(1, 8);
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Prediction {
        bytes_base64_encoded: &'static str,
        mime_type: &'static str,
    }
    #[derive(Serialize)]
    struct Answer {
        predictions: Vec<Prediction>,
    }
    let predictions = (0..n)
        .map(|_| Prediction {
            bytes_base64_encoded: PNG_1X1,
            mime_type: "image/png",
        })
        .collect();
    pretty(StatusCode::OK, &Answer { predictions })
}

/// `openai/embeddings` → OpenAI's list shape with `usage.prompt_tokens` by the prompt rule.
pub(crate) fn openai_embeddings(body: &[u8]) -> Response<MockBody> {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(model) = v.get("model").and_then(Value::as_str) else {
        return invalid("model is required.");
    };
    let inputs: Vec<Vec<u8>> = match v.get("input") {
        Some(Value::Array(a)) => a.iter().map(compact).collect(),
        Some(x @ Value::String(_)) => vec![compact(x)],
        _ => return invalid("input is required."),
    };
    #[derive(Serialize)]
    struct Item {
        object: &'static str,
        index: usize,
        embedding: [f64; 8],
    }
    #[derive(Serialize)]
    struct Usage {
        prompt_tokens: u64,
        total_tokens: u64,
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        object: &'static str,
        data: Vec<Item>,
        model: &'a str,
        usage: Usage,
    }
    let prompt = (body.len() as u64).div_ceil(4).max(1);
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, seed)| Item {
            object: "embedding",
            index,
            embedding: wire::embedding(seed),
        })
        .collect();
    let answer = Answer {
        object: "list",
        data,
        model,
        usage: Usage {
            prompt_tokens: prompt,
            total_tokens: prompt,
        },
    };
    compact_json(&answer)
}

/// `openai/images/generations` → `{"created", "data": [{"b64_json"}]}`, `n` images (default 1).
pub(crate) fn openai_images(body: &[u8]) -> Response<MockBody> {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let n = v.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 8);
    #[derive(Serialize)]
    struct Image {
        b64_json: &'static str,
    }
    #[derive(Serialize)]
    struct Answer {
        created: u64,
        data: Vec<Image>,
    }
    let answer = Answer {
        created: wire::unix_now(),
        data: (0..n).map(|_| Image { b64_json: PNG_1X1 }).collect(),
    };
    compact_json(&answer)
}

/// The OpenAI-compat layer answers compact JSON (like the chat completions).
fn compact_json<T: Serialize>(v: &T) -> Response<MockBody> {
    match serde_json::to_vec(v) {
        Ok(b) => super::json(StatusCode::OK, b),
        Err(_) => super::error_json(StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
    }
}
