//! The worst case of a model call, read from its request body before it goes upstream (hard
//! enforcement of token and cost quotas), and the output cap written back into it.
//!
//! **The estimator's bound.** A prompt is estimated at one token per byte of the whole JSON
//! body, plus [`MEDIA_ITEM_TOKENS`] per media part (`inlineData`, `fileData`, OpenAI
//! `image_url` / `input_audio`). A token of text is never shorter than one UTF-8 byte, and the
//! body holds every text byte (JSON escapes only lengthen it) plus the keys and punctuation
//! around them, which cover the few tokens the model's prompt template adds per turn: text is
//! never under-counted. Inline media is counted by its base64 length plus 258 per part: more
//! than Gemini's 258 tokens per image tile, 32 per second of audio or 263 per second of video at
//! any bitrate a real file has. A `fileData` part names an uploaded file whose size is not in
//! the body: its 258 is **not** a bound (a long video can count far more). Tokens the upstream
//! adds from server-side tools (`toolUsePromptTokenCount`) are not known in advance either.

use serde_json::{Map, Value};

/// Tokens counted per media part on top of its bytes.
pub const MEDIA_ITEM_TOKENS: u64 = 258;

const MEDIA_KEYS: [&str; 6] = [
    "inlineData",
    "inline_data",
    "fileData",
    "file_data",
    "image_url",
    "input_audio",
];

/// The prompt's token estimate for a body of `len` bytes parsed as `v`.
pub fn prompt_tokens(v: &Value, len: usize) -> u64 {
    (len as u64).saturating_add(MEDIA_ITEM_TOKENS.saturating_mul(media_items(v)))
}

fn media_items(v: &Value) -> u64 {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| u64::from(MEDIA_KEYS.contains(&k.as_str())) + media_items(v))
            .sum(),
        Value::Array(a) => a.iter().map(media_items).sum(),
        _ => 0,
    }
}

/// Where a body keeps its output cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Gemini's `generationConfig.maxOutputTokens` (or snake_case).
    Native,
    /// OpenAI's `max_completion_tokens` / `max_tokens`.
    OpenAi,
}

const GEN_CONFIG: [&str; 2] = ["generationConfig", "generation_config"];
const MAX_OUTPUT: [&str; 2] = ["maxOutputTokens", "max_output_tokens"];
const THINKING_CONFIG: [&str; 2] = ["thinkingConfig", "thinking_config"];
const THINKING_BUDGET: [&str; 2] = ["thinkingBudget", "thinking_budget"];
const OPENAI_MAX: [&str; 2] = ["max_completion_tokens", "max_tokens"];

fn get<'v>(m: &'v Map<String, Value>, keys: &[&'static str]) -> Option<(&'static str, &'v Value)> {
    keys.iter().find_map(|k| m.get(*k).map(|v| (*k, v)))
}

/// The output cap the request asks for, if it sets one (a negative or non-integer value counts
/// as none).
pub fn requested_cap(v: &Value, dialect: Dialect) -> Option<u64> {
    let m = v.as_object()?;
    match dialect {
        Dialect::Native => {
            let (_, gc) = get(m, &GEN_CONFIG)?;
            get(gc.as_object()?, &MAX_OUTPUT)?.1.as_u64()
        }
        Dialect::OpenAi => OPENAI_MAX.iter().filter_map(|k| m.get(*k)?.as_u64()).min(),
    }
}

/// How many answers the request asks for (`candidateCount`, OpenAI `n`); at least 1.
pub fn candidates(v: &Value, dialect: Dialect) -> u64 {
    let n = match dialect {
        Dialect::Native => v
            .as_object()
            .and_then(|m| get(m, &GEN_CONFIG))
            .and_then(|(_, gc)| get(gc.as_object()?, &["candidateCount", "candidate_count"]))
            .and_then(|(_, n)| n.as_u64()),
        Dialect::OpenAi => v.get("n").and_then(Value::as_u64),
    };
    n.unwrap_or(1).max(1)
}

/// Writes output cap `cap` into the body (where the request keeps it, else under the camelCase
/// or OpenAI name). Thinking tokens count as output and are bounded by the same cap; a
/// `thinkingBudget` above `cap - min_output` is lowered to that, so some answer fits.
pub fn set_cap(v: &mut Value, dialect: Dialect, cap: u64, min_output: u64) {
    let Some(m) = v.as_object_mut() else {
        return;
    };
    match dialect {
        Dialect::OpenAi => {
            let mut any = false;
            for k in OPENAI_MAX {
                if let Some(x) = m.get_mut(k) {
                    *x = Value::from(cap);
                    any = true;
                }
            }
            if !any {
                m.insert("max_tokens".into(), Value::from(cap));
            }
        }
        Dialect::Native => {
            let gk = get(m, &GEN_CONFIG).map_or(GEN_CONFIG[0], |(k, _)| k);
            let gc = m.entry(gk).or_insert_with(|| Value::Object(Map::new()));
            if !gc.is_object() {
                *gc = Value::Object(Map::new());
            }
            let Some(gc) = gc.as_object_mut() else {
                return;
            };
            let mk = get(gc, &MAX_OUTPUT).map_or(MAX_OUTPUT[0], |(k, _)| k);
            gc.insert(mk.into(), Value::from(cap));
            let Some(tk) = get(gc, &THINKING_CONFIG).map(|(k, _)| k) else {
                return;
            };
            let Some(tc) = gc.get_mut(tk).and_then(Value::as_object_mut) else {
                return;
            };
            let Some(bk) = get(tc, &THINKING_BUDGET).map(|(k, _)| k) else {
                return;
            };
            let limit = cap.saturating_sub(min_output);
            if tc.get(bk).and_then(Value::as_u64).is_some_and(|b| b > limit) {
                tc.insert(bk.into(), Value::from(limit));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn estimate_never_under_counts_text() {
        let v = json!({"contents": [{"parts": [{"text": "héllo"}]}]});
        let s = v.to_string();
        assert!(prompt_tokens(&v, s.len()) >= "héllo".len() as u64);
        let m = json!({"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}]});
        assert_eq!(prompt_tokens(&m, 10), 10 + MEDIA_ITEM_TOKENS);
    }

    #[test]
    fn caps_are_read_and_written_where_the_request_keeps_them() {
        let mut v =
            json!({"generation_config": {"max_output_tokens": 500, "thinking_config": {"thinking_budget": 400}}});
        assert_eq!(requested_cap(&v, Dialect::Native), Some(500));
        set_cap(&mut v, Dialect::Native, 100, 16);
        assert_eq!(
            v,
            json!({"generation_config": {"max_output_tokens": 100, "thinking_config": {"thinking_budget": 84}}})
        );
        let mut v = json!({"contents": []});
        assert_eq!(requested_cap(&v, Dialect::Native), None);
        set_cap(&mut v, Dialect::Native, 7, 16);
        assert_eq!(v["generationConfig"]["maxOutputTokens"], 7);
        assert_eq!(
            candidates(&json!({"generationConfig": {"candidateCount": 3}}), Dialect::Native),
            3
        );
        assert_eq!(candidates(&json!({"n": 2}), Dialect::OpenAi), 2);
        assert_eq!(candidates(&json!({}), Dialect::OpenAi), 1);
        let mut o = json!({"model": "m", "max_tokens": 50, "max_completion_tokens": 60});
        assert_eq!(requested_cap(&o, Dialect::OpenAi), Some(50));
        set_cap(&mut o, Dialect::OpenAi, 20, 16);
        assert_eq!(
            (o["max_tokens"].as_u64(), o["max_completion_tokens"].as_u64()),
            (Some(20), Some(20))
        );
    }
}
