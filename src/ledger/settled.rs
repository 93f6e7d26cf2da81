//! What the recorder tells cluster mode's settlement pump about each record it wrote: the
//! record's final id and amounts, and what of its call's reservation the record replaces. The
//! record log is the durable queue of settlements: a settlement is sent to Redis only once its
//! record is on disk, so one lost in a crash is found again in the log.

use std::sync::Arc;

use rust_decimal::Decimal;

use super::record::Record;
use crate::clock::Month;

/// The part of a call's reservation (held in Redis) a record replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The reservation's id.
    pub res: Arc<str>,
    /// Whether the held message is given back (replaced by the record's own messages).
    pub message: bool,
    /// Held tokens given back.
    pub tokens: u64,
    /// Held cost given back.
    pub cost: Decimal,
    /// True when the record ends the call: whatever is still held is given back too.
    pub whole: bool,
    /// Tokens charged to the tokens-per-minute limiter at admission (given back at the end,
    /// where the actual tokens are charged instead).
    pub tpm_charged: u64,
}

/// A record on disk, for the settlement pump.
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    /// The record's final id (ids only grow in one replica's log).
    pub id: u128,
    /// The user billed.
    pub user_id: Arc<str>,
    /// The month it counts in.
    pub month: Month,
    /// Messages.
    pub messages: u64,
    /// Tokens.
    pub tokens: u64,
    /// Bytes.
    pub bytes: u64,
    /// Exact cost.
    pub cost: Decimal,
    /// True for a model response (its tokens count against tokens per minute).
    pub model_tokens: bool,
    /// What of a reservation it replaces.
    pub release: Option<Box<Release>>,
}

impl Settled {
    /// The settlement of `rec` (with its final id), replacing `release`.
    pub fn of(rec: &Record, release: Option<Box<Release>>) -> Self {
        Settled {
            id: rec.id,
            user_id: rec.user_id.clone(),
            month: rec.month(),
            messages: rec.messages,
            tokens: rec.tokens,
            bytes: rec.bytes,
            cost: rec.cost,
            model_tokens: matches!(rec.details, super::Details::AiResponse(_)),
            release,
        }
    }
}

/// Where the recorder sends the settlements of each batch once it is on disk.
pub type SettledSink = Box<dyn Fn(Vec<Settled>) + Send>;
