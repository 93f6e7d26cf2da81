//! The SSE framings (native `alt=sse` and OpenAI streaming): `data:` lines with LF, CRLF or CR
//! line ends, events ended by a blank line, and raw JSON lines between them.

use memchr::memchr2;

use super::State;
use super::buffer::EventBuf;
use super::json::Splitter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineMode {
    /// At the start of a line, matching the `data:` prefix.
    Start,
    /// Just after `data:`; one optional space follows.
    DataSpace,
    /// Inside a data line's value.
    Data,
    /// Inside a line that carries nothing for us (`event:`, `id:`, comments, …).
    Ignore,
    /// Inside a raw (non-`data:`) JSON line.
    Raw,
}

const DATA_PREFIX: &[u8] = b"data:";

pub(super) struct SseParser {
    mode: LineMode,
    /// Bytes of `data:` matched so far on this line.
    prefix: usize,
    /// The line so far is only spaces/tabs.
    lead_ws: bool,
    /// The previous line ended with CR; a following LF belongs to it.
    skip_lf: bool,
    /// A raw JSON object is open across lines.
    raw_active: bool,
    /// At least one data line belongs to the current event.
    has_data: bool,
    /// The event's first data line began in the current `feed` call.
    first_line_here: bool,
    /// The event's data so far, as a range of the current `feed` input, when it
    /// was not copied into `data` (the common case: a whole event in one frame).
    lazy: Option<(usize, usize)>,
    pub(super) data: EventBuf,
    raw: Splitter,
}

impl SseParser {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            mode: LineMode::Start,
            prefix: 0,
            lead_ws: false,
            skip_lf: false,
            raw_active: false,
            has_data: false,
            first_line_here: false,
            lazy: None,
            data: EventBuf::new(cap),
            raw: Splitter::new(cap),
        }
    }

    pub(super) fn feed(&mut self, input: &[u8], st: &mut State) {
        let mut i = 0usize;
        while let Some(&b) = input.get(i) {
            if self.skip_lf {
                self.skip_lf = false;
                if b == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.mode {
                LineMode::Start => i += self.start_byte(b, input, st),
                LineMode::DataSpace => {
                    if b == b' ' {
                        i += 1;
                    }
                    self.mode = LineMode::Data;
                }
                LineMode::Data | LineMode::Ignore | LineMode::Raw => {
                    let rest = input.get(i..).unwrap_or_default();
                    let end = memchr2(b'\n', b'\r', rest);
                    let seg = rest.get(..end.unwrap_or(rest.len())).unwrap_or_default();
                    match self.mode {
                        LineMode::Data if self.first_line_here => {
                            self.lazy = Some((i, i + seg.len()));
                            self.first_line_here = false;
                        }
                        LineMode::Data => self.data.push(seg),
                        LineMode::Raw => self.raw.feed(seg, st),
                        _ => {}
                    }
                    i += seg.len();
                    if let Some(k) = end {
                        self.end_line(input, st);
                        self.skip_lf = rest.get(k) == Some(&b'\r');
                        i += 1;
                    }
                }
            }
        }
        // Ranges of `input` do not outlive this call.
        self.materialize(input);
        self.first_line_here = false;
    }

    /// Copies lazily tracked data into the event buffer.
    fn materialize(&mut self, input: &[u8]) {
        if let Some((from, to)) = self.lazy.take() {
            self.data.push(input.get(from..to).unwrap_or_default());
        }
    }

    /// Handles one byte at the start of a line; returns how many bytes it consumed.
    fn start_byte(&mut self, b: u8, input: &[u8], st: &mut State) -> usize {
        if b == b'\n' || b == b'\r' {
            self.end_line(input, st);
            self.skip_lf = b == b'\r';
            return 1;
        }
        if self.prefix == 0 {
            if self.raw_active {
                // Inside raw JSON only a `data:` line can interrupt it.
                if b != b'd' {
                    self.mode = LineMode::Raw;
                    return 0;
                }
            } else if b == b'{' || b == b'[' {
                self.raw_active = true;
                self.mode = LineMode::Raw;
                return 0;
            } else if b == b' ' || b == b'\t' {
                self.lead_ws = true;
                return 1;
            } else if self.lead_ws {
                self.mode = LineMode::Ignore;
                return 0;
            }
        }
        if DATA_PREFIX.get(self.prefix) == Some(&b) {
            self.prefix += 1;
            if self.prefix == DATA_PREFIX.len() {
                self.begin_data(input);
                self.mode = LineMode::DataSpace;
            }
            return 1;
        }
        if self.raw_active {
            let matched = DATA_PREFIX.get(..self.prefix).unwrap_or_default();
            self.raw.feed(matched, st);
            self.mode = LineMode::Raw;
        } else {
            self.mode = LineMode::Ignore;
        }
        0
    }

    fn begin_data(&mut self, input: &[u8]) {
        if self.raw_active {
            // A broken raw object is abandoned when regular events resume.
            self.raw.reset();
            self.raw_active = false;
        }
        if self.has_data {
            self.materialize(input);
            self.data.push(b"\n");
        } else {
            self.first_line_here = true;
        }
        self.has_data = true;
    }

    fn end_line(&mut self, input: &[u8], st: &mut State) {
        match self.mode {
            LineMode::Start => {
                if self.prefix == 0 && !self.lead_ws {
                    self.dispatch(input, st);
                } else if self.prefix == DATA_PREFIX.len() - 1 && !self.raw_active {
                    // A bare `data` line is a data field with an empty value.
                    self.begin_data(input);
                    self.first_line_here = false;
                }
            }
            LineMode::Raw => {
                self.raw.line_end(st);
                if self.raw.depth == 0 {
                    self.raw.reset();
                    self.raw_active = false;
                }
            }
            LineMode::DataSpace | LineMode::Data | LineMode::Ignore => {}
        }
        self.mode = LineMode::Start;
        self.prefix = 0;
        self.lead_ws = false;
    }

    fn dispatch(&mut self, input: &[u8], st: &mut State) {
        if !self.has_data {
            return;
        }
        match self.lazy.take() {
            Some((from, to)) => st.dispatch(input.get(from..to).unwrap_or_default()),
            None => self.data.finish(st, true),
        }
        self.has_data = false;
        self.first_line_here = false;
    }

    /// The data of an event not yet terminated by a blank line, if it looks complete.
    pub(super) fn pending_event(&self) -> Option<&[u8]> {
        if !self.has_data || self.data.overflowed {
            return None;
        }
        let d = self.data.bytes.trim_ascii();
        (d.last() == Some(&b'}') || d == b"[DONE]").then_some(d)
    }
}
