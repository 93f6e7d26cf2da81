//! The scanners against the wire fixtures, hand-made bodies, every split of them into frames,
//! and property tests.

use super::fixtures::*;
use super::*;
use proptest::prelude::*;

const SENTENCE: &str = "The meter counts every token that passes, and nothing more.";

fn scan(format: Format, body: &[u8]) -> ScanSummary {
    let mut s = Scanner::new(format);
    s.feed(body);
    s.summary()
}

fn scan_pieces(format: Format, pieces: &[&[u8]]) -> ScanSummary {
    let mut s = Scanner::new(format);
    for p in pieces {
        s.feed(p);
    }
    s.summary()
}

fn chars(s: &str) -> u64 {
    s.chars().count() as u64
}

fn full_usage() -> UsageReport {
    UsageReport {
        prompt: Some(1204),
        candidates: Some(52),
        thoughts: Some(388),
        cached: Some(1000),
        tool_use_prompt: None,
        total: Some(1644),
        prompt_details: Some([1204, 0, 0, 0, 0]),
        cache_details: Some([1000, 0, 0, 0, 0]),
        candidates_details: None,
    }
}

#[test]
fn unary_fixture() {
    let s = scan(Format::UnaryJson, UNARY);
    assert_eq!(s.usage, full_usage());
    assert!(s.usage_seen);
    assert_eq!(s.text_chars, chars(SENTENCE));
    assert_eq!(s.model_version.as_deref(), Some("gemini-2.5-flash"));
    assert_eq!(s.error, None);
    assert_eq!(s.events, 1);
}

#[test]
fn unary_blocked_fixture() {
    let s = scan(Format::UnaryJson, UNARY_BLOCKED);
    let want = UsageReport {
        prompt: Some(17),
        total: Some(17),
        ..UsageReport::default()
    };
    assert_eq!(s.usage, want);
    assert!(s.usage_seen);
    assert_eq!(s.text_chars, 0);
}

#[test]
fn sse_crlf_fixture() {
    let s = scan(Format::Sse, SSE_CRLF);
    assert_eq!(s.usage, full_usage());
    assert_eq!(s.text_chars, chars(SENTENCE));
    assert_eq!(s.events, 5);
    assert!(!s.done_marker);
    assert_eq!(s.model_version.as_deref(), Some("gemini-2.5-flash"));
}

#[test]
fn sse_lf_final_usage_fixture() {
    let s = scan(Format::Sse, SSE_LF_FINAL);
    let want = UsageReport {
        prompt: Some(88),
        candidates: Some(52),
        tool_use_prompt: Some(40),
        total: Some(180),
        prompt_details: Some([88, 0, 0, 0, 0]),
        ..UsageReport::default()
    };
    assert_eq!(s.usage, want);
    assert_eq!(s.text_chars, chars(SENTENCE));
    assert_eq!(s.model_version.as_deref(), Some("gemini-2.0-flash"));
}

#[test]
fn json_array_fixture() {
    let s = scan(Format::JsonArray, JSON_ARRAY);
    assert_eq!(s.usage, full_usage());
    assert_eq!(s.text_chars, chars(SENTENCE));
    assert_eq!(s.events, 5);
}

#[test]
fn midstream_error_fixture() {
    let s = scan(Format::Sse, SSE_MIDSTREAM_ERROR);
    let e = s.error.clone().expect("error seen");
    assert_eq!(e.code, Some(503));
    assert_eq!(e.status.as_deref(), Some("UNAVAILABLE"));
    assert_eq!(
        e.message.as_deref(),
        Some("The model is overloaded. Please try again later.")
    );
    assert_eq!(s.usage.prompt, Some(1204));
    assert_eq!(s.usage.candidates, Some(21));
    assert_eq!(s.usage.thoughts, Some(388));
    assert_eq!(s.usage.total, Some(1613));
    assert_eq!(s.usage.cached, Some(1000));
    assert_eq!(s.text_chars, chars("The meter counts every "));
}

#[test]
fn openai_stream_fixture() {
    let s = scan(Format::OpenAiSse, OPENAI_STREAM);
    let want = UsageReport {
        prompt: Some(1204),
        candidates: Some(440),
        total: Some(1644),
        ..UsageReport::default()
    };
    assert_eq!(s.usage, want);
    assert!(s.done_marker);
    assert_eq!(s.text_chars, chars(SENTENCE));
    assert_eq!(s.model_version.as_deref(), Some("gemini-2.5-flash"));
    assert_eq!(s.events, 5);
}

#[test]
fn error_429_fixture() {
    let s = scan(Format::UnaryJson, ERROR_429);
    assert_eq!(s.usage, UsageReport::default());
    assert!(!s.usage_seen);
    let e = s.error.expect("error seen");
    assert_eq!(e.code, Some(429));
    assert_eq!(e.status.as_deref(), Some("RESOURCE_EXHAUSTED"));
}

#[test]
fn every_fixture_split_at_every_offset() {
    for &(name, format, body) in ALL {
        let whole = scan(format, body);
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(scan_pieces(format, &[a, b]), whole, "{name} cut at {cut}");
        }
    }
}

#[test]
fn every_fixture_byte_by_byte() {
    for &(name, format, body) in ALL {
        let whole = scan(format, body);
        let mut s = Scanner::new(format);
        for b in body.chunks(1) {
            s.feed(b);
            let _ = s.summary();
        }
        assert_eq!(s.summary(), whole, "{name}");
    }
}

#[test]
fn json_array_in_other_json_formats_and_repeated() {
    let mut body = JSON_ARRAY.to_vec();
    body.extend_from_slice(JSON_ARRAY);
    let s = scan(Format::JsonArray, &body);
    assert_eq!(s.events, 10);
    assert_eq!(s.usage, full_usage());
    assert_eq!(s.text_chars, 2 * chars(SENTENCE));
}

#[test]
fn sse_reads_a_json_array_body_too() {
    let s = scan(Format::Sse, JSON_ARRAY);
    assert_eq!(s.usage, full_usage());
    assert_eq!(s.events, 5);
}

#[test]
fn usage_kept_field_by_field() {
    let body =
        b"data: {\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":3,\"totalTokenCount\":8}}\n\n\
data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"x\"}]}}]}\n\n\
data: {\"usageMetadata\":{\"candidatesTokenCount\":7}}\n\n\
data: {\"usageMetadata\":null}\n\n";
    let s = scan(Format::Sse, body);
    assert_eq!(s.usage.prompt, Some(5));
    assert_eq!(s.usage.candidates, Some(7));
    assert_eq!(s.usage.total, Some(8));
    assert_eq!(s.text_chars, 1);
    assert_eq!(s.events, 4);
}

#[test]
fn openai_usage_null_and_details() {
    let body = b"data: {\"model\":\"m1\",\"choices\":[{\"delta\":{\"content\":\"h\\u00e9\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":2},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\r\n\r\n\
data:{\"choices\":[{\"delta\":{\"content\":null}}],\"usage\":null}\r\n\r\n\
data: [DONE]\r\n\r\n";
    let s = scan(Format::OpenAiSse, body);
    let want = UsageReport {
        prompt: Some(3),
        candidates: Some(4),
        thoughts: Some(1),
        cached: Some(2),
        tool_use_prompt: None,
        total: Some(7),
        ..UsageReport::default()
    };
    assert_eq!(s.usage, want);
    assert_eq!(s.text_chars, 2);
    assert!(s.done_marker);
    assert_eq!(s.model_version.as_deref(), Some("m1"));
}

#[test]
fn openai_unary_message_content() {
    let body = br#"{"id":"x","model":"gemini-2.5-flash","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":"10","completion_tokens":2,"total_tokens":12.0}}"#;
    let s = scan(Format::OpenAiJson, body);
    assert_eq!(s.usage.prompt, Some(10));
    assert_eq!(s.usage.candidates, Some(2));
    assert_eq!(s.usage.total, Some(12));
    assert_eq!(s.text_chars, 11);
}

#[test]
fn sse_line_endings_fields_and_multiline_data() {
    // CR-only, LF and CRLF mixed; event/id/retry/comment lines; a data field
    // split over two lines joined with "\n" (legal JSON whitespace).
    let body = b": keep-alive\revent: message\nid: 7\r\nretry: 100\r\
data: {\"usageMetadata\":\r\ndata: {\"promptTokenCount\": 9}, \"modelVersion\": \"m\"}\r\r\
data:{\"usageMetadata\":{\"totalTokenCount\":11}}\n\r\n";
    let s = scan(Format::Sse, body);
    assert_eq!(s.usage.prompt, Some(9));
    assert_eq!(s.usage.total, Some(11));
    assert_eq!(s.events, 2);
    assert_eq!(s.model_version.as_deref(), Some("m"));
    for cut in 0..=body.len() {
        let (a, b) = body.split_at(cut);
        assert_eq!(scan_pieces(Format::Sse, &[a, b]), s, "cut {cut}");
    }
}

#[test]
fn braces_and_quotes_inside_strings() {
    let body =
        br#"[{"candidates":[{"content":{"parts":[{"text":"a } { \" ] [ \\"}]}}],"usageMetadata":{"totalTokenCount":3}}
,
{"usageMetadata":{"promptTokenCount":1}}
]"#;
    let s = scan(Format::JsonArray, body);
    assert_eq!(s.events, 2);
    assert_eq!(s.usage.total, Some(3));
    assert_eq!(s.usage.prompt, Some(1));
    assert_eq!(s.text_chars, chars(r#"a } { " ] [ \"#));
    for cut in 0..=body.len() {
        let (a, b) = body.split_at(cut);
        assert_eq!(scan_pieces(Format::JsonArray, &[a, b]), s, "cut {cut}");
    }
}

#[test]
fn array_wrapped_error() {
    let body = b"[{\n  \"error\": {\n    \"code\": 400,\n    \"message\": \"bad\",\n    \"status\": \"INVALID_ARGUMENT\"\n  }\n}\n]";
    for format in [Format::JsonArray, Format::UnaryJson, Format::Sse] {
        let s = scan(format, body);
        let e = s.error.expect("error");
        assert_eq!(e.code, Some(400), "{format:?}");
        assert_eq!(e.status.as_deref(), Some("INVALID_ARGUMENT"));
    }
}

#[test]
fn sse_data_error_payload() {
    let body =
        b"data: {\"error\":{\"code\":500,\"message\":\"Internal error encountered.\",\"status\":\"INTERNAL\"}}\n\n";
    let e = scan(Format::Sse, body).error.expect("error");
    assert_eq!(e.code, Some(500));
}

#[test]
fn stray_raw_line_does_not_hide_later_events() {
    let body = b"{ not json\n\"quote\ndata: {\"usageMetadata\":{\"totalTokenCount\":4}}\n\n";
    let s = scan(Format::Sse, body);
    assert_eq!(s.usage.total, Some(4));
}

#[test]
fn unterminated_last_event_is_counted_tentatively() {
    let body = b"data: {\"usageMetadata\":{\"totalTokenCount\":4}}";
    let mut s = Scanner::new(Format::Sse);
    s.feed(body);
    assert_eq!(s.summary().usage.total, Some(4));
    s.feed(b"\r\n");
    assert_eq!(s.summary().usage.total, Some(4));
    s.feed(b"\r\n");
    let done = s.summary();
    assert_eq!(done.usage.total, Some(4));
    assert_eq!(done.events, 1);
}

#[test]
fn bad_events_are_skipped() {
    let body = b"data: {\"usageMetadata\":{\"totalTokenCount\":4}}\n\ndata: {garbage\n\ndata: {\"candidates\":5,\"usageMetadata\":[1],\"modelVersion\":7,\"error\":null}\n\n";
    let s = scan(Format::Sse, body);
    assert_eq!(s.usage.total, Some(4));
    assert_eq!(s.events, 2);
    assert_eq!(s.error, None);
    assert_eq!(s.model_version, None);
}

#[test]
fn oversized_event_is_dropped_but_usage_salvaged() {
    let text = "x".repeat(10_000);
    let ev = format!(
        "{{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"{text}\"}}]}}}}],\"usageMetadata\":{{\"promptTokenCount\":3,\"totalTokenCount\":9}},\"modelVersion\":\"big\"}}"
    );
    for format in [Format::Sse, Format::JsonArray] {
        let body = if format == Format::Sse {
            format!("data: {ev}\n\ndata: {{\"usageMetadata\":{{\"candidatesTokenCount\":6}}}}\n\n")
        } else {
            format!("[{ev}\r\n,\r\n{{\"usageMetadata\":{{\"candidatesTokenCount\":6}}}}\r\n]")
        };
        let mut s = Scanner::with_cap(format, 1024);
        for piece in body.as_bytes().chunks(100) {
            s.feed(piece);
        }
        if let Framing::Sse(p) = &s.framing {
            assert!(p.data.bytes.capacity() <= 4096);
        }
        let sum = s.summary();
        assert_eq!(sum.usage.prompt, Some(3), "{format:?}");
        assert_eq!(sum.usage.total, Some(9));
        assert_eq!(sum.usage.candidates, Some(6));
        assert_eq!(sum.model_version.as_deref(), Some("big"));
        assert_eq!(sum.events, 2);
    }
}

#[test]
fn scanners_are_send() {
    fn send<T: Send>() {}
    send::<Scanner>();
    send::<TextCounter>();
}

#[test]
fn text_counter_example() {
    let doc = br#"{"contents":[{"role":"user","parts":[{"text":"h\u00e9llo \"x\""}]}]}"#;
    let raw = "{\"contents\":[{\"role\":\"user\",\"parts\":[{\"text\":\"héllo \\\"x\\\"\"}]}]}";
    for d in [doc.as_slice(), raw.as_bytes()] {
        let mut c = TextCounter::new();
        c.feed(d);
        assert_eq!(c.chars(), 9);
        for cut in 0..=d.len() {
            let (a, b) = d.split_at(cut);
            let mut c = TextCounter::new();
            c.feed(a);
            c.feed(b);
            assert_eq!(c.chars(), 9, "cut {cut}");
        }
    }
}

#[test]
fn text_counter_keys_and_values() {
    let doc = "{\"messages\":[{\"role\":\"user\",\"content\":\"ab\"},{\"content\":[{\"type\":\"text\",\"text\":\"cd\"}]}],\
\"x\":{\"text\":5,\"y\":\"text\"},\"z\":[\"text\",\"content\"],\"s\":\"\\ud83d\\ude00!\"}";
    let mut c = TextCounter::new();
    c.feed(doc.as_bytes());
    assert_eq!(c.chars(), 4);
    let mut c = TextCounter::new();
    c.feed(br#"{"text":"\ud83d\ude00\n"}"#);
    assert_eq!(c.chars(), 2);
    let mut c = TextCounter::new();
    c.feed(br#"{"text":"abc"#);
    assert_eq!(c.chars(), 3);
}

fn any_format() -> impl Strategy<Value = Format> {
    prop::sample::select(vec![
        Format::UnaryJson,
        Format::Sse,
        Format::JsonArray,
        Format::OpenAiJson,
        Format::OpenAiSse,
    ])
}

fn jsonish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let alphabet = b"{}[]\":,\\ \r\ndata:[DONE]usageMetadataerrortext0123456789u".to_vec();
    prop::collection::vec(prop_oneof![any::<u8>(), prop::sample::select(alphabet)], 0..1500)
}

fn cut(body: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut last = 0;
    for p in points {
        out.push(body[last..p].to_vec());
        last = p;
    }
    out.push(body[last..].to_vec());
    out
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(Value::from),
        r#"[a-z"\\\n{}\[\]é😀\x01\x7f]{0,12}"#.prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop::sample::select(vec!["text", "content", "role", "parts", "tex", "contents"]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
            prop::collection::vec((key, inner), 0..5)
                .prop_map(|kv| { serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()) }),
        ]
    })
}

/// Reference count for `TextCounter`.
fn reference_chars(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::Array(a) => a.iter().map(reference_chars).sum(),
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) if k == "text" || k == "content" => chars(s),
                other => reference_chars(other),
            })
            .sum(),
        _ => 0,
    }
}

type GenEvent = (Vec<String>, [Option<u64>; 3]);

fn gen_events() -> impl Strategy<Value = Vec<GenEvent>> {
    let text = r#"[a-z"\\\n{}\[\]é😀\x01]{0,10}"#;
    let usage = prop::array::uniform3(prop::option::of(0u64..100_000));
    prop::collection::vec((prop::collection::vec(text, 0..3), usage), 1..6)
}

fn event_json(ev: &GenEvent) -> serde_json::Value {
    let (texts, usage) = ev;
    let parts: Vec<_> = texts.iter().map(|t| serde_json::json!({ "text": t })).collect();
    let mut v = serde_json::json!({
        "candidates": [{ "content": { "parts": parts, "role": "model" }, "index": 0 }],
        "modelVersion": "m",
    });
    let names = ["promptTokenCount", "candidatesTokenCount", "totalTokenCount"];
    let mut meta = serde_json::Map::new();
    for (name, value) in names.iter().zip(usage) {
        if let Some(value) = value {
            meta.insert((*name).to_owned(), (*value).into());
        }
    }
    if !meta.is_empty() {
        v["usageMetadata"] = serde_json::Value::Object(meta);
    }
    v
}

proptest! {
    #[test]
    fn generated_native_streams(
        events in gen_events(),
        eol in prop::sample::select(vec!["\n", "\r\n", "\r"]),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
    ) {
        let mut want = UsageReport::default();
        let mut want_chars = 0;
        for (texts, usage) in &events {
            want_chars += texts.iter().map(|t| chars(t)).sum::<u64>();
            for (slot, value) in [&mut want.prompt, &mut want.candidates, &mut want.total]
                .into_iter()
                .zip(usage)
            {
                if value.is_some() {
                    *slot = *value;
                }
            }
        }
        let values: Vec<_> = events.iter().map(event_json).collect();
        let mut sse = Vec::new();
        for v in &values {
            sse.extend_from_slice(b"data: ");
            sse.extend_from_slice(&serde_json::to_vec(v).expect("serialize"));
            sse.extend_from_slice(format!("{eol}{eol}").as_bytes());
        }
        let elems: Vec<String> = values
            .iter()
            .map(|v| serde_json::to_string_pretty(v).expect("serialize"))
            .collect();
        let array = format!("[{}\r\n]", elems.join("\r\n,\r\n"));
        for (format, body) in [(Format::Sse, sse.as_slice()), (Format::JsonArray, array.as_bytes())] {
            let pieces = cut(body, &cuts);
            let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let got = scan_pieces(format, &refs);
            prop_assert_eq!(got.usage, want, "{:?}", format);
            prop_assert_eq!(got.text_chars, want_chars, "{:?}", format);
            prop_assert_eq!(got.events, events.len() as u64);
        }
    }

    #[test]
    fn text_counter_matches_reference(
        v in json_value(),
        pretty in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let doc = if pretty {
            serde_json::to_vec_pretty(&v).expect("serialize")
        } else {
            serde_json::to_vec(&v).expect("serialize")
        };
        let mut c = TextCounter::new();
        for piece in cut(&doc, &cuts) {
            c.feed(&piece);
        }
        prop_assert_eq!(c.chars(), reference_chars(&v));
    }

    #[test]
    fn random_bytes_never_panic(
        format in any_format(),
        body in jsonish_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = scan(format, &body);
        let mut s = Scanner::with_cap(format, 64);
        let mut t = TextCounter::new();
        let pieces = cut(&body, &cuts);
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        for p in &refs {
            s.feed(p);
            t.feed(p);
            let _ = s.summary();
        }
        let _ = t.chars();
        prop_assert_eq!(scan_pieces(format, &refs), whole);
    }

    #[test]
    fn fixtures_in_random_pieces(
        idx in 0..ALL.len(),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let (_, format, body) = ALL[idx];
        let pieces = cut(body, &cuts);
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(scan_pieces(format, &refs), scan(format, body));
    }
}

#[test]
fn modality_details_and_grounding_are_read() {
    // Cumulative details on every chunk: the last list wins, whole; a chunk without a list
    // keeps the last. Unknown modalities stay unplaced; non-numeric counts are skipped.
    let body = b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]}}],\"usageMetadata\":{\"promptTokenCount\":10,\"promptTokensDetails\":[{\"modality\":\"TEXT\",\"tokenCount\":4},{\"modality\":\"AUDIO\",\"tokenCount\":6}],\"candidatesTokensDetails\":[{\"modality\":\"IMAGE\",\"tokenCount\":1}]}}\r\n\r\n\
data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"b\"}]},\"groundingMetadata\":{\"webSearchQueries\":[\"q\"]}}],\"usageMetadata\":{\"promptTokenCount\":10,\"cachedContentTokenCount\":3,\"cacheTokensDetails\":[{\"modality\":\"AUDIO\",\"tokenCount\":3},{\"modality\":\"MODALITY_UNSPECIFIED\",\"tokenCount\":9},{\"modality\":\"TEXT\",\"tokenCount\":\"x\"}],\"candidatesTokensDetails\":[{\"modality\":\"IMAGE\",\"tokenCount\":1290},{\"modality\":\"TEXT\",\"tokenCount\":5}],\"toolUsePromptTokenCount\":12}}\r\n\r\n";
    let s = scan(Format::Sse, body);
    assert_eq!(s.usage.prompt_details, Some([4, 0, 6, 0, 0]));
    assert_eq!(s.usage.cache_details, Some([0, 0, 3, 0, 0]));
    assert_eq!(s.usage.candidates_details, Some([5, 1290, 0, 0, 0]));
    assert_eq!(s.usage.tool_use_prompt, Some(12));
    assert!(s.grounded);
    // Every split gives the same.
    for at in 0..body.len() {
        let mut sc = Scanner::new(Format::Sse);
        sc.feed(&body[..at]);
        sc.feed(&body[at..]);
        assert_eq!(sc.summary(), s, "split at {at}");
    }
    // An empty groundingMetadata is no search.
    let plain = b"{\"candidates\":[{\"groundingMetadata\":{}}],\"usageMetadata\":{\"promptTokenCount\":1}}";
    assert!(!scan(Format::UnaryJson, plain).grounded);
    let chunks = b"{\"candidates\":[{\"groundingMetadata\":{\"groundingChunks\":[{\"web\":{}}]}}]}";
    assert!(scan(Format::UnaryJson, chunks).grounded);
}
