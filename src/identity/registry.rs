//! Users and keys: an in-memory index over the sled trees, written through on every change.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde_json::{Value, json};

use super::keys::{KeyHash, RandomError, generate_key, hash_key, looks_like_key, random_base62};
use crate::admission::TokenWindow;
use crate::clock::{Month, rfc3339};
use crate::ledger::{SledStore, StoreError, UserUsage};

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

/// A user, with the counters of their current month.
#[derive(Debug)]
pub struct User {
    /// The user id.
    pub id: Arc<str>,
    tier: ArcSwap<String>,
    /// Email for alerts.
    pub email: Option<String>,
    /// When the user was created.
    pub created_at: DateTime<Utc>,
    /// This month's counters.
    pub usage: UserUsage,
    /// Tokens-per-minute window.
    pub tpm: TokenWindow,
}

impl User {
    /// The user's tier name (changes apply to the next request).
    pub fn tier(&self) -> Arc<String> {
        self.tier.load_full()
    }

    /// JSON view for the admin API.
    pub fn to_json(&self) -> Value {
        json!({
            "id": &*self.id,
            "tier": &*self.tier(),
            "email": self.email,
            "created_at": rfc3339(self.created_at),
        })
    }
}

/// An active key: who it belongs to, in one lookup.
#[derive(Debug)]
pub struct KeyEntry {
    /// Public id of the key.
    pub key_id: Arc<str>,
    /// Its user.
    pub user: Arc<User>,
    /// Small numeric id for the per-key rate limiter.
    pub limiter_id: u64,
}

/// The registry of users and keys.
#[derive(Debug)]
pub struct Registry {
    store: SledStore,
    by_hash: DashMap<KeyHash, Arc<KeyEntry>>,
    by_key_id: DashMap<Arc<str>, KeyHash>,
    users: DashMap<Arc<str>, Arc<User>>,
    next_limiter_id: AtomicU64,
    /// Tier names are shared by all users of a tier (one allocation per tier, not per user).
    tier_names: DashMap<String, Arc<String>>,
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

impl Registry {
    /// Loads users, active keys and the counters of `month` from the store.
    pub fn load(store: SledStore, month: Month) -> Result<Self, IdentityError> {
        let reg = Registry {
            store: store.clone(),
            by_hash: DashMap::new(),
            by_key_id: DashMap::new(),
            users: DashMap::new(),
            next_limiter_id: AtomicU64::new(1),
            tier_names: DashMap::new(),
        };
        let mut month_totals: std::collections::HashMap<String, crate::ledger::Totals> =
            store.month_users(month)?.into_iter().collect();
        for kv in store.users().iter() {
            let (_, v) = kv?;
            let u: Value = serde_json::from_slice(&v).map_err(|e| IdentityError::Corrupt(e.to_string()))?;
            let id = u["id"]
                .as_str()
                .ok_or_else(|| IdentityError::Corrupt("user id".into()))?;
            let tier = u["tier"].as_str().unwrap_or_default();
            let usage = match month_totals.remove(id) {
                Some(t) => UserUsage::loaded(month, t),
                None => UserUsage::loaded(month, Default::default()),
            };
            let user = Arc::new(User {
                id: Arc::from(id),
                tier: ArcSwap::new(reg.tier_name(tier)),
                email: u["email"].as_str().map(str::to_string),
                created_at: parse_time(&u["created_at"]),
                usage,
                tpm: TokenWindow::default(),
            });
            reg.users.insert(user.id.clone(), user);
        }
        for kv in store.keys().iter() {
            let (_, v) = kv?;
            let k: Value = serde_json::from_slice(&v).map_err(|e| IdentityError::Corrupt(e.to_string()))?;
            if !k["revoked_at"].is_null() {
                continue;
            }
            let (Some(key_id), Some(user_id), Some(hash_hex)) =
                (k["key_id"].as_str(), k["user_id"].as_str(), k["hash"].as_str())
            else {
                return Err(IdentityError::Corrupt("key record".into()));
            };
            let mut hash = [0u8; 32];
            hex::decode_to_slice(hash_hex, &mut hash).map_err(|e| IdentityError::Corrupt(e.to_string()))?;
            let Some(user) = reg.users.get(user_id).map(|u| u.clone()) else {
                continue;
            };
            reg.index_key(Arc::from(key_id), hash, user);
        }
        Ok(reg)
    }

    fn tier_name(&self, tier: &str) -> Arc<String> {
        if let Some(t) = self.tier_names.get(tier) {
            return t.value().clone();
        }
        self.tier_names
            .entry(tier.to_string())
            .or_insert_with(|| Arc::new(tier.to_string()))
            .value()
            .clone()
    }

    fn index_key(&self, key_id: Arc<str>, hash: KeyHash, user: Arc<User>) {
        let limiter_id = self.next_limiter_id.fetch_add(1, Ordering::Relaxed);
        self.by_key_id.insert(key_id.clone(), hash);
        self.by_hash.insert(
            hash,
            Arc::new(KeyEntry {
                key_id,
                user,
                limiter_id,
            }),
        );
    }

    /// Finds the active key a caller presented. The hot path: one hash, one map lookup.
    pub fn identify(&self, key: &str) -> Option<Arc<KeyEntry>> {
        if !looks_like_key(key) {
            return None;
        }
        self.by_hash.get(&hash_key(key)).map(|e| e.value().clone())
    }

    /// True while a key is active (not revoked, its user not deleted).
    pub fn key_active(&self, key_id: &str) -> bool {
        self.by_key_id.contains_key(key_id)
    }

    /// The active key with this id.
    pub fn entry_by_key_id(&self, key_id: &str) -> Option<Arc<KeyEntry>> {
        let hash = *self.by_key_id.get(key_id)?;
        self.by_hash.get(&hash).map(|e| e.value().clone())
    }

    /// A user by id.
    pub fn user(&self, id: &str) -> Option<Arc<User>> {
        self.users.get(id).map(|u| u.value().clone())
    }

    /// Number of users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// All users (for month rollups and tools).
    pub fn all_users(&self) -> Vec<Arc<User>> {
        self.users.iter().map(|u| u.value().clone()).collect()
    }

    /// Creates a user in `tier` (the caller checked that the tier exists).
    pub fn create_user(
        &self,
        id: &str,
        tier: &str,
        email: Option<&str>,
        now: DateTime<Utc>,
        month: Month,
    ) -> Result<Arc<User>, IdentityError> {
        if !valid_user_id(id) {
            return Err(IdentityError::BadId);
        }
        let user = Arc::new(User {
            id: Arc::from(id),
            tier: ArcSwap::new(self.tier_name(tier)),
            email: email.map(str::to_string),
            created_at: now,
            usage: UserUsage::loaded(month, self.store.user_month(id, month)?),
            tpm: TokenWindow::default(),
        });
        match self.users.entry(user.id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(_) => return Err(IdentityError::Exists(id.into())),
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(user.clone());
            }
        }
        let json = user_json(id, tier, email, now);
        if let Err(e) = self.store.users().insert(id.as_bytes(), json.to_string().into_bytes()) {
            self.users.remove(id);
            return Err(e.into());
        }
        Ok(user)
    }

    /// Changes a user's tier; applies to the next request.
    pub fn set_tier(&self, id: &str, tier: &str) -> Result<Arc<User>, IdentityError> {
        let user = self.user(id).ok_or_else(|| IdentityError::NoUser(id.into()))?;
        let json = user_json(id, tier, user.email.as_deref(), user.created_at);
        self.store
            .users()
            .insert(id.as_bytes(), json.to_string().into_bytes())?;
        user.tier.store(self.tier_name(tier));
        Ok(user)
    }

    /// Deletes a user and their keys (the caller deletes the usage through the recorder).
    pub fn delete_user(&self, id: &str) -> Result<(), IdentityError> {
        let (_, user) = self.users.remove(id).ok_or_else(|| IdentityError::NoUser(id.into()))?;
        let prefix = format!("{id}/");
        let mut batch = sled::Batch::default();
        for kv in self.store.keys().scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            if let Ok(j) = serde_json::from_slice::<Value>(&v)
                && let Some(key_id) = j["key_id"].as_str()
                && let Some((_, hash)) = self.by_key_id.remove(key_id)
            {
                self.by_hash.remove(&hash);
            }
            batch.remove(k);
        }
        self.store.keys().apply_batch(batch)?;
        self.store.users().remove(id.as_bytes())?;
        drop(user);
        Ok(())
    }

    /// Issues a new key for a user; the plaintext is returned once and never stored.
    pub fn create_key(&self, user_id: &str, now: DateTime<Utc>) -> Result<(String, String), IdentityError> {
        let user = self
            .user(user_id)
            .ok_or_else(|| IdentityError::NoUser(user_id.into()))?;
        let key = generate_key()?;
        let key_id = format!("key_{}", random_base62(16)?);
        let hash = hash_key(&key);
        let rec = json!({
            "key_id": key_id,
            "user_id": user_id,
            "hash": hex::encode(hash),
            "prefix": &key[..7],
            "created_at": rfc3339(now),
            "revoked_at": null,
        });
        self.store
            .keys()
            .insert(format!("{user_id}/{key_id}").as_bytes(), rec.to_string().into_bytes())?;
        self.index_key(Arc::from(key_id.as_str()), hash, user);
        Ok((key, key_id))
    }

    /// A user's keys, without plaintext or hashes.
    pub fn list_keys(&self, user_id: &str) -> Result<Vec<Value>, IdentityError> {
        if self.user(user_id).is_none() {
            return Err(IdentityError::NoUser(user_id.into()));
        }
        let mut out = Vec::new();
        for kv in self.store.keys().scan_prefix(format!("{user_id}/").as_bytes()) {
            let (_, v) = kv?;
            let j: Value = serde_json::from_slice(&v).map_err(|e| IdentityError::Corrupt(e.to_string()))?;
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
        let hash = match self.by_key_id.get(key_id) {
            Some(h) => *h,
            None => return Err(IdentityError::NoKey(key_id.into())),
        };
        let entry = self.by_hash.get(&hash).map(|e| e.value().clone());
        let Some(entry) = entry else {
            return Err(IdentityError::NoKey(key_id.into()));
        };
        let skey = format!("{}/{}", entry.user.id, key_id);
        if let Some(v) = self.store.keys().get(skey.as_bytes())? {
            let mut j: Value = serde_json::from_slice(&v).map_err(|e| IdentityError::Corrupt(e.to_string()))?;
            j["revoked_at"] = Value::String(rfc3339(now));
            self.store.keys().insert(skey.as_bytes(), j.to_string().into_bytes())?;
        }
        self.by_hash.remove(&hash);
        self.by_key_id.remove(key_id);
        Ok(())
    }
}
