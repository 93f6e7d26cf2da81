//! Appending: batches of frames written at the end of the log, and their sync.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use super::frame::encode_frame;
use super::{
    DAY_BLOCK, HEADER, Links, LogError, RecordLog, SEGMENT_BYTES, Segment, TRAILER, WriterState, io, month_of_ms,
    open_segment, sync_dir,
};

impl RecordLog {
    /// Starts a batch of appends. Only the recorder appends, so this never waits in practice.
    pub fn append(&self) -> Appender<'_> {
        let w = self.writer();
        let pos = w.active.start + w.active.len.load(Ordering::Acquire);
        let began = (w.active.clone(), w.month);
        Appender {
            log: self,
            w,
            pos,
            parts: Vec::new(),
            began,
            written: false,
        }
    }

    fn roll(&self, w: &mut WriterState, start: u64) -> Result<(), LogError> {
        let seg = Arc::new(open_segment(&self.dir, start, true)?);
        sync_dir(&self.dir)?;
        self.segments
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(start, seg.clone());
        w.active = seg;
        Ok(())
    }

    /// Syncs what [`Appender::write`] wrote since the last sync.
    pub fn sync_written(&self) -> Result<(), LogError> {
        sync_unsynced(&mut self.writer())
    }
}

/// Syncs the segments written since the last sync, oldest first (a crash mid-way then keeps a
/// prefix of the log). After a failed fsync the kernel may have dropped the dirty pages and
/// report the next fsync clean, so the unsynced bytes are written again before the error is
/// returned: the retry then syncs them for real.
fn sync_unsynced(w: &mut WriterState) -> Result<(), LogError> {
    let mut done: Vec<*const Segment> = Vec::with_capacity(2);
    for (seg, _, _) in &w.unsynced {
        if done.contains(&Arc::as_ptr(seg)) {
            continue;
        }
        if let Err(e) = seg.file.sync_data() {
            for (s, off, bytes) in &w.unsynced {
                let _ = s.file.write_all_at(bytes, *off);
            }
            return Err(io(&seg.path)(e));
        }
        done.push(Arc::as_ptr(seg));
    }
    w.unsynced.clear();
    Ok(())
}

/// A batch of frames being appended; nothing is on disk until [`Appender::write`] (or
/// [`Appender::commit`]), nor visible before [`RecordLog::set_visible`].
pub struct Appender<'a> {
    log: &'a RecordLog,
    w: MutexGuard<'a, WriterState>,
    /// Position of the next frame.
    pos: u64,
    /// Bytes per segment, in order.
    parts: Vec<(Arc<Segment>, Vec<u8>)>,
    /// The active segment and its month when the batch began (restored if it is not written).
    began: (Arc<Segment>, u32),
    /// Set once the batch is written.
    written: bool,
}

impl Drop for Appender<'_> {
    /// A batch that was not written leaves the log as it found it: the segments it started are
    /// removed and the one it began in is cut back to its length. A retry then lays the batch
    /// out at the same positions again; without this, frames written to a segment before a
    /// failure in the next one would be found past its length at the next start and applied
    /// a second time.
    fn drop(&mut self) {
        if self.written {
            return;
        }
        let (seg, month) = self.began.clone();
        if !Arc::ptr_eq(&seg, &self.w.active) {
            let mut map = self.log.segments.write().unwrap_or_else(|p| p.into_inner());
            let started: Vec<u64> = map.range(seg.start + 1..).map(|(k, _)| *k).collect();
            for start in started {
                if let Some(s) = map.remove(&start)
                    && let Err(e) = std::fs::remove_file(&s.path)
                {
                    tracing::error!(path = %s.path.display(), error = %e, "record log: cannot remove a segment an unwritten batch started");
                }
            }
            drop(map);
            let _ = sync_dir(&self.log.dir);
            self.w.active = seg.clone();
            self.w.month = month;
        }
        if let Err(e) = seg.file.set_len(seg.len.load(Ordering::Acquire)) {
            tracing::error!(path = %seg.path.display(), error = %e, "record log: cannot cut an unwritten batch");
        }
    }
}

impl Appender<'_> {
    /// Adds a record; returns its position. Starts a new segment at a new month or when the
    /// active one is full.
    pub fn push(
        &mut self,
        links: Links,
        record: &[u8],
        alerts: &[u8],
        day: Option<&[u8; DAY_BLOCK]>,
    ) -> Result<u64, LogError> {
        let month = month_of_ms(links.created_ms);
        let active_len = self.pos - self.w.active.start;
        if active_len > 0 && (active_len >= SEGMENT_BYTES || (self.w.month != 0 && month != self.w.month)) {
            let start = self.pos;
            self.log.roll(&mut self.w, start)?;
        }
        if self.pos == self.w.active.start || self.w.month == 0 {
            // The first record of a segment sets its month.
            self.w.month = month;
        }
        let need_new_part = match self.parts.last() {
            Some((seg, _)) => !Arc::ptr_eq(seg, &self.w.active),
            None => true,
        };
        if need_new_part {
            self.parts.push((self.w.active.clone(), Vec::with_capacity(64 * 1024)));
        }
        let pos = self.pos;
        if let Some((_, buf)) = self.parts.last_mut() {
            encode_frame(buf, links, record, alerts, day);
            self.pos += (HEADER + record.len() + alerts.len() + day.map_or(0, |d| d.len()) + TRAILER) as u64;
        }
        Ok(pos)
    }

    /// Writes the batch, not synced: it survives a crash of the process, and one of the
    /// machine once [`RecordLog::sync_written`] ran. On error the call can be repeated (writes
    /// are positional, so a retry rewrites the same bytes).
    pub fn write(&mut self) -> Result<u64, LogError> {
        for (seg, bytes) in &self.parts {
            let off = seg.len.load(Ordering::Acquire);
            seg.file.write_all_at(bytes, off).map_err(io(&seg.path))?;
        }
        for (seg, bytes) in self.parts.drain(..) {
            let off = seg.len.fetch_add(bytes.len() as u64, Ordering::AcqRel);
            self.w.unsynced.push((seg, off, bytes));
        }
        self.written = true;
        Ok(self.pos)
    }

    /// Writes and syncs the batch; on error the call can be repeated.
    pub fn commit(&mut self) -> Result<u64, LogError> {
        let end = self.write()?;
        sync_unsynced(&mut self.w)?;
        Ok(end)
    }
}
