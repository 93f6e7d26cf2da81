//! Alert marks in PostgreSQL: an alert fires once per user, quota, threshold and month across
//! replicas. Each replica that sees the crossing still writes its own alert (with its outbox)
//! locally; before delivering, it claims the mark. The first `INSERT` wins and names its alert
//! by the record that crossed the line, so the winner keeps delivering its alert after retries
//! and restarts, and every other replica drops its copy unsent.

use super::{SharedError, client, failed};
use crate::cluster::Cluster;
use crate::ledger::alerts::Alert;

/// Whether this replica delivers `alert`: true when its mark was claimed by this alert (now or
/// earlier), false when another replica's alert holds it.
pub async fn claim(cluster: &Cluster, alert: &Alert) -> Result<bool, SharedError> {
    let c = client(cluster).await?;
    let record = format!("{:032x}", alert.record_id);
    let month = alert.month.to_string();
    let quota = alert.quota.as_str();
    let threshold = i16::from(alert.threshold);
    let user: &str = &alert.user_id;
    c.execute(
        "INSERT INTO gm_alert_marks (user_id, user_created, month, quota, threshold, record_id)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        &[&user, &alert.user_created, &month, &quota, &threshold, &record],
    )
    .await
    .map_err(|e| failed(cluster, e))?;
    // A separate statement: it sees a row another replica committed while the INSERT waited.
    let row = c
        .query_opt(
            "SELECT record_id FROM gm_alert_marks
             WHERE user_id = $1 AND user_created = $2 AND month = $3 AND quota = $4 AND threshold = $5",
            &[&user, &alert.user_created, &month, &quota, &threshold],
        )
        .await
        .map_err(|e| failed(cluster, e))?;
    let holder: Option<String> = row
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(|e| SharedError::Corrupt(e.to_string()))?;
    // No row: the user was deleted meanwhile (the marks go with them); nothing to deliver.
    Ok(holder.as_deref() == Some(record.as_str()))
}
