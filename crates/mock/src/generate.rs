//! The model calls: `generateContent`, `streamGenerateContent` (SSE or JSON array),
//! `countTokens` and OpenAI-compatible chat completions, with deterministic usage and the
//! failures injected by model id.

use std::sync::atomic::Ordering::Relaxed;

use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::body::{Ending, EventStream, Framing, MockBody, StreamPlan};
use super::wire::{self, Tokens};
use super::{
    JSON, MAX_JSON_BODY, SLOW_INTERVAL, Shared, count_body, error_json, json, json_gz, query_param, random_id,
    read_all, reject_native, reject_openai,
};

fn prompt_tokens(body_len: u64) -> u64 {
    body_len.div_ceil(4).max(1)
}

/// The output cap and thinking budget a request sets (either spelling), if any.
fn output_limits(body: &[u8], openai: bool) -> (Option<u64>, Option<u64>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    let pick = |v: &serde_json::Value, keys: [&str; 2]| keys.iter().find_map(|k| v.get(*k)).cloned();
    if openai {
        let cap = ["max_completion_tokens", "max_tokens"]
            .iter()
            .filter_map(|k| v.get(*k).and_then(serde_json::Value::as_u64))
            .min();
        return (cap, None);
    }
    let gc = pick(&v, ["generationConfig", "generation_config"]).unwrap_or_default();
    let cap = pick(&gc, ["maxOutputTokens", "max_output_tokens"]).and_then(|x| x.as_u64());
    let tc = pick(&gc, ["thinkingConfig", "thinking_config"]).unwrap_or_default();
    let budget = pick(&tc, ["thinkingBudget", "thinking_budget"]).and_then(|x| x.as_u64());
    (cap, budget)
}

/// The usage a request gets: thoughts within the thinking budget, thoughts plus candidates
/// within the output cap. Records the cap in the stats.
fn limited(shared: &Shared, body: &[u8], openai: bool, thoughts: u64, candidates: u64) -> (u64, u64) {
    let (cap, budget) = output_limits(body, openai);
    if let Some(c) = cap
        && let Ok(mut caps) = shared.stats.output_caps.lock()
    {
        caps.push(c);
    }
    apply_limits(cap, budget, thoughts, candidates)
}

fn apply_limits(cap: Option<u64>, budget: Option<u64>, thoughts: u64, candidates: u64) -> (u64, u64) {
    let thoughts = thoughts.min(budget.unwrap_or(u64::MAX)).min(cap.unwrap_or(u64::MAX));
    let candidates = candidates.min(cap.map_or(u64::MAX, |c| c - thoughts));
    (thoughts, candidates)
}

/// The usage a generateContent call with this body would report (batches use it per request;
/// the cap is not recorded in the stats).
pub(super) fn usage_for(chunks: u32, body: &[u8], model: &str) -> Tokens {
    let (cap, budget) = output_limits(body, false);
    let full = wire::TOKENS_PER_PIECE * u64::from(chunks);
    let (thoughts, candidates) = apply_limits(cap, budget, thoughts_for(model), full);
    Tokens {
        prompt: prompt_tokens(body.len() as u64),
        candidates,
        thoughts,
    }
}

fn thoughts_for(model: &str) -> u64 {
    if model.contains("thinking") {
        wire::THINKING_TOKENS
    } else {
        0
    }
}

/// Google's rule: gzip when `Accept-Encoding` has gzip and the User-Agent contains "gzip".
fn client_wants_gzip(h: &HeaderMap) -> bool {
    let has = |name, needle: &str| {
        h.get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.contains(needle)))
    };
    has(ACCEPT_ENCODING, "gzip") && has(USER_AGENT, "gzip")
}

/// The injected error of a model id, if it has one.
fn injected_error(model: &str) -> Option<(StatusCode, &'static str)> {
    Some(match model {
        "error-500" => (StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
        "error-503" => (StatusCode::SERVICE_UNAVAILABLE, wire::ERR_OVERLOADED),
        "error-429" => (StatusCode::TOO_MANY_REQUESTS, wire::ERR_QUOTA),
        "error-400" => (StatusCode::BAD_REQUEST, wire::ERR_BAD_REQUEST),
        _ => return None,
    })
}

async fn ttfb(shared: &Shared) {
    if !shared.opts.ttfb.is_zero() {
        tokio::time::sleep(shared.opts.ttfb).await;
    }
}

pub(super) async fn generate(
    shared: &Shared,
    req: Request<Incoming>,
    model: String,
    stream: bool,
) -> Response<MockBody> {
    if let Some(r) = reject_native(shared, &req) {
        return r;
    }
    shared.stats.generate_requests.fetch_add(1, Relaxed);
    let sse = query_param(req.uri().query(), "alt") == Some("sse");
    let gzip = model == "gzip-always" || client_wants_gzip(req.headers());
    let body = match read_all(req.into_body(), MAX_JSON_BODY).await {
        Ok(b) => b,
        Err(_) => return error_json(StatusCode::BAD_REQUEST, wire::ERR_BAD_REQUEST),
    };
    let len = body.len() as u64;
    ttfb(shared).await;
    if let Some((status, body)) = injected_error(&model) {
        // A failed JSON-array stream answers its error as an array too (gemini-wire.md §3.2).
        return if stream && !sse {
            json(status, format!("[{body}\r\n]"))
        } else {
            error_json(status, body)
        };
    }
    let prompt = prompt_tokens(len);
    let full = wire::TOKENS_PER_PIECE * u64::from(shared.chunks);
    let (thoughts, max_candidates) = limited(shared, &body, false, thoughts_for(&model), full);
    let response_id = random_id(16);
    if !stream {
        let tokens = Tokens {
            prompt,
            candidates: max_candidates,
            thoughts,
        };
        let answer = wire::GenerateResponse::new(&shared.unary_text, true, Some(tokens), &model, &response_id);
        let mut out = Vec::with_capacity(1024);
        return match wire::write_pretty_json(&mut out, &answer) {
            Ok(()) => json_gz(out, gzip),
            Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
        };
    }
    let final_only = model == "final-usage-only";
    let framing = if sse {
        // final-usage-only mimics fixtures/stream-sse-lf-final-usage.txt: LF line endings.
        Framing::Sse { crlf: !final_only }
    } else {
        Framing::JsonArray
    };
    let plan = stream_plan(shared, framing, model, response_id, prompt, thoughts, gzip);
    let plan = StreamPlan {
        usage_last_only: final_only,
        max_candidates,
        ..plan
    };
    let content_type = if sse { "text/event-stream" } else { JSON };
    stream_response(shared, plan, content_type)
}

fn stream_plan(
    shared: &Shared,
    framing: Framing,
    model: String,
    response_id: String,
    prompt: u64,
    thoughts: u64,
    gzip: bool,
) -> StreamPlan {
    let ending = match model.as_str() {
        "midstream-error" => Ending::MidstreamError,
        "cut" => Ending::Cut,
        _ => Ending::Complete,
    };
    StreamPlan {
        framing,
        ending,
        events: if ending == Ending::Complete { shared.chunks } else { 2 },
        interval: if model == "slow" {
            SLOW_INTERVAL
        } else {
            shared.opts.chunk_interval
        },
        model,
        response_id,
        created: wire::unix_now(),
        prompt,
        thoughts,
        max_candidates: u64::MAX,
        usage_last_only: false,
        gzip,
    }
}

fn stream_response(shared: &Shared, plan: StreamPlan, content_type: &'static str) -> Response<MockBody> {
    let gzip = plan.gzip;
    let body = EventStream::new(plan, shared.stats.clone());
    let mut r = Response::new(MockBody::Stream(Box::new(body)));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if gzip {
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    r
}

pub(super) async fn count_tokens(shared: &Shared, req: Request<Incoming>, model: &str) -> Response<MockBody> {
    if let Some(r) = reject_native(shared, &req) {
        return r;
    }
    let Ok(len) = count_body(req.into_body()).await else {
        return error_json(StatusCode::BAD_REQUEST, wire::ERR_BAD_REQUEST);
    };
    if let Some((status, body)) = injected_error(model) {
        return error_json(status, body);
    }
    let answer = wire::CountTokens {
        total_tokens: prompt_tokens(len),
    };
    match serde_json::to_vec_pretty(&answer) {
        Ok(b) => json(StatusCode::OK, b),
        Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
}

pub(super) async fn openai_chat(shared: &Shared, req: Request<Incoming>) -> Response<MockBody> {
    if let Some(r) = reject_openai(shared, &req) {
        return r;
    }
    shared.stats.generate_requests.fetch_add(1, Relaxed);
    let client_gzip = client_wants_gzip(req.headers());
    let body = match read_all(req.into_body(), MAX_JSON_BODY).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let Ok(chat) = serde_json::from_slice::<ChatRequest>(&body) else {
        return error_json(StatusCode::BAD_REQUEST, wire::ERR_BAD_JSON);
    };
    let Some(model) = chat.model.filter(|m| !m.is_empty()) else {
        return error_json(StatusCode::BAD_REQUEST, wire::ERR_BAD_REQUEST);
    };
    // The compat layer accepts both `gemini-x` and `models/gemini-x`.
    let model = match model.strip_prefix("models/") {
        Some(m) => m.to_owned(),
        None => model,
    };
    let gzip = client_gzip || model == "gzip-always";
    ttfb(shared).await;
    if let Some((status, body)) = injected_error(&model) {
        return error_json(status, body);
    }
    let prompt = prompt_tokens(body.len() as u64);
    let full = wire::TOKENS_PER_PIECE * u64::from(shared.chunks);
    let (thoughts, max_candidates) = limited(shared, &body, true, thoughts_for(&model), full);
    let id = format!("chatcmpl-{}", random_id(16));
    if chat.stream != Some(true) {
        let tokens = Tokens {
            prompt,
            candidates: max_candidates,
            thoughts,
        };
        let answer = wire::ChatCompletion {
            id: &id,
            object: "chat.completion",
            created: wire::unix_now(),
            model: &model,
            choices: [wire::Choice {
                index: 0,
                message: wire::Message {
                    role: "assistant",
                    content: &shared.unary_text,
                },
                finish_reason: "stop",
            }],
            usage: tokens.into(),
        };
        return match serde_json::to_vec(&answer) {
            Ok(b) => json_gz(b, gzip),
            Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
        };
    }
    let plan = StreamPlan {
        max_candidates,
        ..stream_plan(shared, Framing::OpenAi, model, id, prompt, thoughts, gzip)
    };
    stream_response(shared, plan, "text/event-stream")
}
