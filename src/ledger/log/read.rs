//! Reading frames: one at a position, and a segment's frames in order.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::frame::{decode_frame, parse_header};
use super::{Frame, HEADER, LogError, Segment, TRAILER, io};

pub(super) fn read_in(seg: &Arc<Segment>, pos: u64) -> Result<Option<Frame>, LogError> {
    let Some(off) = pos.checked_sub(seg.start) else {
        return Ok(None);
    };
    let len = seg.len.load(Ordering::Acquire);
    if off + (HEADER + TRAILER) as u64 > len {
        return Ok(None);
    }
    // Most records are well under 2 KB: one read usually gets the whole frame.
    let first = (len - off).min(2048) as usize;
    let mut buf = vec![0u8; first];
    seg.file.read_exact_at(&mut buf, off).map_err(io(&seg.path))?;
    let Some((_, payload_len, _, _, _)) = parse_header(&buf) else {
        return Ok(None);
    };
    let total = HEADER + payload_len + TRAILER;
    if off + total as u64 > len {
        return Ok(None);
    }
    if total > buf.len() {
        let have = buf.len();
        buf.resize(total, 0);
        seg.file
            .read_exact_at(&mut buf[have..], off + have as u64)
            .map_err(io(&seg.path))?;
    }
    Ok(decode_frame(pos, &buf[..total]))
}

pub(super) enum Step {
    Frame(Frame),
    End,
    /// No valid frame at this position.
    Bad(u64),
}

/// Reads a segment's frames in order through a 1 MiB buffer.
pub(super) struct SeqReader {
    seg: Arc<Segment>,
    /// Offset in the file of `buf[at]`.
    off: u64,
    stop: u64,
    buf: Vec<u8>,
    at: usize,
}

impl SeqReader {
    pub(super) fn new(seg: Arc<Segment>, begin: u64, stop: u64) -> Self {
        Self {
            seg,
            off: begin,
            stop,
            buf: Vec::new(),
            at: 0,
        }
    }

    /// Makes at least `n` bytes available at `at` (fewer at the end of the range).
    fn fill(&mut self, n: usize) -> Result<usize, LogError> {
        let avail = self.buf.len() - self.at;
        if avail >= n {
            return Ok(avail);
        }
        self.buf.drain(..self.at);
        self.off += self.at as u64;
        self.at = 0;
        let file_pos = self.off + self.buf.len() as u64;
        let left = self.stop.saturating_sub(file_pos);
        let want = (n.max(1 << 20) - self.buf.len()).min(left as usize);
        if want > 0 {
            let have = self.buf.len();
            self.buf.resize(have + want, 0);
            self.seg
                .file
                .read_exact_at(&mut self.buf[have..], file_pos)
                .map_err(io(&self.seg.path))?;
        }
        Ok(self.buf.len())
    }

    pub(super) fn next_frame(&mut self) -> Result<Step, LogError> {
        let pos = self.seg.start + self.off + self.at as u64;
        let avail = self.fill(HEADER)?;
        if avail == 0 {
            return Ok(Step::End);
        }
        if avail < HEADER {
            return Ok(Step::Bad(pos));
        }
        let Some((_, payload_len, _, _, _)) = parse_header(&self.buf[self.at..]) else {
            return Ok(Step::Bad(pos));
        };
        let total = HEADER + payload_len + TRAILER;
        if self.fill(total)? < total {
            return Ok(Step::Bad(pos));
        }
        match decode_frame(pos, &self.buf[self.at..self.at + total]) {
            Some(f) => {
                self.at += total;
                Ok(Step::Frame(f))
            }
            None => Ok(Step::Bad(pos)),
        }
    }
}
