//! The settlement pump: applies each record to Redis once it is on disk, in log order, with
//! what of its call's reservation it replaces, in one idempotent script per record (pipelined
//! by batch: one round trip settles many). A replica's records carry growing ids, and Redis
//! keeps per user the last id each replica settled, so a retry or a replay after a crash
//! counts nothing twice. Redis down: settlements wait (their records are on disk) and are
//! applied when it is back; admission refuses meanwhile.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{MONTH_TTL_SECS, Quotas, q_key, r_key, rz_key, tpm_key, w_key};
use crate::identity::Registry;
use crate::ledger::record::format_id;
use crate::ledger::{RecorderHandle, Settled, SledStore};
use crate::runtime::Live;

/// Most settlements sent in one pipeline.
const BATCH: usize = 256;

/// The key holding the last record id of `replica` settled in Redis.
pub fn applied_key(replica: &str) -> String {
    format!("gm:applied:{replica}")
}

/// What the pump and the watcher share.
pub struct Shared {
    /// The counters' scripts and state.
    pub quotas: Arc<Quotas>,
    /// Redis.
    pub redis: ConnectionManager,
    /// Users (whose counters mirror Redis).
    pub registry: Arc<Registry>,
    /// The live config (tokens-per-minute limits).
    pub live: Arc<Live>,
    /// The local store (its record log is replayed).
    pub store: SledStore,
    /// The recorder (synced before a replay).
    pub recorder: RecorderHandle,
}

/// The settlement pump's task.
pub struct Pump {
    /// What it shares with the watcher.
    pub shared: Arc<Shared>,
}

impl std::ops::Deref for Pump {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Pump {
    /// Runs until the queue closes. It applies nothing while admission is paused: a rebuild
    /// replaces the counters, and the watcher replays the log before resuming.
    pub async fn run(self) {
        let Some(mut rx) = self.quotas.take_pump_rx() else {
            return;
        };
        let mut pending: Vec<Settled> = Vec::new();
        loop {
            if pending.is_empty() {
                match rx.recv().await {
                    Some(v) => pending.extend(v),
                    None => return,
                }
            }
            drain(&mut rx, &mut pending);
            if !self.quotas.ready() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let n = pending.len().min(BATCH);
            match self.apply(&pending[..n]).await {
                Ok(()) => {
                    pending.drain(..n);
                }
                Err(e) => {
                    tracing::warn!(error = %e, queued = pending.len(), "settling in Redis failed; kept and retried");
                    self.quotas.suspect();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

impl Shared {
    /// Applies this replica's records of this month from its log with ids above what Redis
    /// holds as settled (the per-user watermarks skip any it has).
    pub async fn replay_log(&self) -> Result<(), String> {
        self.recorder.sync().await.map_err(|e| e.to_string())?;
        let mut conn = self.redis.clone();
        let key = applied_key(&self.quotas.replica);
        let applied: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let month_start = crate::clock::Month::of(chrono::Utc::now()).start();
        let floor = (u128::try_from(month_start.timestamp_millis().max(1) - 1).unwrap_or(0)) << 80;
        let after = applied
            .and_then(|s| crate::ledger::record::parse_id(&s))
            .unwrap_or(0)
            .max(floor);
        let store = self.store.clone();
        let records = tokio::task::spawn_blocking(move || store.records_since(after))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let n = records.len();
        let settled: Vec<Settled> = records.iter().map(|r| Settled::of(r, None)).collect();
        for chunk in settled.chunks(BATCH) {
            self.apply(chunk).await.map_err(|e| e.to_string())?;
        }
        if n > 0 {
            tracing::info!(records = n, "record log replayed into Redis");
        }
        Ok(())
    }

    /// One pipeline: each settlement's script, then the replica's applied mark.
    pub async fn apply(&self, items: &[Settled]) -> Result<(), redis::RedisError> {
        let q = &self.quotas;
        let rt = self.live.load();
        let mut pipe = redis::pipe();
        // Loaded once per connection's life (again after any failure: Redis may have
        // restarted and forgotten it), not with every batch.
        let load = !q.settle_loaded.load(Ordering::Acquire);
        if load {
            pipe.load_script(&q.settle).ignore();
        }
        let mut invs = Vec::with_capacity(items.len());
        for s in items {
            let tpm = self
                .registry
                .user(&s.user_id)
                .and_then(|u| rt.tier_by_id(u.tier_id()))
                .and_then(|t| t.tier.tokens_per_minute)
                .unwrap_or(0);
            invs.push(self.invocation(s, tpm));
        }
        for inv in &invs {
            pipe.invoke_script(inv);
        }
        let last = items.iter().map(|s| s.id).filter(|id| *id != 0).max();
        if let Some(id) = last {
            pipe.cmd("SET").arg(applied_key(&q.replica)).arg(format_id(id)).ignore();
        }
        let mut conn = self.redis.clone();
        q.settle_trips.fetch_add(1, Ordering::Relaxed);
        let replies: Vec<(i64, i64, i64, i64, i64, i64, i64)> = match pipe.query_async(&mut conn).await {
            Ok(r) => r,
            Err(e) => {
                q.settle_loaded.store(false, Ordering::Release);
                return Err(e);
            }
        };
        if load {
            q.settle_loaded.store(true, Ordering::Release);
        }
        for (s, r) in items.iter().zip(replies) {
            if let Some(user) = self.registry.user(&s.user_id) {
                let used = [r.1, r.2, r.3, r.4];
                q.mirror(user, s.month, &used, &[r.5, r.6]);
            }
            q.settled.fetch_add(u64::try_from(r.0).unwrap_or(0), Ordering::Relaxed);
        }
        Ok(())
    }

    fn invocation(&self, s: &Settled, tpm: u64) -> redis::ScriptInvocation<'_> {
        let q = &self.quotas;
        let m = &q.money;
        let u = &*s.user_id;
        let rel = s.release.as_deref();
        let res = rel.map(|r| &*r.res).unwrap_or("");
        let mut inv = q.settle.prepare_invoke();
        inv.key(q_key(u, s.month))
            .key(r_key(u, res))
            .key(rz_key(u))
            .key(w_key(u))
            .key(tpm_key(u));
        let whole = rel.is_some_and(|r| r.whole);
        let charged = rel.filter(|r| r.whole).map_or(0, |r| r.tpm_charged);
        let used_tokens = if s.model_tokens && s.id != 0 { s.tokens } else { 0 };
        let dt = i128::from(used_tokens) - i128::from(charged);
        inv.arg(&*q.replica)
            .arg(if s.id == 0 { String::new() } else { format_id(s.id) })
            .arg(MONTH_TTL_SECS)
            .arg(u8::from(rel.is_some_and(|r| r.message)))
            .arg(rel.map_or(0, |r| r.tokens))
            .arg(rel.map_or(0, |r| m.units(r.cost)))
            .arg(u8::from(whole))
            .arg(s.messages)
            .arg(s.tokens)
            .arg(s.bytes)
            .arg(m.units(s.cost))
            .arg(tpm)
            .arg(i64::try_from(dt).unwrap_or(0))
            .arg(res);
        inv
    }
}

fn drain(rx: &mut UnboundedReceiver<Vec<Settled>>, pending: &mut Vec<Settled>) {
    while pending.len() < BATCH * 4 {
        match rx.try_recv() {
            Ok(v) => pending.extend(v),
            Err(_) => break,
        }
    }
}
