//! Users and keys: an in-memory index over the sled trees, written through on every change.
//!
//! Sized for a million users (issue 3: under 300 bytes each, identify + admit under 1 µs).
//! Users and keys live in append-only arenas addressed by `u32`; three indexes map a key's
//! hash, a key id and a user id to those slots and hold nothing but the `u32`. A user's slot
//! holds what admission and settling need (tier, counters, token window, id); the email stays
//! in sled and is read on the admin and alert paths. A caller gets a [`KeyEntry`], two `u32`s
//! that are copied, not reference-counted, so the hot path writes no shared counter.
//!
//! Slots of deleted users and revoked keys are not reused: a request in flight may still settle
//! into its user's slot, which must not belong to someone else by then. A restart compacts.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::keys::{KeyHash, RandomError, generate_key, hash_key, looks_like_key, random_base62};
use super::slots::{Arena, Full, Index};
use crate::clock::{Month, rfc3339};
use crate::config::TierId;
use crate::ledger::{SledStore, StoreError, TokenWindow, Totals, UserUsage};

/// Errors of identity operations.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The user id is taken.
    #[error("user {0} already exists")]
    Exists(String),
    /// No such user.
    #[error("user {0} not found")]
    NoUser(String),
    /// No such key.
    #[error("key {0} not found")]
    NoKey(String),
    /// The id has the wrong shape.
    #[error("user id must be 1 to 64 characters of a-z A-Z 0-9 _ - .")]
    BadId,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No randomness.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// A stored user or key could not be read.
    #[error("corrupt identity record: {0}")]
    Corrupt(String),
    /// No room for another user or key.
    #[error(transparent)]
    Full(#[from] Full),
}

impl From<sled::Error> for IdentityError {
    fn from(e: sled::Error) -> Self {
        IdentityError::Store(StoreError::Sled(e))
    }
}

/// True for ids of 1 to 64 characters of `a-z A-Z 0-9 _ - .`.
pub fn valid_user_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A user id, inline when it is short (most are: no heap block, no pointer to chase).
#[derive(Debug)]
enum UserId {
    Inline { len: u8, bytes: [u8; 22] },
    Heap(Box<str>),
}

impl UserId {
    fn new(s: &str) -> Self {
        let mut bytes = [0u8; 22];
        match bytes.get_mut(..s.len()) {
            Some(b) => {
                b.copy_from_slice(s.as_bytes());
                UserId::Inline {
                    len: s.len() as u8,
                    bytes,
                }
            }
            None => UserId::Heap(Box::from(s)),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Copied from a `&str` whole, so always valid UTF-8.
            UserId::Inline { len, bytes } => {
                std::str::from_utf8(bytes.get(..usize::from(*len)).unwrap_or_default()).unwrap_or_default()
            }
            UserId::Heap(s) => s,
        }
    }
}

/// A user: what admission and settling need, kept small (one of a million in memory).
#[derive(Debug)]
pub struct User {
    id: UserId,
    /// Creation time in Unix seconds (what is stored; alerts tell incarnations of an id apart by it).
    created: i64,
    has_email: bool,
    tier: AtomicU16,
    deleted: AtomicBool,
    /// This month's counters.
    pub usage: UserUsage,
    /// Tokens-per-minute window.
    pub tpm: TokenWindow,
}

impl User {
    /// The user id.
    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The user id as a shared string (for records and events).
    pub fn id_arc(&self) -> Arc<str> {
        Arc::from(self.id())
    }

    /// The user's tier (changes apply to the next request).
    pub fn tier_id(&self) -> TierId {
        TierId::from_raw(self.tier.load(Ordering::Relaxed))
    }

    /// The user's tier name.
    pub fn tier(&self) -> Arc<str> {
        self.tier_id().name()
    }

    /// When the user was created (second precision, as stored).
    pub fn created_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.created, 0).unwrap_or_default()
    }

    /// When the user was created, in Unix seconds.
    pub fn created_unix(&self) -> i64 {
        self.created
    }

    /// True when the user has a non-empty email (the address itself: [`Registry::email`]).
    pub fn has_email(&self) -> bool {
        self.has_email
    }

    /// True once the user was deleted (a request in flight may still hold it).
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }
}

/// A key id held inline (`key_` and 16 characters; room for 23 bytes), not on the heap.
#[derive(Debug, Clone, Copy)]
struct KeyIdBuf {
    len: u8,
    bytes: [u8; 23],
}

impl KeyIdBuf {
    fn new(s: &str) -> Option<Self> {
        let mut bytes = [0u8; 23];
        bytes.get_mut(..s.len())?.copy_from_slice(s.as_bytes());
        Some(KeyIdBuf {
            len: s.len() as u8,
            bytes,
        })
    }

    fn as_str(&self) -> &str {
        // Copied from a `&str` whole, so always valid UTF-8.
        std::str::from_utf8(self.bytes.get(..usize::from(self.len)).unwrap_or_default()).unwrap_or_default()
    }
}

/// An active key's slot.
#[derive(Debug)]
struct KeySlot {
    hash: KeyHash,
    id: KeyIdBuf,
    user: u32,
    revoked: AtomicBool,
}

/// A key that was presented and found: which key, whose. Two slot numbers, copied freely;
/// [`Registry::user_of`] and [`Registry::key_id`] read the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEntry {
    user: u32,
    key: u32,
}

impl KeyEntry {
    /// Small numeric id for the per-key rate limiter.
    pub fn limiter_key(self) -> u32 {
        self.key
    }
}

/// The registry of users and keys.
#[derive(Debug)]
pub struct Registry {
    store: SledStore,
    users: Arena<User>,
    keys: Arena<KeySlot>,
    /// Key hash -> key slot. The hash is SHA-256, already uniform: its first 8 bytes are the
    /// table's hash as they are, with no second hash function.
    by_hash: Index,
    /// Key id -> key slot.
    by_key_id: Index,
    /// User id -> user slot.
    by_user_id: Index,
    hasher: RandomState,
    /// Serializes changes to users and keys that come from the shared store (cluster mode) with
    /// the admin writes that cause them, so a change is never applied twice at once.
    changes: tokio::sync::Mutex<()>,
}

/// A key as stored (never its plaintext): what cluster mode copies between replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// The key's public id.
    pub key_id: String,
    /// Its user.
    pub user_id: String,
    /// SHA-256 of the key, hex.
    pub hash: String,
    /// The first characters of the key, shown in lists.
    pub prefix: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A user as stored: what cluster mode copies between replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    /// The user id.
    pub id: String,
    /// The tier's name.
    pub tier: String,
    /// The email, if any.
    pub email: Option<String>,
    /// When the user was created (second precision).
    pub created_at: DateTime<Utc>,
}

fn user_json(id: &str, tier: &str, email: Option<&str>, created_at: DateTime<Utc>) -> Value {
    json!({"id": id, "tier": tier, "email": email, "created_at": rfc3339(created_at)})
}

fn parse_time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

/// A new key for `user_id`: its plaintext (shown once) and the row that is stored.
pub fn new_key(user_id: &str, now: DateTime<Utc>) -> Result<(String, KeyRow), IdentityError> {
    let key = generate_key()?;
    let row = KeyRow {
        key_id: format!("key_{}", random_base62(16)?),
        user_id: user_id.to_string(),
        hash: hex::encode(hash_key(&key)),
        prefix: key.get(..7).unwrap_or_default().to_string(),
        created_at: now,
        revoked_at: None,
    };
    Ok((key, row))
}

fn digest_hash(h: &KeyHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_le_bytes(b)
}

fn corrupt(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Corrupt(e.to_string())
}

impl Registry {
    fn empty(store: SledStore) -> Self {
        Registry {
            store,
            users: Arena::default(),
            keys: Arena::default(),
            by_hash: Index::default(),
            by_key_id: Index::default(),
            by_user_id: Index::default(),
            hasher: RandomState::new(),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    /// Loads users, active keys and the counters of `month` from the store.
    pub fn load(store: SledStore, month: Month) -> Result<Self, IdentityError> {
        let reg = Registry::empty(store.clone());
        let mut month_totals: std::collections::HashMap<String, Totals> =
            store.month_users(month)?.into_iter().collect();
        for kv in store.users().iter() {
            let (_, v) = kv?;
            let u: Value = serde_json::from_slice(&v).map_err(corrupt)?;
            let id = u["id"]
                .as_str()
                .ok_or_else(|| IdentityError::Corrupt("user id".into()))?;
            let tier = u["tier"].as_str().unwrap_or_default();
            let totals = month_totals.remove(id).unwrap_or_default();
            let has_email = u["email"].as_str().is_some_and(|e| !e.is_empty());
            let created = parse_time(&u["created_at"]).timestamp();
            reg.add_user(id, tier, has_email, created, UserUsage::loaded(month, totals))?;
        }
        for kv in store.keys().iter() {
            let (_, v) = kv?;
            let k: Value = serde_json::from_slice(&v).map_err(corrupt)?;
            if !k["revoked_at"].is_null() {
                continue;
            }
            let (Some(key_id), Some(user_id), Some(hash_hex)) =
                (k["key_id"].as_str(), k["user_id"].as_str(), k["hash"].as_str())
            else {
                return Err(IdentityError::Corrupt("key record".into()));
            };
            let mut hash = [0u8; 32];
            hex::decode_to_slice(hash_hex, &mut hash).map_err(corrupt)?;
            let Some(user) = reg.find_user(user_id) else {
                continue;
            };
            reg.index_key(key_id, hash, user)?;
        }
        Ok(reg)
    }

    fn str_hash(&self, s: &str) -> u64 {
        self.hasher.hash_one(s)
    }

    fn find_user(&self, id: &str) -> Option<u32> {
        self.by_user_id
            .find(self.str_hash(id), |i| self.users.get(i).is_some_and(|u| u.id() == id))
    }

    fn find_key_id(&self, key_id: &str) -> Option<u32> {
        self.by_key_id.find(self.str_hash(key_id), |i| {
            self.keys.get(i).is_some_and(|k| k.id.as_str() == key_id)
        })
    }

    /// Adds a user to the arena and the id index; `Exists` when the id is taken.
    fn add_user(
        &self,
        id: &str,
        tier: &str,
        has_email: bool,
        created: i64,
        usage: UserUsage,
    ) -> Result<u32, IdentityError> {
        let hash = self.str_hash(id);
        if self.find_user(id).is_some() {
            return Err(IdentityError::Exists(id.into()));
        }
        let slot = self.users.push(User {
            id: UserId::new(id),
            created,
            has_email,
            tier: AtomicU16::new(TierId::of(tier).raw()),
            deleted: AtomicBool::new(false),
            usage,
            tpm: TokenWindow::default(),
        })?;
        let inserted = self.by_user_id.insert(
            hash,
            slot,
            |i| self.users.get(i).is_some_and(|u| u.id() == id),
            |i| self.users.get(i).map_or(0, |u| self.str_hash(u.id())),
        );
        if inserted.is_err() {
            // Lost a race with a create of the same id: this slot stays unused.
            if let Some(u) = self.users.get(slot) {
                u.deleted.store(true, Ordering::Release);
            }
            return Err(IdentityError::Exists(id.into()));
        }
        Ok(slot)
    }

    fn index_key(&self, key_id: &str, hash: KeyHash, user: u32) -> Result<u32, IdentityError> {
        let id = KeyIdBuf::new(key_id).ok_or_else(|| IdentityError::Corrupt(format!("key id {key_id} too long")))?;
        let k = self.keys.push(KeySlot {
            hash,
            id,
            user,
            revoked: AtomicBool::new(false),
        })?;
        // Keys are 238-bit random strings: two with one hash do not happen; the index still
        // keeps the first if they did.
        let _ = self.by_hash.insert(
            digest_hash(&hash),
            k,
            |i| self.keys.get(i).is_some_and(|s| s.hash == hash),
            |i| self.keys.get(i).map_or(0, |s| digest_hash(&s.hash)),
        );
        let _ = self.by_key_id.insert(
            self.str_hash(key_id),
            k,
            |i| self.keys.get(i).is_some_and(|s| s.id.as_str() == key_id),
            |i| self.keys.get(i).map_or(0, |s| self.str_hash(s.id.as_str())),
        );
        Ok(k)
    }

    /// Takes a key out of both indexes; it stops working at once.
    fn unindex_key(&self, k: u32) {
        let Some(slot) = self.keys.get(k) else { return };
        slot.revoked.store(true, Ordering::Release);
        self.by_hash.remove(digest_hash(&slot.hash), |i| i == k);
        self.by_key_id.remove(self.str_hash(slot.id.as_str()), |i| i == k);
    }

    /// Finds the active key a caller presented. The hot path: one SHA-256, one probe of a
    /// table of `u32`s, no allocation, no shared counter written.
    pub fn identify(&self, key: &str) -> Option<KeyEntry> {
        if !looks_like_key(key) {
            return None;
        }
        let hash = hash_key(key);
        let k = self
            .by_hash
            .find(digest_hash(&hash), |i| self.keys.get(i).is_some_and(|s| s.hash == hash))?;
        let slot = self.keys.get(k)?;
        Some(KeyEntry {
            user: slot.user,
            key: k,
        })
    }

    /// True while a key is active (not revoked, its user not deleted).
    pub fn key_active(&self, key: KeyEntry) -> bool {
        self.keys
            .get(key.key)
            .is_some_and(|s| !s.revoked.load(Ordering::Acquire))
    }

    /// The active key with this id.
    pub fn entry_by_key_id(&self, key_id: &str) -> Option<KeyEntry> {
        let k = self.find_key_id(key_id)?;
        let slot = self.keys.get(k)?;
        Some(KeyEntry {
            user: slot.user,
            key: k,
        })
    }

    /// The public id of a key.
    pub fn key_id(&self, key: KeyEntry) -> &str {
        self.keys.get(key.key).map_or("", |s| s.id.as_str())
    }

    /// The user a key belongs to. `None` only for an entry of another registry.
    pub fn user_of(&self, key: KeyEntry) -> Option<&User> {
        self.users.get(key.user)
    }

    /// A user by id.
    pub fn user(&self, id: &str) -> Option<&User> {
        self.users.get(self.find_user(id)?)
    }

    /// Number of users.
    pub fn user_count(&self) -> usize {
        self.by_user_id.len()
    }

    /// A user's email, read from storage (the admin and alert paths; not kept in memory).
    pub fn email(&self, user: &User) -> Option<String> {
        if !user.has_email {
            return None;
        }
        let v = self.store.users().get(user.id().as_bytes()).ok()??;
        let j: Value = serde_json::from_slice(&v).ok()?;
        j["email"].as_str().map(str::to_string)
    }

    /// JSON view for the admin API.
    pub fn user_json(&self, user: &User) -> Value {
        let email = self.email(user);
        user_json(user.id(), &user.tier(), email.as_deref(), user.created_at())
    }

    /// Creates a user in `tier` (the caller checked that the tier exists).
    pub fn create_user(
        &self,
        id: &str,
        tier: &str,
        email: Option<&str>,
        now: DateTime<Utc>,
        month: Month,
    ) -> Result<&User, IdentityError> {
        if !valid_user_id(id) {
            return Err(IdentityError::BadId);
        }
        let has_email = email.is_some_and(|e| !e.is_empty());
        let usage = UserUsage::loaded(month, self.store.user_month(id, month)?);
        let slot = self.add_user(id, tier, has_email, now.timestamp(), usage)?;
        let json = user_json(id, tier, email, now);
        if let Err(e) = self.store.users().insert(id.as_bytes(), json.to_string().into_bytes()) {
            self.remove_user(id);
            return Err(e.into());
        }
        self.users.get(slot).ok_or_else(|| IdentityError::NoUser(id.into()))
    }

    /// Takes a user out of the id index and marks it deleted.
    fn remove_user(&self, id: &str) -> Option<u32> {
        let slot = self
            .by_user_id
            .remove(self.str_hash(id), |i| self.users.get(i).is_some_and(|u| u.id() == id))?;
        if let Some(u) = self.users.get(slot) {
            u.deleted.store(true, Ordering::Release);
        }
        Some(slot)
    }

    /// Changes a user's tier; applies to the next request.
    pub fn set_tier(&self, id: &str, tier: &str) -> Result<&User, IdentityError> {
        let user = self.user(id).ok_or_else(|| IdentityError::NoUser(id.into()))?;
        // The stored record keeps the email, which memory does not hold.
        let json = match self.store.users().get(id.as_bytes())? {
            Some(v) => {
                let mut j: Value = serde_json::from_slice(&v).map_err(corrupt)?;
                j["tier"] = Value::String(tier.to_string());
                j
            }
            None => user_json(id, tier, None, user.created_at()),
        };
        self.store
            .users()
            .insert(id.as_bytes(), json.to_string().into_bytes())?;
        user.tier.store(TierId::of(tier).raw(), Ordering::Relaxed);
        Ok(user)
    }

    /// Deletes a user and their keys (the caller deletes the usage through the recorder).
    /// Returns the ids of every key the user had, revoked ones included: the records of
    /// requests still in flight carry them.
    pub fn delete_user(&self, id: &str) -> Result<Vec<String>, IdentityError> {
        let slot = self.remove_user(id).ok_or_else(|| IdentityError::NoUser(id.into()))?;
        let prefix = format!("{id}/");
        let mut batch = sled::Batch::default();
        let mut key_ids = Vec::new();
        for kv in self.store.keys().scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            if let Ok(j) = serde_json::from_slice::<Value>(&v)
                && let Some(key_id) = j["key_id"].as_str()
            {
                key_ids.push(key_id.to_string());
                if let Some(key) = self.find_key_id(key_id)
                    && self.keys.get(key).is_some_and(|s| s.user == slot)
                {
                    self.unindex_key(key);
                }
            }
            batch.remove(k);
        }
        self.store.keys().apply_batch(batch)?;
        self.store.users().remove(id.as_bytes())?;
        Ok(key_ids)
    }

    /// Issues a new key for a user; the plaintext is returned once and never stored.
    pub fn create_key(&self, user_id: &str, now: DateTime<Utc>) -> Result<(String, String), IdentityError> {
        if self.find_user(user_id).is_none() {
            return Err(IdentityError::NoUser(user_id.into()));
        }
        let (key, row) = new_key(user_id, now)?;
        self.import_key(&row)?;
        Ok((key, row.key_id))
    }

    /// Stores a key as `row` has it and indexes it while it is active (a revoked one is taken
    /// out). Idempotent; a key revoked here stays revoked. The user must exist.
    pub fn import_key(&self, row: &KeyRow) -> Result<(), IdentityError> {
        let slot = self
            .find_user(&row.user_id)
            .ok_or_else(|| IdentityError::NoUser(row.user_id.clone()))?;
        let skey = format!("{}/{}", row.user_id, row.key_id);
        let mut revoked_at = row.revoked_at.map(rfc3339);
        if let Some(v) = self.store.keys().get(skey.as_bytes())? {
            let j: Value = serde_json::from_slice(&v).map_err(corrupt)?;
            if let Some(r) = j["revoked_at"].as_str() {
                revoked_at = Some(r.to_string());
            }
        }
        let rec = json!({
            "key_id": row.key_id,
            "user_id": row.user_id,
            "hash": row.hash,
            "prefix": row.prefix,
            "created_at": rfc3339(row.created_at),
            "revoked_at": revoked_at,
        });
        self.store
            .keys()
            .insert(skey.as_bytes(), rec.to_string().into_bytes())?;
        let indexed = self.find_key_id(&row.key_id);
        if revoked_at.is_some() {
            if let Some(k) = indexed {
                self.unindex_key(k);
            }
            return Ok(());
        }
        if indexed.is_some() {
            return Ok(());
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&row.hash, &mut hash).map_err(corrupt)?;
        let k = self.index_key(&row.key_id, hash, slot)?;
        if self.users.get(slot).is_none_or(User::is_deleted) {
            // The user was deleted meanwhile: the key must not outlive them.
            self.unindex_key(k);
            return Err(IdentityError::NoUser(row.user_id.clone()));
        }
        Ok(())
    }

    /// Every stored user (cluster mode pushes the ones the shared store lacks).
    pub fn user_rows(&self) -> Result<Vec<UserRow>, IdentityError> {
        let mut out = Vec::new();
        for kv in self.store.users().iter() {
            let (_, v) = kv?;
            let u: Value = serde_json::from_slice(&v).map_err(corrupt)?;
            let (Some(id), Some(tier)) = (u["id"].as_str(), u["tier"].as_str()) else {
                return Err(IdentityError::Corrupt("user record".into()));
            };
            out.push(UserRow {
                id: id.to_string(),
                tier: tier.to_string(),
                email: u["email"].as_str().map(str::to_string),
                created_at: parse_time(&u["created_at"]),
            });
        }
        Ok(out)
    }

    /// Every stored key, revoked ones included, as rows (no plaintext exists to give).
    pub fn key_rows(&self) -> Result<Vec<KeyRow>, IdentityError> {
        let mut out = Vec::new();
        for kv in self.store.keys().iter() {
            let (_, v) = kv?;
            let k: Value = serde_json::from_slice(&v).map_err(corrupt)?;
            let (Some(key_id), Some(user_id), Some(hash)) =
                (k["key_id"].as_str(), k["user_id"].as_str(), k["hash"].as_str())
            else {
                return Err(IdentityError::Corrupt("key record".into()));
            };
            out.push(KeyRow {
                key_id: key_id.to_string(),
                user_id: user_id.to_string(),
                hash: hash.to_string(),
                prefix: k["prefix"].as_str().unwrap_or_default().to_string(),
                created_at: parse_time(&k["created_at"]),
                revoked_at: k["revoked_at"].as_str().map(|_| parse_time(&k["revoked_at"])),
            });
        }
        Ok(out)
    }

    /// The lock that serializes shared-store changes (cluster mode) with the admin writes that
    /// make them.
    pub fn changes(&self) -> &tokio::sync::Mutex<()> {
        &self.changes
    }

    /// A user's keys, without plaintext or hashes.
    pub fn list_keys(&self, user_id: &str) -> Result<Vec<Value>, IdentityError> {
        if self.find_user(user_id).is_none() {
            return Err(IdentityError::NoUser(user_id.into()));
        }
        let mut out = Vec::new();
        for kv in self.store.keys().scan_prefix(format!("{user_id}/").as_bytes()) {
            let (_, v) = kv?;
            let j: Value = serde_json::from_slice(&v).map_err(corrupt)?;
            out.push(json!({
                "key_id": j["key_id"],
                "prefix": j["prefix"],
                "created_at": j["created_at"],
                "revoked_at": j["revoked_at"],
                "active": j["revoked_at"].is_null(),
            }));
        }
        Ok(out)
    }

    /// Revokes a key; effective at once.
    pub fn revoke(&self, key_id: &str, now: DateTime<Utc>) -> Result<(), IdentityError> {
        let k = self
            .find_key_id(key_id)
            .ok_or_else(|| IdentityError::NoKey(key_id.into()))?;
        let user = self
            .keys
            .get(k)
            .and_then(|s| self.users.get(s.user))
            .ok_or_else(|| IdentityError::NoKey(key_id.into()))?;
        let skey = format!("{}/{}", user.id(), key_id);
        if let Some(v) = self.store.keys().get(skey.as_bytes())? {
            let mut j: Value = serde_json::from_slice(&v).map_err(corrupt)?;
            j["revoked_at"] = Value::String(rfc3339(now));
            self.store.keys().insert(skey.as_bytes(), j.to_string().into_bytes())?;
        }
        self.unindex_key(k);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stay_small() {
        // The per-user budget of issue 3 (300 bytes) is mostly these two; the reserved tokens
        // and cost of hard enforcement (issue 14) take 24 of them.
        assert!(
            std::mem::size_of::<User>() <= 160,
            "User: {}",
            std::mem::size_of::<User>()
        );
        assert_eq!(UserId::new("user-0000001").as_str(), "user-0000001");
        let long = "u".repeat(64);
        assert_eq!(UserId::new(&long).as_str(), long);
        assert!(
            std::mem::size_of::<KeySlot>() <= 64,
            "KeySlot: {}",
            std::mem::size_of::<KeySlot>()
        );
    }

    #[test]
    fn keys_imported_from_the_shared_store_are_idempotent_and_stay_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("d")).unwrap();
        let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
        let month = Month::of(now);
        let reg = Registry::load(store, month).unwrap();
        reg.create_user("ann", "free", Some("a@example.com"), now, month)
            .unwrap();
        let (key, mut row) = new_key("ann", now).unwrap();
        assert!(matches!(
            reg.import_key(&KeyRow {
                user_id: "nobody".into(),
                ..row.clone()
            }),
            Err(IdentityError::NoUser(_))
        ));
        reg.import_key(&row).unwrap();
        reg.import_key(&row).unwrap();
        let e = reg.identify(&key).unwrap();
        assert_eq!(reg.key_id(e), row.key_id);
        assert_eq!(reg.key_rows().unwrap(), vec![row.clone()]);
        let users = reg.user_rows().unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(
            (users[0].id.as_str(), users[0].email.as_deref(), users[0].created_at),
            ("ann", Some("a@example.com"), now)
        );
        row.revoked_at = Some(now);
        reg.import_key(&row).unwrap();
        assert!(reg.identify(&key).is_none());
        assert!(!reg.key_active(e));
        // An active row arriving late does not bring a revoked key back.
        row.revoked_at = None;
        reg.import_key(&row).unwrap();
        assert!(reg.identify(&key).is_none());
        assert!(reg.key_rows().unwrap()[0].revoked_at.is_some());
    }

    #[test]
    fn keys_users_revoke_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("d")).unwrap();
        let now = Utc::now();
        let month = Month::of(now);
        let reg = Registry::load(store.clone(), month).unwrap();
        reg.create_user("ann", "free", Some("ann@example.com"), now, month)
            .unwrap();
        assert!(matches!(
            reg.create_user("ann", "free", None, now, month),
            Err(IdentityError::Exists(_))
        ));
        let (k1, id1) = reg.create_key("ann", now).unwrap();
        let (k2, _) = reg.create_key("ann", now).unwrap();
        let e1 = reg.identify(&k1).unwrap();
        assert_eq!(reg.key_id(e1), id1);
        assert_eq!(reg.user_of(e1).unwrap().id(), "ann");
        assert_eq!(reg.entry_by_key_id(&id1), Some(e1));
        assert_eq!(reg.email(reg.user("ann").unwrap()).as_deref(), Some("ann@example.com"));
        reg.set_tier("ann", "pro").unwrap();
        assert_eq!(&*reg.user("ann").unwrap().tier(), "pro");
        assert_eq!(reg.user_json(reg.user("ann").unwrap())["email"], "ann@example.com");
        reg.revoke(&id1, now).unwrap();
        assert!(reg.identify(&k1).is_none());
        assert!(!reg.key_active(e1));
        assert!(reg.identify(&k2).is_some());
        // A restart sees the same.
        drop(reg);
        let reg = Registry::load(store, month).unwrap();
        assert!(reg.identify(&k1).is_none());
        let e2 = reg.identify(&k2).unwrap();
        assert_eq!(&*reg.user_of(e2).unwrap().tier(), "pro");
        reg.delete_user("ann").unwrap();
        assert!(reg.identify(&k2).is_none());
        assert!(!reg.key_active(e2));
        assert!(reg.user("ann").is_none());
        assert_eq!(reg.user_count(), 0);
        reg.create_user("ann", "free", None, now, month).unwrap();
        assert_eq!(reg.user_count(), 1);
    }
}
