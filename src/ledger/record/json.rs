//! The record's JSON, written by hand: every record is serialized once on its way to the log,
//! and serde_json's per-byte escaping of every string was the largest part of that. The output
//! is byte for byte what `serde_json` writes for the same record (tests compare the two, and
//! `tests/golden_records.rs` compares with records written before): keys sorted as a JSON map
//! sorts them, strings escaped alike (a string that needs escaping goes through serde_json).

use std::io::Write as _;

use chrono::{DateTime, Datelike, Timelike, Utc};

use rust_decimal::Decimal;

use super::super::details::{
    AiResponse, CacheAction, CacheStorage, ContextTier, Details, ErrorInfo, FileUpload, MessageSent, Price, PriceLine,
    ResponseFormat, Status, Tags, TokenSource,
};
use super::Record;

/// Appends `rec`'s JSON to `out`.
pub fn write_record(rec: &Record, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let mut o = Obj::new(out);
    o.u64("bytes", rec.bytes);
    o.key("cost");
    o.out.push(b'"');
    // Decimal's Display writes digits and a point only: nothing to escape.
    let _ = write!(o.out, "{}", rec.cost.normalize());
    o.out.push(b'"');
    o.key("created_at");
    time_ms(o.out, rec.created_at);
    o.key("id");
    hex_id(o.out, rec.id);
    o.u64("messages", rec.messages);
    o.key("metadata");
    details(o.out, &rec.details)?;
    o.u64("tokens", rec.tokens);
    o.str("type", rec.kind().as_str());
    o.str("user_id", &rec.user_id);
    o.end();
    Ok(())
}

fn details(out: &mut Vec<u8>, d: &Details) -> Result<(), serde_json::Error> {
    match d {
        Details::MessageSent(m) => message_sent(out, m),
        Details::AiResponse(a) => ai_response(out, a),
        Details::FileUpload(f) => file_upload(out, f),
        Details::CacheStorage(c) => cache_storage(out, c),
        Details::Untyped(_, m) => return serde_json::to_writer(out, m),
    }
    Ok(())
}

fn message_sent(out: &mut Vec<u8>, m: &MessageSent) {
    let mut o = Obj::new(out);
    o.str("key_id", &m.key_id);
    o.str("model", &m.model);
    o.str("status", status(m.status));
    o.tags(m.tags.as_deref());
    if let Some(s) = m.upstream_status {
        o.u64("upstream_status", u64::from(s));
    }
    o.end();
}

fn ai_response(out: &mut Vec<u8>, a: &AiResponse) {
    let mut o = Obj::new(out);
    o.u64("cached_tokens", a.cached_tokens);
    o.u64("duration_ms", a.duration_ms);
    if let Some(e) = &a.error {
        o.key("error");
        error(o.out, e);
    }
    o.str("format", format(a.format));
    o.str("key_id", &a.key_id);
    o.str("model", &a.model);
    if let Some(v) = &a.model_version {
        o.str("model_version", v);
    }
    o.u64("output_tokens", a.output_tokens);
    if let Some(p) = &a.price {
        o.key("price");
        price(o.out, p);
    }
    o.u64("prompt_tokens", a.prompt_tokens);
    o.u64("response_bytes", a.response_bytes);
    o.str("status", status(a.status));
    o.key("stream");
    o.out.extend_from_slice(if a.stream { b"true" } else { b"false" });
    o.tags(a.tags.as_deref());
    o.u64("thoughts_tokens", a.thoughts_tokens);
    o.str(
        "token_source",
        match a.token_source {
            TokenSource::Upstream => "upstream",
            TokenSource::Estimated => "estimated",
        },
    );
    o.u64("tool_use_prompt_tokens", a.tool_use_prompt_tokens);
    o.u64("upstream_status", u64::from(a.upstream_status));
    o.end();
}

fn file_upload(out: &mut Vec<u8>, f: &FileUpload) {
    let mut o = Obj::new(out);
    o.u64("bytes_sent", f.bytes_sent);
    o.str("key_id", &f.key_id);
    o.str("status", status(f.status));
    o.tags(f.tags.as_deref());
    if let Some(s) = &f.upload_session {
        o.str("upload_session", s);
    }
    if let Some(s) = &f.upload_status {
        o.str("upload_status", s);
    }
    o.u64("upstream_status", u64::from(f.upstream_status));
    o.end();
}

fn cache_storage(out: &mut Vec<u8>, c: &CacheStorage) {
    let mut o = Obj::new(out);
    o.str(
        "action",
        match c.action {
            CacheAction::Create => "create",
            CacheAction::Extend => "extend",
        },
    );
    if let Some(name) = &c.cache {
        o.str("cache", name);
    }
    o.str("key_id", &c.key_id);
    o.str("model", &c.model);
    o.key("price");
    price(o.out, &c.price);
    o.tags(c.tags.as_deref());
    o.u64("token_count", c.token_count);
    o.u64("ttl_seconds", c.ttl_seconds);
    o.end();
}

fn price(out: &mut Vec<u8>, p: &Price) {
    let mut o = Obj::new(out);
    if let Some(d) = p.batch_discount {
        o.decimal("batch_discount", d);
    }
    if let Some(c) = p.context {
        o.str(
            "context",
            match c {
                ContextTier::Standard => "standard",
                ContextTier::Long => "long",
            },
        );
    }
    if let Some(e) = &p.entry {
        o.str("entry", e);
    }
    o.key("lines");
    o.out.push(b'[');
    for (i, line) in p.lines.iter().enumerate() {
        if i > 0 {
            o.out.push(b',');
        }
        price_line(o.out, line);
    }
    o.out.push(b']');
    o.end();
}

fn price_line(out: &mut Vec<u8>, l: &PriceLine) {
    let mut o = Obj::new(out);
    o.decimal("cost", l.cost);
    if let Some(m) = l.modality {
        o.str("modality", m.as_str());
    }
    o.str("part", l.part.as_str());
    o.u64("quantity", l.quantity);
    o.decimal("rate", l.rate);
    o.end();
}

fn error(out: &mut Vec<u8>, e: &ErrorInfo) {
    let mut o = Obj::new(out);
    if let Some(c) = e.code {
        o.u64("code", u64::from(c));
    }
    if let Some(s) = &e.status {
        o.str("status", s);
    }
    o.end();
}

fn status(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::ClientClosed => "client_closed",
        Status::UpstreamError => "upstream_error",
        Status::UpstreamClosed => "upstream_closed",
        Status::UpstreamUnavailable => "upstream_unavailable",
    }
}

fn format(f: ResponseFormat) -> &'static str {
    match f {
        ResponseFormat::Json => "json",
        ResponseFormat::Sse => "sse",
        ResponseFormat::JsonArray => "json_array",
        ResponseFormat::OpenaiJson => "openai_json",
        ResponseFormat::OpenaiSse => "openai_sse",
    }
}

/// An object being written: keys are static, known not to need escaping.
struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Obj<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Obj { out, first: true }
    }

    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn u64(&mut self, k: &str, v: u64) {
        self.key(k);
        self.out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        string(self.out, v);
    }

    /// A decimal as a string, as `Display` writes it (digits, a point and a sign only).
    fn decimal(&mut self, k: &str, v: Decimal) {
        self.key(k);
        self.out.push(b'"');
        let _ = write!(self.out, "{v}");
        self.out.push(b'"');
    }

    fn tags(&mut self, tags: Option<&Tags>) {
        if let Some(t) = tags {
            self.key("tags");
            let mut o = Obj::new(self.out);
            for (n, v) in t {
                o.key_escaped(n);
                string(o.out, v);
            }
            o.end();
        }
    }

    fn key_escaped(&mut self, k: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        string(self.out, k);
        self.out.push(b':');
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// A JSON string: copied as it is unless a byte needs escaping (then as serde_json writes it).
fn string(out: &mut Vec<u8>, s: &str) {
    // No early exit: the compiler turns this into a vector loop.
    let needs = s
        .bytes()
        .fold(false, |acc, b| acc | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if needs {
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
        return;
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// 32 lowercase hex digits, quoted.
fn hex_id(out: &mut Vec<u8>, id: u128) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 34];
    buf[0] = b'"';
    buf[33] = b'"';
    for i in 0..32 {
        let nibble = (id >> ((31 - i) * 4)) & 0xf;
        buf[1 + i] = HEX[nibble as usize];
    }
    out.extend_from_slice(&buf);
}

/// RFC 3339 with milliseconds and `Z`, quoted, as `clock::rfc3339_ms` renders it.
fn time_ms(out: &mut Vec<u8>, t: DateTime<Utc>) {
    let year = t.year();
    if !(0..=9999).contains(&year) {
        string(out, &crate::clock::rfc3339_ms(t));
        return;
    }
    let ms = (t.nanosecond() % 1_000_000_000) / 1_000_000;
    let mut b = *b"\"0000-00-00T00:00:00.000Z\"";
    let mut put = |at: usize, v: u32, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            b[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(1, year as u32, 4);
    put(6, t.month(), 2);
    put(9, t.day(), 2);
    put(12, t.hour(), 2);
    put(15, t.minute(), 2);
    // A leap second shows as 60, as chrono writes it.
    put(18, t.second() + u32::from(t.nanosecond() >= 1_000_000_000), 2);
    put(21, ms, 3);
    out.extend_from_slice(&b);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;
    use proptest::prelude::*;
    use rust_decimal::Decimal;

    use super::*;
    use crate::ledger::details::RecordKind;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_.-]{0,20}",
            any::<String>(),
            Just("quote\" back\\slash \n\t\u{1}\u{7f} é 日本".to_string()),
        ]
    }

    fn status() -> impl Strategy<Value = Status> {
        prop_oneof![
            Just(Status::Ok),
            Just(Status::ClientClosed),
            Just(Status::UpstreamError),
            Just(Status::UpstreamClosed),
            Just(Status::UpstreamUnavailable),
        ]
    }

    fn tags() -> impl Strategy<Value = Option<Arc<Tags>>> {
        proptest::option::of(proptest::collection::btree_map(text(), text(), 0..4).prop_map(Arc::new))
    }

    fn details() -> impl Strategy<Value = Details> {
        let msg = (text(), text(), status(), tags(), proptest::option::of(any::<u16>())).prop_map(|(k, m, s, t, u)| {
            Details::MessageSent(MessageSent {
                key_id: k.into(),
                model: Arc::from(m),
                status: s,
                tags: t,
                upstream_status: u,
            })
        });
        let ai = (
            (
                any::<u64>(),
                any::<u64>(),
                proptest::option::of((proptest::option::of(any::<u16>()), proptest::option::of(text()))),
            ),
            (text(), text(), proptest::option::of(text()), any::<[u64; 5]>()),
            (status(), any::<bool>(), tags(), any::<bool>(), any::<u16>(), 0..5u8),
            proptest::option::of(price()),
        )
            .prop_map(|((c, d, e), (k, m, mv, n), (s, st, t, est, u, f), price)| {
                Details::AiResponse(AiResponse {
                    cached_tokens: c,
                    duration_ms: d,
                    error: e.map(|(code, status)| ErrorInfo { code, status }),
                    format: [
                        ResponseFormat::Json,
                        ResponseFormat::Sse,
                        ResponseFormat::JsonArray,
                        ResponseFormat::OpenaiJson,
                        ResponseFormat::OpenaiSse,
                    ][usize::from(f)],
                    key_id: k.into(),
                    model: Arc::from(m),
                    model_version: mv.map(Into::into),
                    output_tokens: n[0],
                    price,
                    prompt_tokens: n[1],
                    response_bytes: n[2],
                    status: s,
                    stream: st,
                    tags: t,
                    thoughts_tokens: n[3],
                    token_source: if est {
                        TokenSource::Estimated
                    } else {
                        TokenSource::Upstream
                    },
                    tool_use_prompt_tokens: n[4],
                    upstream_status: u,
                })
            });
        let up = (
            any::<u64>(),
            text(),
            status(),
            tags(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            any::<u16>(),
        )
            .prop_map(|(b, k, s, t, us, ust, u)| {
                Details::FileUpload(FileUpload {
                    bytes_sent: b,
                    key_id: k.into(),
                    status: s,
                    tags: t,
                    upload_session: us.map(Into::into),
                    upload_status: ust.map(Into::into),
                    upstream_status: u,
                })
            });
        let untyped = Just(Details::Untyped(
            RecordKind::AiResponse,
            serde_json::json!({"model": "m", "x": [1, "y\n"]})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        ));
        let cache = (
            any::<bool>(),
            proptest::option::of(text()),
            text(),
            text(),
            price(),
            tags(),
            any::<[u64; 2]>(),
        )
            .prop_map(|(extend, cache, k, m, price, t, n)| {
                Details::CacheStorage(CacheStorage {
                    action: if extend {
                        CacheAction::Extend
                    } else {
                        CacheAction::Create
                    },
                    cache: cache.map(Into::into),
                    key_id: k.into(),
                    model: Arc::from(m),
                    price,
                    tags: t,
                    token_count: n[0],
                    ttl_seconds: n[1],
                })
            });
        prop_oneof![msg, ai, up, untyped, cache]
    }

    fn decimal() -> impl Strategy<Value = Decimal> {
        (any::<i64>(), 0u32..20).prop_map(|(m, s)| Decimal::new(m, s))
    }

    fn price() -> impl Strategy<Value = Price> {
        use crate::config::Modality;
        use crate::ledger::details::PricePart;
        const PARTS: [PricePart; 10] = [
            PricePart::Input,
            PricePart::CachedInput,
            PricePart::ToolUse,
            PricePart::Output,
            PricePart::Thoughts,
            PricePart::Tokens,
            PricePart::Grounding,
            PricePart::Image,
            PricePart::VideoSecond,
            PricePart::CacheStorage,
        ];
        let line = (
            decimal(),
            proptest::option::of(0..5usize),
            0..10usize,
            any::<u64>(),
            decimal(),
        )
            .prop_map(|(cost, m, part, quantity, rate)| PriceLine {
                cost,
                modality: m.map(|i| Modality::ALL[i]),
                part: PARTS[part],
                quantity,
                rate,
            });
        (
            proptest::option::of(decimal()),
            proptest::option::of(any::<bool>()),
            proptest::option::of(text()),
            proptest::collection::vec(line, 0..4),
        )
            .prop_map(|(batch_discount, long, entry, lines)| Price {
                batch_discount,
                context: long.map(|l| if l { ContextTier::Long } else { ContextTier::Standard }),
                entry: entry.map(Into::into),
                lines,
            })
    }

    proptest! {
        #[test]
        fn hand_written_json_is_serde_json_byte_for_byte(
            d in details(),
            user in text(),
            nums in any::<[u64; 3]>(),
            id in any::<u128>(),
            cost in (any::<i64>(), 0u32..20),
            ms in 0i64..253_402_300_799_999,
        ) {
            let rec = Record {
                id,
                user_id: Arc::from(user),
                tokens: nums[0],
                messages: nums[1],
                bytes: nums[2],
                cost: Decimal::new(cost.0, cost.1),
                details: d,
                created_at: Utc.timestamp_millis_opt(ms).single().unwrap_or_default(),
            };
            let mut fast = Vec::new();
            rec.write_json(&mut fast).unwrap();
            let mut reference = Vec::new();
            rec.write_json_serde(&mut reference).unwrap();
            prop_assert_eq!(String::from_utf8_lossy(&fast), String::from_utf8_lossy(&reference));
        }
    }
}
