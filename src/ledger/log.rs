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
    payload: Vec<u8>,
    record_len: usize,
    day_len: usize,
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

fn crc(head: &[u8], payload: &[u8]) -> u32 {
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

fn encode_frame(out: &mut Vec<u8>, links: Links, record: &[u8], alerts: &[u8], day: Option<&[u8; DAY_BLOCK]>) {
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
fn parse_header(head: &[u8]) -> Option<(u8, usize, usize, usize, Links)> {
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
fn decode_frame(pos: u64, bytes: &[u8]) -> Option<Frame> {
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

struct WriterState {
    /// The segment appended to.
    active: Arc<Segment>,
    /// The month (`YYYYMM`) of the active segment's records; 0 when unknown.
    month: u32,
    /// What was written since the last sync, oldest first: the segment, the offset and the
    /// bytes (kept to be written again if a sync fails, see [`sync_unsynced`]).
    unsynced: Vec<(Arc<Segment>, u64, Vec<u8>)>,
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

    /// Syncs what [`Appender::write`] wrote since the last sync.
    pub fn sync_written(&self) -> Result<(), LogError> {
        sync_unsynced(&mut self.writer())
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

fn read_in(seg: &Arc<Segment>, pos: u64) -> Result<Option<Frame>, LogError> {
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

enum Step {
    Frame(Frame),
    End,
    /// No valid frame at this position.
    Bad(u64),
}

/// Reads a segment's frames in order through a 1 MiB buffer.
struct SeqReader {
    seg: Arc<Segment>,
    /// Offset in the file of `buf[at]`.
    off: u64,
    stop: u64,
    buf: Vec<u8>,
    at: usize,
}

impl SeqReader {
    fn new(seg: Arc<Segment>, begin: u64, stop: u64) -> Self {
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

    fn next_frame(&mut self) -> Result<Step, LogError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn links(prev: u64, ms: i64) -> Links {
        Links {
            prev_user: prev,
            prev_kind: prev,
            created_ms: ms,
        }
    }

    const NOV: i64 = 1_795_000_000_000; // 2026-11
    const DEC: i64 = 1_797_000_000_000; // 2026-12

    #[test]
    fn a_batch_that_is_not_written_leaves_the_log_as_it_was_and_a_retry_lands_in_the_same_place() {
        let dir = tempfile::tempdir().unwrap();
        let log = RecordLog::open(dir.path()).unwrap();
        log.recover(0, |_| Ok(())).unwrap();
        let mut a = log.append();
        let p0 = a.push(links(NONE, NOV), b"{\"n\":0}", b"", None).unwrap();
        a.commit().unwrap();
        drop(a);
        let push_batch = |a: &mut Appender<'_>| {
            let p1 = a.push(links(p0, NOV), b"{\"n\":1}", b"", None).unwrap();
            // A new month: the batch starts a segment.
            let p2 = a.push(links(p1, DEC), b"{\"n\":2}", b"", None).unwrap();
            (p1, p2)
        };
        let mut a = log.append();
        let first = push_batch(&mut a);
        assert_eq!(log.segment_ranges().len(), 2);
        drop(a); // failed before (or while) writing
        assert_eq!(log.segment_ranges().len(), 1);
        let mut a = log.append();
        let again = push_batch(&mut a);
        let end = a.commit().unwrap();
        drop(a);
        assert_eq!(again, first);
        log.set_visible(end);
        drop(log);
        let log = RecordLog::open(dir.path()).unwrap();
        let mut seen = Vec::new();
        let recovered = log.recover(0, |f| {
            seen.push(f.record().to_vec());
            Ok(())
        });
        assert_eq!(recovered.unwrap(), end);
        assert_eq!(seen, [&b"{\"n\":0}"[..], b"{\"n\":1}", b"{\"n\":2}"]);
        assert_eq!(log.segment_ranges().len(), 2);
    }

    #[test]
    fn append_read_walk_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = RecordLog::open(dir.path()).unwrap();
        assert_eq!(log.recover(0, |_| Ok(())).unwrap(), 0);
        let mut a = log.append();
        let p0 = a.push(links(NONE, NOV), b"{\"n\":0}", b"", None).unwrap();
        let p1 = a.push(links(p0, NOV), b"{\"n\":1}", b"[1]", None).unwrap();
        // A new month starts a new segment.
        let p2 = a.push(links(p1, DEC), b"{\"n\":2}", b"", None).unwrap();
        let end = a.commit().unwrap();
        drop(a);
        // Nothing is visible until the aggregates are applied.
        assert!(log.read(p0).unwrap().is_none());
        log.set_visible(p2);
        assert_eq!(log.read(p0).unwrap().map(|f| f.end()), Some(p1));
        assert!(log.read(p2).unwrap().is_none());
        log.set_visible(end);
        let f2 = log.read(p2).unwrap().unwrap();
        assert_eq!(f2.record(), b"{\"n\":2}");
        assert_eq!(f2.links.prev_user, p1);
        assert_eq!(log.segment_ranges().len(), 2);
        let f1 = log.read(p1).unwrap().unwrap();
        assert_eq!((f1.record(), f1.alerts()), (&b"{\"n\":1}"[..], &b"[1]"[..]));
        // Backwards across the segment boundary.
        assert_eq!(log.read_before(end).unwrap().unwrap().pos, p2);
        assert_eq!(log.read_before(p2).unwrap().unwrap().pos, p1);
        assert_eq!(log.read_before(p1).unwrap().unwrap().pos, p0);
        assert!(log.read_before(p0).unwrap().is_none());
        // A position inside a frame is no frame.
        assert!(log.read(p0 + 3).unwrap().is_none());
        let mut seen = vec![];
        log.scan(0, u64::MAX, |f| {
            seen.push(f.pos);
            true
        })
        .unwrap();
        assert_eq!(seen, vec![p0, p1, p2]);
        assert!(log.erase(p1).unwrap());
        log.sync().unwrap();
        drop(log);

        let log = RecordLog::open(dir.path()).unwrap();
        let mut seen = vec![];
        let end2 = log
            .recover(p1, |f| {
                seen.push((f.pos, f.erased));
                Ok(())
            })
            .unwrap();
        assert_eq!(end2, end);
        assert_eq!(seen, vec![(p1, true), (p2, false)]);
        // Appending continues in December's segment.
        let mut a = log.append();
        let p3 = a.push(links(p2, DEC), b"{}", b"", None).unwrap();
        assert_eq!(p3, end);
        a.commit().unwrap();
        drop(a);
        assert_eq!(log.segment_ranges().len(), 2);
    }

    #[test]
    fn torn_tail_is_cut_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        let log = RecordLog::open(dir.path()).unwrap();
        log.recover(0, |_| Ok(())).unwrap();
        let mut a = log.append();
        let p0 = a.push(links(NONE, NOV), b"{\"a\":1}", b"", None).unwrap();
        let p1 = a.push(links(p0, NOV), b"{\"b\":2}", b"", None).unwrap();
        let end = a.commit().unwrap();
        drop(a);
        drop(log);
        let path = segment_path(dir.path(), 0);
        let full = std::fs::read(&path).unwrap();
        for cut in p1 as usize..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let log = RecordLog::open(dir.path()).unwrap();
            let mut n = 0;
            let got = log
                .recover(0, |_| {
                    n += 1;
                    Ok(())
                })
                .unwrap();
            assert_eq!((got, n), (p1, 1), "cut at {cut}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), p1);
        }
        // Garbage appended after good frames is cut too; good frames survive.
        let mut bad = full.clone();
        bad.extend_from_slice(&[1, 0, 0, 0, 9, 9, 9]);
        std::fs::write(&path, &bad).unwrap();
        let log = RecordLog::open(dir.path()).unwrap();
        assert_eq!(log.recover(0, |_| Ok(())).unwrap(), end);
    }
}
