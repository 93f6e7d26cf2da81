//! Compact storage for a million users: an append-only arena of slots addressed by `u32`, read
//! without a lock, and sharded hash indexes that hold only those `u32`s (the keys they are
//! looked up by live in the slots, so an index costs about 10 bytes per entry).

use std::sync::OnceLock;

use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};

const CHUNK_BITS: u32 = 14;
/// Slots per chunk (16,384): the most an arena over-allocates.
const CHUNK: usize = 1 << CHUNK_BITS;
/// Chunks an arena can hold: 4,096 * 16,384 = 67 million slots. The directory is fixed (about
/// 100 KB) so that finding a chunk is one load, with no lock and no re-allocation to race with.
const MAX_CHUNKS: usize = 1 << 12;

/// The arena holds as many slots as it can address.
#[derive(Debug, thiserror::Error)]
#[error("the in-memory index is full ({} entries)", MAX_CHUNKS * CHUNK)]
pub struct Full;

type Chunk<T> = Box<[OnceLock<T>]>;

/// Append-only slots. A slot is written once and never moved or freed while the arena lives,
/// so readers need no lock and a `&T` stays valid as long as the arena.
pub struct Arena<T> {
    chunks: Box<[OnceLock<Chunk<T>>]>,
    next: Mutex<u32>,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Arena {
            chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect(),
            next: Mutex::new(0),
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Arena<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

fn split(idx: u32) -> (usize, usize) {
    ((idx >> CHUNK_BITS) as usize, idx as usize & (CHUNK - 1))
}

impl<T> Arena<T> {
    /// Stores a value and returns its index.
    pub fn push(&self, value: T) -> Result<u32, Full> {
        let mut next = self.next.lock();
        let idx = *next;
        let (c, o) = split(idx);
        let chunk = self
            .chunks
            .get(c)
            .ok_or(Full)?
            .get_or_init(|| (0..CHUNK).map(|_| OnceLock::new()).collect());
        // Indexes are handed out under `next`'s lock, so the slot is empty.
        chunk.get(o).ok_or(Full)?.set(value).map_err(|_| Full)?;
        *next = idx + 1;
        Ok(idx)
    }

    /// The value at `idx`, if one was stored there.
    pub fn get(&self, idx: u32) -> Option<&T> {
        let (c, o) = split(idx);
        self.chunks.get(c)?.get()?.get(o)?.get()
    }

    /// Number of slots used.
    pub fn len(&self) -> u32 {
        *self.next.lock()
    }
}

const SHARDS: usize = 64;

/// A hash index of slot numbers, in shards so that writers block few readers. The caller
/// supplies the hash of what it looks up and how to compare a slot with it.
pub struct Index {
    shards: [RwLock<HashTable<u32>>; SHARDS],
}

impl Default for Index {
    fn default() -> Self {
        Index {
            shards: std::array::from_fn(|_| RwLock::new(HashTable::new())),
        }
    }
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").finish_non_exhaustive()
    }
}

impl Index {
    // The table inside a shard sees the hash's low bits (bucket) and top 7 bits (tag); the shard
    // takes bits in between, so the three stay independent.
    fn shard(&self, hash: u64) -> &RwLock<HashTable<u32>> {
        &self.shards[(hash >> 32) as usize % SHARDS]
    }

    /// The slot whose entry `eq` accepts.
    pub fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        self.shard(hash).read().find(hash, |&i| eq(i)).copied()
    }

    /// Adds `slot` unless `eq` accepts a slot already there (returned as `Err`). `rehash` gives
    /// the hash of any slot in the index (used when the table grows).
    pub fn insert(
        &self,
        hash: u64,
        slot: u32,
        mut eq: impl FnMut(u32) -> bool,
        rehash: impl Fn(u32) -> u64,
    ) -> Result<(), u32> {
        let mut t = self.shard(hash).write();
        if let Some(&old) = t.find(hash, |&i| eq(i)) {
            return Err(old);
        }
        t.insert_unique(hash, slot, |&i| rehash(i));
        Ok(())
    }

    /// Removes and returns the slot `eq` accepts.
    pub fn remove(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let mut t = self.shard(hash).write();
        match t.find_entry(hash, |&i| eq(i)) {
            Ok(e) => Some(e.remove().0),
            Err(_) => None,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_spans_chunks_and_index_finds_by_content() {
        let a: Arena<String> = Arena::default();
        let n = CHUNK as u32 + 10;
        for i in 0..n {
            assert_eq!(a.push(format!("v{i}")).unwrap(), i);
        }
        assert_eq!(a.get(CHUNK as u32 + 3).map(String::as_str), Some("v16387"));
        assert!(a.get(n).is_none());
        let idx = Index::default();
        let h = |s: &str| {
            s.bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)) << 3)
        };
        let rehash = |i: u32| h(a.get(i).unwrap());
        for i in 0..n {
            let v = a.get(i).unwrap();
            idx.insert(h(v), i, |j| a.get(j).unwrap() == v, rehash).unwrap();
        }
        assert_eq!(idx.insert(h("v5"), 99, |j| a.get(j).unwrap() == "v5", rehash), Err(5));
        assert_eq!(idx.find(h("v16387"), |j| a.get(j).unwrap() == "v16387"), Some(16387));
        assert_eq!(idx.remove(h("v5"), |j| a.get(j).unwrap() == "v5"), Some(5));
        assert_eq!(idx.find(h("v5"), |j| a.get(j).unwrap() == "v5"), None);
        assert_eq!(idx.len(), n as usize - 1);
    }
}
