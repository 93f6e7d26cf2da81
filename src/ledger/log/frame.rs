//! The frame format (see the table in [`super`]): encoding, checks, decoding.

use super::{DAY_BLOCK, HEADER, MAX_PAYLOAD, TRAILER, TYPE_ERASED, TYPE_RECORD};

/// What a frame says besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Links {
    /// The user's previous record.
    pub prev_user: u64,
    /// The user's previous record of the same type.
    pub prev_kind: u64,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
}

/// A frame read back.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Where it starts.
    pub pos: u64,
    /// Its links and time.
    pub links: Links,
    /// True when the record was erased (deleted user, retention): the payload is gone.
    pub erased: bool,
    pub(super) payload: Vec<u8>,
    pub(super) record_len: usize,
    pub(super) day_len: usize,
}

impl Frame {
    /// The record's JSON.
    pub fn record(&self) -> &[u8] {
        &self.payload[..self.record_len]
    }

    /// The JSON of the alerts written with the record (empty when none).
    pub fn alerts(&self) -> &[u8] {
        &self.payload[self.record_len..self.payload.len() - self.day_len]
    }

    /// The day block written with the record, if any.
    pub fn day_block(&self) -> Option<&[u8]> {
        (self.day_len > 0).then(|| &self.payload[self.payload.len() - self.day_len..])
    }

    /// Where the next frame starts.
    pub fn end(&self) -> u64 {
        self.pos + (HEADER + self.payload.len() + TRAILER) as u64
    }
}

pub(super) fn crc(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&head[0..12]);
    h.update(&head[16..HEADER]);
    h.update(payload);
    h.finalize()
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

pub(super) fn encode_frame(
    out: &mut Vec<u8>,
    links: Links,
    record: &[u8],
    alerts: &[u8],
    day: Option<&[u8; DAY_BLOCK]>,
) {
    let payload_len = record.len() + alerts.len() + day.map_or(0, |d| d.len());
    let at = out.len();
    out.resize(at + HEADER, 0);
    out.extend_from_slice(record);
    out.extend_from_slice(alerts);
    if let Some(d) = day {
        out.extend_from_slice(d);
    }
    let head = &mut out[at..at + HEADER];
    head[0] = TYPE_RECORD;
    head[1] = u8::from(day.is_some());
    head[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
    head[8..12].copy_from_slice(&(record.len() as u32).to_le_bytes());
    head[16..24].copy_from_slice(&links.prev_user.to_le_bytes());
    head[24..32].copy_from_slice(&links.prev_kind.to_le_bytes());
    head[32..40].copy_from_slice(&links.created_ms.to_le_bytes());
    let sum = crc(&out[at..at + HEADER], &out[at + HEADER..]);
    out[at + 12..at + 16].copy_from_slice(&sum.to_le_bytes());
    let total = (HEADER + payload_len + TRAILER) as u32;
    out.extend_from_slice(&total.to_le_bytes());
}

/// Parses the header in `head`; `None` when it is not a valid header.
pub(super) fn parse_header(head: &[u8]) -> Option<(u8, usize, usize, usize, Links)> {
    if head.len() < HEADER || head[1] > 1 || head[2..4] != [0, 0] {
        return None;
    }
    let day_len = if head[1] == 1 { DAY_BLOCK } else { 0 };
    let kind = head[0];
    if kind != TYPE_RECORD && kind != TYPE_ERASED {
        return None;
    }
    let payload_len = u32_at(head, 4) as usize;
    let record_len = u32_at(head, 8) as usize;
    if payload_len > MAX_PAYLOAD || record_len + day_len > payload_len {
        return None;
    }
    let links = Links {
        prev_user: u64_at(head, 16),
        prev_kind: u64_at(head, 24),
        created_ms: u64_at(head, 32) as i64,
    };
    Some((kind, payload_len, record_len, day_len, links))
}

/// Checks and builds a frame from its full bytes (header, payload, trailer).
pub(super) fn decode_frame(pos: u64, bytes: &[u8]) -> Option<Frame> {
    let (kind, payload_len, record_len, day_len, links) = parse_header(bytes)?;
    let total = HEADER + payload_len + TRAILER;
    if bytes.len() < total || u32_at(bytes, HEADER + payload_len) as usize != total {
        return None;
    }
    let payload = &bytes[HEADER..HEADER + payload_len];
    if u32_at(bytes, 12) != crc(&bytes[..HEADER], payload) {
        return None;
    }
    Some(Frame {
        pos,
        links,
        erased: kind == TYPE_ERASED,
        payload: payload.to_vec(),
        record_len,
        day_len,
    })
}
