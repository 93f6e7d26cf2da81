//! Rebuilding this month's counters in Redis from the ledger in PostgreSQL, after Redis lost
//! them (restarted empty, or failed over). The counters are the ledger's sums; each user's
//! per-replica watermark and each replica's applied mark are the last record id PostgreSQL
//! holds of it, so every replica's replay of its own log then adds exactly what PostgreSQL
//! did not have yet.

use chrono::Utc;
use redis::aio::ConnectionManager;

use super::pump::applied_key;
use super::{MONTH_TTL_SECS, Money, q_key, w_key};
use crate::clock::Month;
use crate::cluster::Cluster;

/// What the counters were built for: `run_id` and a generation.
pub const META: &str = "gm:meta";

/// Replaces this month's counters with the ledger's, and marks them built for `run_id`;
/// returns how many users have usage this month.
pub async fn rebuild(
    cluster: &Cluster,
    money: &Money,
    conn: &mut ConnectionManager,
    run_id: &str,
) -> Result<usize, String> {
    let month = Month::of(Utc::now());
    let (from, to) = (month.start(), month.next().start());
    let sums = crate::cluster::ledger::month_totals(&cluster.pg, month)
        .await
        .map_err(|e| e.to_string())?;
    let pg = cluster.pg.client().await.map_err(|e| e.to_string())?;
    let marks = pg
        .query(
            "SELECT user_id, replica, max(id) FROM gm_usage_records
             WHERE created_at >= $1 AND created_at < $2 GROUP BY user_id, replica",
            &[&from, &to],
        )
        .await
        .map_err(|e| crate::cluster::pg::describe(&e))?;
    let last = pg
        .query(
            "SELECT replica, max(id) FROM gm_usage_records WHERE created_at >= $1 AND created_at < $2 GROUP BY replica",
            &[&from, &to],
        )
        .await
        .map_err(|e| crate::cluster::pg::describe(&e))?;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (user, t) in &sums {
        let key = q_key(user, month);
        pipe.cmd("DEL").arg(&key).ignore();
        pipe.cmd("HSET")
            .arg(&key)
            .arg("m")
            .arg(t.messages)
            .arg("t")
            .arg(t.tokens)
            .arg("b")
            .arg(t.bytes)
            .arg("c")
            .arg(money.units(t.cost))
            .ignore();
        pipe.cmd("EXPIRE").arg(&key).arg(MONTH_TTL_SECS).ignore();
    }
    for row in &marks {
        let (user, replica, id): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        pipe.cmd("HSET").arg(w_key(&user)).arg(replica).arg(id).ignore();
    }
    for row in &last {
        let (replica, id): (String, String) = (row.get(0), row.get(1));
        pipe.cmd("SET").arg(applied_key(&replica)).arg(id).ignore();
    }
    let generation = crate::identity::keys::random_base62(8).unwrap_or_default();
    pipe.cmd("HSET")
        .arg(META)
        .arg("run_id")
        .arg(run_id)
        .arg("gen")
        .arg(generation)
        .ignore();
    let () = pipe.query_async(conn).await.map_err(|e| e.to_string())?;
    Ok(sums.len())
}
