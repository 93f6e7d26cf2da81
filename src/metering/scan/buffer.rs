//! The buffer of the one unfinished event, shared by the JSON and SSE framings.

use super::{KEEP_CAPACITY, SALVAGE_TAIL, State};

/// The bytes of the one unfinished event, capped; past the cap only a tail is kept.
pub(super) struct EventBuf {
    pub(super) bytes: Vec<u8>,
    pub(super) overflowed: bool,
    cap: usize,
}

impl EventBuf {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            bytes: Vec::new(),
            overflowed: false,
            cap,
        }
    }

    pub(super) fn push(&mut self, data: &[u8]) {
        if !self.overflowed {
            if self.bytes.len().saturating_add(data.len()) <= self.cap {
                self.bytes.extend_from_slice(data);
                return;
            }
            // Over the cap: from now on keep only a tail, from which the usage
            // block can still be salvaged. Trim first so the buffer never grows.
            self.overflowed = true;
            let tail = self.cap.clamp(1, SALVAGE_TAIL);
            let cut = self.bytes.len().saturating_sub(tail);
            self.bytes.drain(..cut);
            self.bytes.shrink_to(tail.saturating_mul(2));
        }
        let tail = self.cap.clamp(1, SALVAGE_TAIL);
        if data.len() >= tail {
            self.bytes.clear();
            let from = data.len().saturating_sub(tail);
            self.bytes.extend_from_slice(data.get(from..).unwrap_or_default());
        } else {
            self.bytes.extend_from_slice(data);
            if self.bytes.len() > tail.saturating_mul(2) {
                let cut = self.bytes.len().saturating_sub(tail);
                self.bytes.drain(..cut);
            }
        }
    }

    /// Hands the finished event to `st` and empties the buffer.
    pub(super) fn finish(&mut self, st: &mut State, sse: bool) {
        if self.overflowed {
            st.salvage(&self.bytes);
        } else if sse {
            st.dispatch(&self.bytes);
        } else {
            st.process(&self.bytes);
        }
        self.reset();
    }

    pub(super) fn reset(&mut self) {
        self.bytes.clear();
        self.overflowed = false;
        if self.bytes.capacity() > KEEP_CAPACITY {
            self.bytes.shrink_to(KEEP_CAPACITY);
        }
    }
}
