//! Reads of the ledger in PostgreSQL: pages of records (keyset on `created_at, id`), per-day
//! rows, month aggregates, and the month totals counters are rebuilt from. Results have the
//! shapes the embedded store's reads have, so the APIs render them the same way.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::LedgerError;
use crate::clock::Month;
use crate::cluster::Pg;
use crate::ledger::record::parse_id;
use crate::ledger::store::DayRow;
use crate::ledger::{Record, RecordKind, Totals};

/// Longest a read may take.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// The aggregate columns every grouped read selects, in [`totals_at`]'s order.
const TOTALS: &str = "count(*)::int8, \
    COALESCE(sum(messages), 0)::int8, COALESCE(sum(tokens), 0)::int8, COALESCE(sum(bytes), 0)::int8, \
    COALESCE(sum(cost), 0)::text, \
    COALESCE(sum(CASE WHEN jsonb_typeof(record->'metadata'->'response_bytes') = 'number' \
                      THEN (record->'metadata'->>'response_bytes')::numeric END), 0)::int8";

/// The same, with `records` counting requests (`message_sent` records), as the per-model and
/// per-tag aggregates of the embedded store do.
const REQUEST_TOTALS: &str = "count(*) FILTER (WHERE type = 'message_sent')::int8, \
    COALESCE(sum(messages), 0)::int8, COALESCE(sum(tokens), 0)::int8, COALESCE(sum(bytes), 0)::int8, \
    COALESCE(sum(cost), 0)::text, \
    COALESCE(sum(CASE WHEN jsonb_typeof(record->'metadata'->'response_bytes') = 'number' \
                      THEN (record->'metadata'->>'response_bytes')::numeric END), 0)::int8";

fn count(row: &Row, i: usize) -> Result<u64, LedgerError> {
    let v: i64 = row.try_get(i)?;
    u64::try_from(v).map_err(|_| LedgerError::Invalid("negative amount in the ledger".into()))
}

/// [`Totals`] from the six columns of [`TOTALS`] starting at `i`.
fn totals_at(row: &Row, i: usize) -> Result<Totals, LedgerError> {
    let cost: String = row.try_get(i + 4)?;
    Ok(Totals {
        records: count(row, i)?,
        messages: count(row, i + 1)?,
        tokens: count(row, i + 2)?,
        bytes: count(row, i + 3)?,
        cost: cost
            .parse::<Decimal>()
            .map_err(|e| LedgerError::Invalid(format!("cost {cost}: {e}")))?,
        response_bytes: count(row, i + 5)?,
    })
}

/// Runs a query on the shared client, bounded by [`READ_TIMEOUT`].
async fn query(pg: &Pg, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, LedgerError> {
    let client = pg.client().await?;
    match tokio::time::timeout(READ_TIMEOUT, client.query(sql, params)).await {
        Ok(rows) => Ok(rows?),
        Err(_) => {
            // A connection that hangs is dropped; the next read connects again.
            pg.reset();
            Err(LedgerError::Timeout("reading the ledger"))
        }
    }
}

fn month_bounds(m: Month) -> (DateTime<Utc>, DateTime<Utc>) {
    (m.start(), m.next().start())
}

/// Every user's totals of a month, by user id (bytewise).
pub async fn month_totals(pg: &Pg, m: Month) -> Result<Vec<(String, Totals)>, LedgerError> {
    month_totals_with(pg, m, &[]).await
}

/// [`month_totals`] plus `extra` records of that month that PostgreSQL does not have yet
/// (a replica's unshipped records: [`super::unshipped_records`]), in one statement, so a record
/// shipped meanwhile counts once.
pub async fn month_totals_with(pg: &Pg, m: Month, extra: &[Record]) -> Result<Vec<(String, Totals)>, LedgerError> {
    let (lo, hi) = month_bounds(m);
    let extra: Vec<&Record> = extra.iter().filter(|r| r.month() == m).collect();
    let ids: Vec<String> = extra.iter().map(|r| r.id_string()).collect();
    let at: Vec<DateTime<Utc>> = extra.iter().map(|r| r.created_at).collect();
    let mut json = Vec::with_capacity(extra.len());
    for r in &extra {
        let mut b = Vec::new();
        r.write_json(&mut b).map_err(|e| LedgerError::Invalid(e.to_string()))?;
        json.push(String::from_utf8_lossy(&b).into_owned());
    }
    let users: Vec<String> = extra.iter().map(|r| r.user_id.to_string()).collect();
    let messages: Vec<i64> = extra.iter().map(|r| r.messages as i64).collect();
    let tokens: Vec<i64> = extra.iter().map(|r| r.tokens as i64).collect();
    let bytes: Vec<i64> = extra.iter().map(|r| r.bytes as i64).collect();
    let cost: Vec<String> = extra.iter().map(|r| r.cost.normalize().to_string()).collect();
    let sql = format!(
        "WITH x AS (SELECT * FROM unnest($3::text[], $4::timestamptz[], $5::text[], $6::int8[], $7::int8[], \
                    $8::int8[], $9::text[], $10::text[]) AS x(id, created_at, user_id, messages, tokens, bytes, cost, record)), \
         a AS (SELECT user_id, messages, tokens, bytes, cost, record FROM gm_usage_records \
               WHERE created_at >= $1 AND created_at < $2 \
               UNION ALL \
               SELECT x.user_id, x.messages, x.tokens, x.bytes, x.cost::numeric, x.record::jsonb FROM x \
               WHERE NOT EXISTS (SELECT 1 FROM gm_usage_records g WHERE g.id = x.id AND g.created_at = x.created_at)) \
         SELECT user_id, {TOTALS} FROM a GROUP BY user_id ORDER BY user_id COLLATE \"C\""
    );
    let rows = query(
        pg,
        &sql,
        &[&lo, &hi, &ids, &at, &users, &messages, &tokens, &bytes, &cost, &json],
    )
    .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, totals_at(r, 1)?))).collect()
}

/// Month totals over all users, and the number of users with records.
pub async fn month_summary(pg: &Pg, m: Month) -> Result<(Totals, u64), LedgerError> {
    let (lo, hi) = month_bounds(m);
    let sql = format!(
        "SELECT count(DISTINCT user_id)::int8, {TOTALS} FROM gm_usage_records WHERE created_at >= $1 AND created_at < $2"
    );
    let rows = query(pg, &sql, &[&lo, &hi]).await?;
    let row = rows
        .first()
        .ok_or_else(|| LedgerError::Invalid("no summary row".into()))?;
    Ok((totals_at(row, 1)?, count(row, 0)?))
}

/// Per-model totals of a month (`records`: requests), by model name (bytewise).
pub async fn month_models(pg: &Pg, m: Month) -> Result<Vec<(String, Totals)>, LedgerError> {
    let (lo, hi) = month_bounds(m);
    let sql = format!(
        "SELECT model, {REQUEST_TOTALS} FROM gm_usage_records WHERE created_at >= $1 AND created_at < $2 \
         AND model IS NOT NULL GROUP BY model ORDER BY model COLLATE \"C\""
    );
    let rows = query(pg, &sql, &[&lo, &hi]).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, totals_at(r, 1)?))).collect()
}

/// Per-value totals of a tag in a month (`records`: requests), by value (bytewise).
pub async fn month_tag(pg: &Pg, m: Month, name: &str) -> Result<Vec<(String, Totals)>, LedgerError> {
    let (lo, hi) = month_bounds(m);
    let sql = format!(
        "SELECT * FROM (SELECT record->'metadata'->'tags'->>$3 AS v, {REQUEST_TOTALS} FROM gm_usage_records \
         WHERE created_at >= $1 AND created_at < $2 AND jsonb_typeof(record->'metadata'->'tags'->$3) = 'string' \
         GROUP BY v) t ORDER BY v COLLATE \"C\""
    );
    let rows = query(pg, &sql, &[&lo, &hi, &name]).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, totals_at(r, 1)?))).collect()
}

/// Per-day, per-type totals from `since` (inclusive, UTC days), for one user or everyone.
pub async fn daily(pg: &Pg, user: Option<&str>, since: NaiveDate) -> Result<Vec<DayRow>, LedgerError> {
    let from = since.and_hms_opt(0, 0, 0).map(|t| t.and_utc()).unwrap_or_default();
    let by_user = if user.is_some() { "AND user_id = $2" } else { "" };
    let sql = format!(
        "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, type, {TOTALS} FROM gm_usage_records \
         WHERE created_at >= $1 {by_user} GROUP BY day, type ORDER BY day, type COLLATE \"C\""
    );
    let rows = match user {
        Some(u) => query(pg, &sql, &[&from, &u]).await?,
        None => query(pg, &sql, &[&from]).await?,
    };
    rows.iter()
        .map(|r| {
            Ok(DayRow {
                day: r.try_get(0)?,
                kind: r.try_get(1)?,
                totals: totals_at(r, 2)?,
            })
        })
        .collect()
}

/// Per-type totals of one user's month, by type.
pub async fn user_month_by_type(pg: &Pg, user: &str, m: Month) -> Result<Vec<(String, Totals)>, LedgerError> {
    let (lo, hi) = month_bounds(m);
    let sql = format!(
        "SELECT type, {TOTALS} FROM gm_usage_records WHERE user_id = $3 AND created_at >= $1 AND created_at < $2 \
         GROUP BY type ORDER BY type COLLATE \"C\""
    );
    let rows = query(pg, &sql, &[&lo, &hi, &user]).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, totals_at(r, 1)?))).collect()
}

/// Filters of a page of records (as the embedded `RecordFilter`, with an opaque cursor).
#[derive(Debug, Clone, Default)]
pub struct PageFilter {
    /// Only this user's records.
    pub user_id: Option<String>,
    /// Only records of this type.
    pub kind: Option<RecordKind>,
    /// Created at or after.
    pub from: Option<DateTime<Utc>>,
    /// Created before.
    pub to: Option<DateTime<Utc>>,
    /// Start at this record (from [`format_cursor`]), newest first from there.
    pub cursor: Option<(DateTime<Utc>, String)>,
}

/// A page cursor: the record's time (ms) and id, 48 hex digits; opaque to callers.
pub fn format_cursor(r: &Record) -> String {
    format!("{:016x}{}", r.created_at.timestamp_millis(), r.id_string())
}

/// Where a page that starts at `r` starts (what [`format_cursor`] renders).
pub fn position(r: &Record) -> (DateTime<Utc>, String) {
    (r.created_at, r.id_string())
}

/// Parses [`format_cursor`]; `None` when it is not one.
pub fn parse_cursor(s: &str) -> Option<(DateTime<Utc>, String)> {
    if s.len() != 48 || !s.is_ascii() {
        return None;
    }
    let ms = i64::from_str_radix(&s[..16], 16).ok()?;
    let id = &s[16..];
    parse_id(id)?;
    Some((DateTime::<Utc>::from_timestamp_millis(ms)?, id.to_string()))
}

/// Records matching `f`, newest first (`created_at`, then id), at most `limit`.
pub async fn records(pg: &Pg, f: &PageFilter, limit: usize) -> Result<Vec<Record>, LedgerError> {
    let mut conds: Vec<String> = Vec::new();
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut add = |cond: &str, p: Box<dyn ToSql + Sync + Send>| {
        params.push(p);
        conds.push(cond.replace('?', &format!("${}", params.len())));
    };
    if let Some(u) = &f.user_id {
        add("user_id = ?", Box::new(u.clone()));
    }
    if let Some(k) = f.kind {
        add("type = ?", Box::new(k.as_str()));
    }
    if let Some(t) = f.from {
        add("created_at >= ?", Box::new(t));
    }
    if let Some(t) = f.to {
        add("created_at < ?", Box::new(t));
    }
    if let Some((t, id)) = &f.cursor {
        params.push(Box::new(*t));
        params.push(Box::new(id.clone()));
        conds.push(format!(
            "(created_at, id) <= (${}, ${})",
            params.len() - 1,
            params.len()
        ));
    }
    let lim = i64::try_from(limit).unwrap_or(i64::MAX);
    params.push(Box::new(lim));
    let where_ = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    let sql = format!(
        "SELECT record FROM gm_usage_records {where_} ORDER BY created_at DESC, id DESC LIMIT ${}",
        params.len()
    );
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
    let rows = query(pg, &sql, &refs).await?;
    rows.iter().map(record_of).collect()
}

/// The record of a row whose first column is `record`.
fn record_of(row: &Row) -> Result<Record, LedgerError> {
    let v: serde_json::Value = row.try_get(0)?;
    Record::from_json(&v).ok_or_else(|| LedgerError::Invalid("a row of gm_usage_records is not a record".into()))
}

/// Deletes a user's rows and leaves a tombstone at `at`, so no replica ships their records
/// made before it (see [`super::ship`]). Returns the rows deleted.
pub async fn delete_user(pg: &Pg, user: &str, at: DateTime<Utc>) -> Result<u64, LedgerError> {
    let mut client = pg.connect().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO gm_deleted_users (user_id, deleted_at) VALUES ($1, $2) \
         ON CONFLICT (user_id) DO UPDATE SET deleted_at = GREATEST(gm_deleted_users.deleted_at, excluded.deleted_at)",
        &[&user, &at],
    )
    .await?;
    let n = tx
        .execute(
            "DELETE FROM gm_usage_records WHERE user_id = $1 AND created_at <= $2",
            &[&user, &at],
        )
        .await?;
    tx.commit().await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_forged_ones_are_refused() {
        let at = DateTime::parse_from_rfc3339("2026-11-28T10:00:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let id = crate::ledger::RecordIds::new().next(at);
        let s = format!("{:016x}{}", at.timestamp_millis(), crate::ledger::record::format_id(id));
        let (t, i) = parse_cursor(&s).unwrap();
        assert_eq!(t, at);
        assert_eq!(i, crate::ledger::record::format_id(id));
        assert!(parse_cursor("0000000000000001").is_none());
        assert!(parse_cursor(&s.replace('0', "g")).is_none());
    }
}
