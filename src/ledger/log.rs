//! The record log: every usage record, appended once to segment files and never rewritten
//! (but for erasure, which blanks a record in place).
//!
//! Records live here rather than in sled because sled replays everything written since its
//! last open when it starts: with millions of 1 KB records, a restart took minutes. A segment
//! log costs one sequential write and one `fdatasync` per batch, and a restart reads only the
//! tail written after the aggregates last reached disk (see [`super::store`]).
//!
//! A position is a byte offset in one address space over all segments: a segment file is named
//! by the position of its first byte, and the next segment starts where the previous one ends.
//! Each frame links to the previous record of the same user and of the same user and type, so
//! a user's history is read newest first by following links, never by scanning.
//!
//! Frame (little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0 | type: 1 record, 2 erased |
//! | 1 | flags: 1 when the payload ends with a day block ([`DAY_BLOCK`] bytes) |
//! | 2..4 | zero |
//! | 4..8 | payload length |
//! | 8..12 | record length (the record's JSON; then its alerts' JSON, then the day block if any) |
//! | 12..16 | CRC-32 of bytes 0..12 and 16..40 and of the payload |
//! | 16..24 | position of the user's previous record (`NONE` if none) |
//! | 24..32 | position of the user's previous record of the same type |
//! | 32..40 | created at, Unix milliseconds |
//! | 40.. | payload |
//! | last 4 | length of the whole frame (to walk backwards) |

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

mod append;
mod frame;
mod read;
#[cfg(test)]
mod tests;

pub use append::Appender;
pub use frame::{Frame, Links};

use frame::crc;
use read::{SeqReader, Step, read_in};

/// "No position": the end of a chain.
pub const NONE: u64 = u64::MAX;
/// Bytes before the payload.
pub const HEADER: usize = 40;
/// Bytes after the payload.
pub const TRAILER: usize = 4;
const TYPE_RECORD: u8 = 1;
const TYPE_ERASED: u8 = 2;
/// A new segment is started past this size (and at each new month, so retention can drop whole
/// files).
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Size of the optional block at the end of a payload: what the store keeps there (a user's
/// running totals of the day) is opaque to the log.
pub const DAY_BLOCK: usize = 64;
/// Largest payload accepted (a record with its alerts is a few KB at most).
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// Errors of the record log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file system failed.
    #[error("record log I/O at {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A frame failed its checks where a frame was expected.
    #[error("record log corrupt at position {0}")]
    Corrupt(u64),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    start: u64,
    path: PathBuf,
    file: File,
    /// Bytes written and synced (readers never look past this).
    len: AtomicU64,
}

struct WriterState {
    /// The segment appended to.
    active: Arc<Segment>,
    /// The month (`YYYYMM`) of the active segment's records; 0 when unknown.
    month: u32,
    /// What was written since the last sync, oldest first: the segment, the offset and the
    /// bytes (kept to be written again if a sync fails, see [`sync_unsynced`]).
    unsynced: Vec<(Arc<Segment>, u64, Vec<u8>)>,
}

/// The record log.
pub struct RecordLog {
    dir: PathBuf,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    writer: Mutex<WriterState>,
    /// End of the frames whose aggregates are applied: what readers may see.
    visible: AtomicU64,
}

impl std::fmt::Debug for RecordLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.seg"))
}

fn open_segment(dir: &Path, start: u64, create: bool) -> Result<Segment, LogError> {
    let path = segment_path(dir, start);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    let len = file.metadata().map_err(io(&path))?.len();
    Ok(Segment {
        start,
        path,
        file,
        len: AtomicU64::new(len),
    })
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl RecordLog {
    /// Opens (or creates) the log in `dir`. Nothing is visible until [`RecordLog::recover`].
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut segments = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name();
            let Some(start) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            segments.insert(start, Arc::new(open_segment(dir, start, false)?));
        }
        if segments.is_empty() {
            segments.insert(0, Arc::new(open_segment(dir, 0, true)?));
            sync_dir(dir)?;
        }
        let active = segments.values().next_back().cloned().ok_or(LogError::Corrupt(0))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            segments: RwLock::new(segments),
            writer: Mutex::new(WriterState {
                active,
                month: 0,
                unsynced: Vec::new(),
            }),
            visible: AtomicU64::new(0),
        })
    }

    fn segments(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<Segment>>> {
        // Plain map updates cannot be left half done by a panic.
        self.segments.read().unwrap_or_else(|p| p.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, WriterState> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The position of the oldest byte still on disk.
    pub fn first(&self) -> u64 {
        self.segments().keys().next().copied().unwrap_or(0)
    }

    /// The end of what readers see (frames whose aggregates are applied).
    pub fn visible(&self) -> u64 {
        self.visible.load(Ordering::Acquire)
    }

    /// Makes frames up to `end` visible.
    pub fn set_visible(&self, end: u64) {
        self.visible.store(end, Ordering::Release);
    }

    /// Reads frames from `from` to the end, calling `each` for every valid one in order, and
    /// cuts the log after the last valid frame of the newest segment (a write torn by a crash).
    /// A bad frame in an older segment (which was complete when the next one began) is logged
    /// and the rest of that segment skipped. Returns the end of the log.
    pub fn recover(&self, from: u64, mut each: impl FnMut(&Frame) -> Result<(), LogError>) -> Result<u64, LogError> {
        let segs: Vec<Arc<Segment>> = self.segments().values().cloned().collect();
        let last = segs.last().map(|s| s.start).unwrap_or(0);
        let mut last_month = 0;
        for seg in segs
            .iter()
            .filter(|s| s.start + s.len.load(Ordering::Acquire) > from || s.start == last)
        {
            let file_len = seg.len.load(Ordering::Acquire);
            let begin = from.saturating_sub(seg.start).min(file_len);
            let mut good = begin;
            let mut reader = SeqReader::new(seg.clone(), begin, file_len);
            loop {
                match reader.next_frame()? {
                    Step::Frame(f) => {
                        good = f.end() - seg.start;
                        last_month = month_of_ms(f.links.created_ms);
                        each(&f)?;
                    }
                    Step::End => break,
                    Step::Bad(at) => {
                        if seg.start == last {
                            tracing::warn!(
                                position = at,
                                cut = file_len - good,
                                "record log: cutting a torn write at the end"
                            );
                            seg.file.set_len(good).map_err(io(&seg.path))?;
                            seg.file.sync_all().map_err(io(&seg.path))?;
                            seg.len.store(good, Ordering::Release);
                        } else {
                            tracing::error!(
                                position = at,
                                "record log: corrupt frame; the rest of its segment is skipped"
                            );
                        }
                        break;
                    }
                }
            }
        }
        let mut w = self.writer();
        if last_month == 0 {
            last_month = self.last_month_of(&w.active)?;
        }
        w.month = last_month;
        let end = w.active.start + w.active.len.load(Ordering::Acquire);
        drop(w);
        self.set_visible(end);
        Ok(end)
    }

    /// The month of the last frame of a segment (0 when empty or unreadable).
    fn last_month_of(&self, seg: &Arc<Segment>) -> Result<u32, LogError> {
        let len = seg.len.load(Ordering::Acquire);
        if len == 0 {
            return Ok(0);
        }
        Ok(self
            .read_before_in(seg, seg.start + len)?
            .map(|f| month_of_ms(f.links.created_ms))
            .unwrap_or(0))
    }

    fn segment_of(&self, pos: u64) -> Option<Arc<Segment>> {
        self.segments().range(..=pos).next_back().map(|(_, s)| s.clone())
    }

    /// Reads the frame at `pos`. `None` when there is no frame there (past the visible end, in
    /// a dropped segment, or not a frame boundary: a forged cursor).
    pub fn read(&self, pos: u64) -> Result<Option<Frame>, LogError> {
        if pos == NONE || pos >= self.visible() {
            return Ok(None);
        }
        let Some(seg) = self.segment_of(pos) else {
            return Ok(None);
        };
        read_in(&seg, pos)
    }

    /// Reads the frame at `pos` among every frame written, applied or not: for a user's own
    /// reads, which start from the chain heads the writer keeps (see the store). `None` as
    /// for [`RecordLog::read`], past the written end too.
    pub fn read_written(&self, pos: u64) -> Result<Option<Frame>, LogError> {
        if pos == NONE {
            return Ok(None);
        }
        let Some(seg) = self.segment_of(pos) else {
            return Ok(None);
        };
        read_in(&seg, pos)
    }

    /// Reads the frame that ends at `pos` (walking backwards), crossing into the previous
    /// segment at a segment's start.
    pub fn read_before(&self, pos: u64) -> Result<Option<Frame>, LogError> {
        let mut cur = pos.min(self.visible());
        loop {
            if cur == 0 {
                return Ok(None);
            }
            let Some(seg) = self.segment_of(cur - 1) else {
                return Ok(None);
            };
            // Past a segment's end lies a newer segment or a gap left by a crash mid-roll.
            cur = cur.min(seg.start + seg.len.load(Ordering::Acquire));
            if cur == seg.start {
                // An empty segment: the frame is in an older one.
                continue;
            }
            return self.read_before_in(&seg, cur);
        }
    }

    fn read_before_in(&self, seg: &Arc<Segment>, end: u64) -> Result<Option<Frame>, LogError> {
        let off = end - seg.start;
        if off < (HEADER + TRAILER) as u64 {
            return Ok(None);
        }
        let mut t = [0u8; 4];
        seg.file.read_exact_at(&mut t, off - 4).map_err(io(&seg.path))?;
        let total = u32::from_le_bytes(t) as u64;
        if total > off || total < (HEADER + TRAILER) as u64 {
            return Err(LogError::Corrupt(end));
        }
        read_in(seg, end - total)?
            .map(Some)
            .ok_or(LogError::Corrupt(end - total))
    }

    /// Calls `each` with every frame from `from` up to `to` (capped at the visible end), oldest
    /// first, reading sequentially; stops when `each` returns false.
    pub fn scan(&self, from: u64, to: u64, mut each: impl FnMut(&Frame) -> bool) -> Result<(), LogError> {
        let to = to.min(self.visible());
        let segs: Vec<Arc<Segment>> = self.segments().values().cloned().collect();
        for seg in segs {
            let len = seg.len.load(Ordering::Acquire);
            if seg.start + len <= from || seg.start >= to {
                continue;
            }
            let begin = from.saturating_sub(seg.start);
            let stop = (to - seg.start).min(len);
            let mut reader = SeqReader::new(seg.clone(), begin, stop);
            loop {
                match reader.next_frame()? {
                    Step::Frame(f) => {
                        if !each(&f) {
                            return Ok(());
                        }
                    }
                    Step::End => break,
                    Step::Bad(at) => return Err(LogError::Corrupt(at)),
                }
            }
        }
        Ok(())
    }

    /// Blanks the record at `pos` in place: its payload is zeroed and its type set to erased,
    /// its links kept (other chains run through it). Call [`RecordLog::sync`] after a run.
    pub fn erase(&self, pos: u64) -> Result<bool, LogError> {
        let Some(seg) = self.segment_of(pos) else {
            return Ok(false);
        };
        let Some(f) = read_in(&seg, pos)? else {
            return Err(LogError::Corrupt(pos));
        };
        if f.erased {
            return Ok(false);
        }
        let mut bytes = vec![0u8; HEADER + f.payload.len()];
        bytes[0] = TYPE_ERASED;
        bytes[4..8].copy_from_slice(&(f.payload.len() as u32).to_le_bytes());
        bytes[8..12].copy_from_slice(&(f.payload.len() as u32).to_le_bytes());
        bytes[16..24].copy_from_slice(&f.links.prev_user.to_le_bytes());
        bytes[24..32].copy_from_slice(&f.links.prev_kind.to_le_bytes());
        bytes[32..40].copy_from_slice(&f.links.created_ms.to_le_bytes());
        let sum = crc(&bytes[..HEADER], &bytes[HEADER..]);
        bytes[12..16].copy_from_slice(&sum.to_le_bytes());
        seg.file.write_all_at(&bytes, pos - seg.start).map_err(io(&seg.path))?;
        Ok(true)
    }

    /// Syncs every segment to disk (after erasures).
    pub fn sync(&self) -> Result<(), LogError> {
        for seg in self.segments().values() {
            seg.file.sync_data().map_err(io(&seg.path))?;
        }
        Ok(())
    }

    /// The segments as (start, end), oldest first.
    pub fn segment_ranges(&self) -> Vec<(u64, u64)> {
        self.segments()
            .values()
            .map(|s| (s.start, s.start + s.len.load(Ordering::Acquire)))
            .collect()
    }

    /// True when `start` is the segment being appended to.
    pub fn is_active(&self, start: u64) -> bool {
        self.writer().active.start == start
    }

    /// Deletes a whole segment (never the active one). Readers holding it finish their read.
    pub fn drop_segment(&self, start: u64) -> Result<bool, LogError> {
        if self.is_active(start) {
            return Ok(false);
        }
        let seg = self.segments.write().unwrap_or_else(|p| p.into_inner()).remove(&start);
        if let Some(seg) = seg {
            std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
            sync_dir(&self.dir)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Bytes of all segments.
    pub fn size_on_disk(&self) -> u64 {
        self.segments().values().map(|s| s.len.load(Ordering::Acquire)).sum()
    }
}

fn month_of_ms(ms: i64) -> u32 {
    use chrono::{Datelike, TimeZone, Utc};
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.year().max(0) as u32 * 100 + t.month(),
        None => 0,
    }
}
