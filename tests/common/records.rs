//! Usage records shaped as the gateway settles them, for tests and benches that fill a ledger.
//! Part of `tests/common`, and included by path in `benches/recorder.rs`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use gemini_meter::ledger::{Details, Record, RecordIds, RecordKind};
use rust_decimal::Decimal;
use serde_json::json;

/// The `i`th record of a run of answered calls: even `i` is a call's message_sent, odd `i` its
/// ai_response (27 tokens), each with the metadata the gateway writes; `user` is billed.
pub fn settled(ids: &RecordIds, i: usize, user: &str, at: DateTime<Utc>) -> Record {
    let ai = i % 2 == 1;
    let metadata = if ai {
        json!({"model": "gemini-2.5-flash", "prompt_tokens": 12, "output_tokens": 15, "thoughts_tokens": 0,
               "cached_tokens": 0, "tool_use_prompt_tokens": 0, "response_bytes": 1234, "stream": false,
               "format": "json", "upstream_status": 200, "status": "ok", "token_source": "upstream",
               "key_id": "key_0123456789abcdef", "duration_ms": 3})
    } else {
        json!({"model": "gemini-2.5-flash", "status": "ok", "upstream_status": 200, "key_id": "key_0123456789abcdef"})
    };
    Record {
        id: ids.next(at),
        user_id: Arc::from(user),
        tokens: if ai { 27 } else { 0 },
        messages: u64::from(!ai),
        bytes: 0,
        cost: if ai { Decimal::new(4110, 8) } else { Decimal::ZERO },
        details: Details::from_value(
            if ai {
                RecordKind::AiResponse
            } else {
                RecordKind::MessageSent
            },
            &metadata,
        )
        .expect("settled records have the shape the gateway writes"),
        created_at: at,
    }
}
