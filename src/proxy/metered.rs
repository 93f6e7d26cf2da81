//! A metered model call from admission to its last byte: the context the request's phases
//! share. It owns the message reservation and settles the call's two records exactly once
//! however it ends: `message_sent` when the upstream answers (or fails, or the client leaves
//! first), `ai_response` when the response body ends (see [`ResponseEnd`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use chrono::{DateTime, Utc};
use http::StatusCode;
use rust_decimal::Decimal;

use super::body::RequestTally;
use crate::admission::Reservation;
use crate::identity::KeyEntry;
use crate::ledger::{Details, MessageSent, Record, Status, Tags, TokenSource};
use crate::metering::observer::{End, Ending, Hold, OnEnd};
use crate::metering::scan::{Format, ScanSummary};
use crate::metering::usage::{Exchange, response_usage};
use crate::settle::{DiskWait, Settler};

/// A metered call between admission and the upstream's answer. Dropped there (the client left
/// while the upstream was still thinking), it gives the reserved message back and records what
/// was sent, estimated.
pub struct MeteredCall {
    settler: Arc<Settler>,
    key: KeyEntry,
    model: Arc<str>,
    at: DateTime<Utc>,
    tags: Option<Arc<Tags>>,
    tally: Arc<RequestTally>,
    started: Instant,
    reservation: Option<Reservation>,
    message_price: Decimal,
    armed: bool,
}

impl MeteredCall {
    /// The call of `key` for `model`, admitted at `at` with `reservation`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settler: Arc<Settler>,
        key: KeyEntry,
        model: &str,
        at: DateTime<Utc>,
        tags: Option<Arc<Tags>>,
        tally: Arc<RequestTally>,
        started: Instant,
        reservation: Option<Reservation>,
        message_price: Decimal,
    ) -> Self {
        MeteredCall {
            settler,
            key,
            model: Arc::from(model),
            at,
            tags,
            tally,
            started,
            reservation,
            message_price,
            armed: true,
        }
    }

    fn message(&mut self, answered: bool, status: Status, upstream_status: Option<u16>) -> Option<DiskWait> {
        let s = &self.settler;
        let user_id = s.registry.user_of(self.key)?.id_arc();
        let rec = Record {
            id: s.ids.next(self.at),
            user_id,
            tokens: 0,
            messages: u64::from(answered),
            bytes: 0,
            cost: if answered { self.message_price } else { Decimal::ZERO },
            details: Details::MessageSent(MessageSent {
                key_id: s.registry.key_id(self.key).into(),
                model: self.model.clone(),
                status,
                tags: self.tags.clone(),
                upstream_status,
            }),
            created_at: self.at,
        };
        s.settle(self.key, rec, self.reservation.take())
    }

    fn end_of(&mut self, upstream_status: u16, format: Format) -> ResponseEnd {
        self.settler.metrics.open_streams.fetch_add(1, Ordering::Relaxed);
        ResponseEnd {
            settler: self.settler.clone(),
            key: self.key,
            model: self.model.clone(),
            format,
            upstream_status,
            tags: self.tags.take(),
            tally: self.tally.clone(),
            started: self.started,
        }
    }

    /// The upstream answered: the message counts if it answered with success. Returns the
    /// response body's end-of-stream callback, and a wait for an alert the message fired.
    pub fn responded(mut self, status: StatusCode, format: Format) -> (ResponseEnd, Option<DiskWait>) {
        self.armed = false;
        let ok = status.is_success();
        let s = if ok { Status::Ok } else { Status::UpstreamError };
        let wait = self.message(ok, s, Some(status.as_u16()));
        (self.end_of(status.as_u16(), format), wait)
    }

    /// The upstream could not be reached or did not answer in time: the message is given back,
    /// the attempt recorded.
    pub fn failed(mut self, status: StatusCode) -> Option<DiskWait> {
        self.armed = false;
        self.message(false, Status::UpstreamUnavailable, Some(status.as_u16()))
    }

    /// The gateway itself refused the request body (too large): the message is given back and
    /// nothing is recorded.
    pub fn refused(mut self) {
        self.armed = false;
        self.reservation = None;
    }
}

impl Drop for MeteredCall {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        drop(self.message(false, Status::ClientClosed, None));
        // The prompt was sent: its tokens are estimated and recorded.
        let end = self.end_of(0, Format::UnaryJson);
        let summary = ScanSummary::default();
        drop(end.on_end(End {
            summary: &summary,
            response_bytes: 0,
            ending: Ending::ClientClosed,
        }));
    }
}

/// The end of a metered response body: builds its `ai_response` record and settles it.
pub struct ResponseEnd {
    settler: Arc<Settler>,
    key: KeyEntry,
    model: Arc<str>,
    format: Format,
    upstream_status: u16,
    tags: Option<Arc<Tags>>,
    tally: Arc<RequestTally>,
    started: Instant,
}

impl OnEnd for ResponseEnd {
    fn first_byte(&mut self) {
        self.settler.metrics.ttfb.observe(self.started.elapsed());
    }

    fn on_end(self, end: End<'_>) -> Option<Hold> {
        let s = &self.settler;
        s.metrics.open_streams.fetch_sub(1, Ordering::Relaxed);
        let user_id = s.registry.user_of(self.key)?.id_arc();
        let exchange = Exchange {
            model: self.model,
            format: self.format,
            upstream_status: self.upstream_status,
            tags: self.tags,
            key_id: s.registry.key_id(self.key).into(),
            prompt_chars: self.tally.text_chars.load(Ordering::Relaxed),
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        let usage = response_usage(exchange, &end, &s.live.load().config.pricing);
        if usage.details.token_source == TokenSource::Estimated {
            s.metrics.estimated.fetch_add(1, Ordering::Relaxed);
        }
        let now = s.clock.now();
        let rec = Record {
            id: s.ids.next(now),
            user_id,
            tokens: usage.tokens,
            messages: 0,
            bytes: 0,
            cost: usage.cost,
            details: Details::AiResponse(usage.details),
            created_at: now,
        };
        let wait = s.settle(self.key, rec, None)?;
        Some(Box::pin(wait))
    }
}
