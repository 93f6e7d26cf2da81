//! Users and keys in PostgreSQL: the admin writes (PostgreSQL first, with their `NOTIFY`, then
//! the local registry) and the application of a row read from PostgreSQL to the local copy.

use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use crate::app::App;
use crate::clock::Month;
use crate::cluster::Cluster;
use crate::cluster::shared::{SharedError, client, failed};
use crate::identity::{IdentityError, KeyRow, User, UserRow, new_key};

/// A user as PostgreSQL has it (a deleted one is a tombstone).
#[derive(Debug, Clone)]
pub struct PgUser {
    /// The user.
    pub row: UserRow,
    /// True once deleted.
    pub deleted: bool,
}

const USER_COLS: &str = "id, tier, email, created_at, deleted";
const KEY_COLS: &str = "key_id, user_id, hash, prefix, created_at, revoked_at";

/// Reads a `gm_users` row.
pub fn user_of_row(r: &Row) -> Result<PgUser, SharedError> {
    let bad = |e: tokio_postgres::Error| SharedError::Corrupt(e.to_string());
    Ok(PgUser {
        row: UserRow {
            id: r.try_get("id").map_err(bad)?,
            tier: r.try_get("tier").map_err(bad)?,
            email: r.try_get("email").map_err(bad)?,
            created_at: r.try_get("created_at").map_err(bad)?,
        },
        deleted: r.try_get("deleted").map_err(bad)?,
    })
}

/// Reads a `gm_keys` row.
pub fn key_of_row(r: &Row) -> Result<KeyRow, SharedError> {
    let bad = |e: tokio_postgres::Error| SharedError::Corrupt(e.to_string());
    Ok(KeyRow {
        key_id: r.try_get("key_id").map_err(bad)?,
        user_id: r.try_get("user_id").map_err(bad)?,
        hash: r.try_get("hash").map_err(bad)?,
        prefix: r.try_get("prefix").map_err(bad)?,
        created_at: r.try_get("created_at").map_err(bad)?,
        revoked_at: r.try_get("revoked_at").map_err(bad)?,
    })
}

/// Every user row (tombstones included).
pub async fn all_users(cluster: &Cluster) -> Result<Vec<PgUser>, SharedError> {
    let c = client(cluster).await?;
    let q = format!("SELECT {USER_COLS} FROM gm_users");
    let rows = c.query(&q, &[]).await.map_err(|e| failed(cluster, e))?;
    rows.iter().map(user_of_row).collect()
}

/// Every key row.
pub async fn all_keys(cluster: &Cluster) -> Result<Vec<KeyRow>, SharedError> {
    let c = client(cluster).await?;
    let q = format!("SELECT {KEY_COLS} FROM gm_keys");
    let rows = c.query(&q, &[]).await.map_err(|e| failed(cluster, e))?;
    rows.iter().map(key_of_row).collect()
}

async fn fetch_user(cluster: &Cluster, id: &str) -> Result<Option<PgUser>, SharedError> {
    let c = client(cluster).await?;
    let q = format!("SELECT {USER_COLS} FROM gm_users WHERE id = $1");
    let row = c.query_opt(&q, &[&id]).await.map_err(|e| failed(cluster, e))?;
    row.as_ref().map(user_of_row).transpose()
}

async fn fetch_key(cluster: &Cluster, key_id: &str) -> Result<Option<KeyRow>, SharedError> {
    let c = client(cluster).await?;
    let q = format!("SELECT {KEY_COLS} FROM gm_keys WHERE key_id = $1");
    let row = c.query_opt(&q, &[&key_id]).await.map_err(|e| failed(cluster, e))?;
    row.as_ref().map(key_of_row).transpose()
}

fn seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// Creates a user (admin): in PostgreSQL (an id whose user was deleted may be taken again),
/// then here.
pub async fn create_user<'a>(
    app: &'a App,
    cluster: &Cluster,
    id: &str,
    tier: &str,
    email: Option<&str>,
    now: DateTime<Utc>,
) -> Result<&'a User, SharedError> {
    if !crate::identity::valid_user_id(id) {
        return Err(IdentityError::BadId.into());
    }
    let _one = app.registry.changes().lock().await;
    let now = seconds(now);
    let c = client(cluster).await?;
    let n = c
        .execute(
            "WITH u AS (
                INSERT INTO gm_users (id, tier, email, created_at, deleted) VALUES ($1, $2, $3, $4, false)
                ON CONFLICT (id) DO UPDATE SET tier = EXCLUDED.tier, email = EXCLUDED.email,
                    created_at = EXCLUDED.created_at, deleted = false
                WHERE gm_users.deleted
                RETURNING id)
             SELECT pg_notify('gm_changes', 'user:' || id) FROM u",
            &[&id, &tier, &email, &now],
        )
        .await
        .map_err(|e| failed(cluster, e))?;
    if n == 0 {
        return Err(IdentityError::Exists(id.into()).into());
    }
    let row = PgUser {
        row: UserRow {
            id: id.to_string(),
            tier: tier.to_string(),
            email: email.map(str::to_string),
            created_at: now,
        },
        deleted: false,
    };
    apply_user_row(app, &row).await?;
    app.registry
        .user(id)
        .ok_or_else(|| IdentityError::NoUser(id.into()).into())
}

/// Changes a user's tier (admin): in PostgreSQL, then here.
pub async fn set_tier<'a>(app: &'a App, cluster: &Cluster, id: &str, tier: &str) -> Result<&'a User, SharedError> {
    let _one = app.registry.changes().lock().await;
    let c = client(cluster).await?;
    let row = c
        .query_opt(
            &format!(
                "WITH u AS (UPDATE gm_users SET tier = $2 WHERE id = $1 AND NOT deleted RETURNING *),
                 n AS (SELECT pg_notify('gm_changes', 'user:' || id) FROM u)
                 SELECT {USER_COLS} FROM u, n"
            ),
            &[&id, &tier],
        )
        .await
        .map_err(|e| failed(cluster, e))?;
    let row = row.ok_or_else(|| IdentityError::NoUser(id.into()))?;
    apply_user_row(app, &user_of_row(&row)?).await?;
    app.registry
        .user(id)
        .ok_or_else(|| IdentityError::NoUser(id.into()).into())
}

/// Deletes a user (admin): a tombstone in PostgreSQL (their keys and alert marks go), then here
/// as the embedded path does (keys, alert state, usage). Returns the records deleted here.
pub async fn delete_user(app: &App, cluster: &Cluster, id: &str) -> Result<u64, SharedError> {
    let _one = app.registry.changes().lock().await;
    let c = client(cluster).await?;
    let n = c
        .execute(
            "WITH u AS (UPDATE gm_users SET deleted = true WHERE id = $1 AND NOT deleted RETURNING id),
             k AS (DELETE FROM gm_keys WHERE user_id = $1 AND EXISTS (SELECT 1 FROM u) RETURNING key_id),
             a AS (DELETE FROM gm_alert_marks WHERE user_id = $1 AND EXISTS (SELECT 1 FROM u) RETURNING 1)
             SELECT pg_notify('gm_changes', 'user:' || id) FROM u",
            &[&id],
        )
        .await
        .map_err(|e| failed(cluster, e))?;
    if n == 0 {
        return Err(IdentityError::NoUser(id.into()).into());
    }
    delete_local(app, id).await
}

/// Issues a key (admin): the plaintext is made here and shown once; PostgreSQL gets its hash.
pub async fn create_key(
    app: &App,
    cluster: &Cluster,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<(String, String), SharedError> {
    let _one = app.registry.changes().lock().await;
    let (key, row) = new_key(user_id, seconds(now))?;
    let c = client(cluster).await?;
    let n = c
        .execute(
            "WITH k AS (
                INSERT INTO gm_keys (key_id, user_id, hash, prefix, created_at)
                SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM gm_users WHERE id = $2 AND NOT deleted)
                RETURNING key_id)
             SELECT pg_notify('gm_changes', 'key:' || key_id) FROM k",
            &[&row.key_id, &row.user_id, &row.hash, &row.prefix, &row.created_at],
        )
        .await
        .map_err(|e| failed(cluster, e))?;
    if n == 0 {
        return Err(IdentityError::NoUser(user_id.into()).into());
    }
    apply_key_row(app, cluster, &row).await?;
    Ok((key, row.key_id))
}

/// Revokes a key (admin): in PostgreSQL, then here.
pub async fn revoke(app: &App, cluster: &Cluster, key_id: &str, now: DateTime<Utc>) -> Result<(), SharedError> {
    let _one = app.registry.changes().lock().await;
    let c = client(cluster).await?;
    let row = c
        .query_opt(
            &format!(
                "WITH k AS (UPDATE gm_keys SET revoked_at = $2 WHERE key_id = $1 AND revoked_at IS NULL RETURNING *),
                 n AS (SELECT pg_notify('gm_changes', 'key:' || key_id) FROM k)
                 SELECT {KEY_COLS} FROM k, n"
            ),
            &[&key_id, &seconds(now)],
        )
        .await
        .map_err(|e| failed(cluster, e))?;
    let row = row.ok_or_else(|| IdentityError::NoKey(key_id.into()))?;
    apply_key_row(app, cluster, &key_of_row(&row)?).await
}

/// Applies what PostgreSQL holds for user `id` (after a notification). Takes the change lock.
pub(super) async fn apply_user(app: &App, cluster: &Cluster, id: &str) -> Result<(), SharedError> {
    let _one = app.registry.changes().lock().await;
    match fetch_user(cluster, id).await? {
        Some(u) => apply_user_row(app, &u).await,
        None => Ok(()),
    }
}

/// Applies what PostgreSQL holds for key `key_id` (after a notification). Takes the change lock.
pub(super) async fn apply_key(app: &App, cluster: &Cluster, key_id: &str) -> Result<(), SharedError> {
    let _one = app.registry.changes().lock().await;
    match fetch_key(cluster, key_id).await? {
        Some(k) => apply_key_row(app, cluster, &k).await,
        None => Ok(()),
    }
}

/// Makes the local copy of one user match PostgreSQL's row. The caller holds the change lock.
pub(super) async fn apply_user_row(app: &App, u: &PgUser) -> Result<(), SharedError> {
    let reg = &app.registry;
    let local = reg.user(&u.row.id);
    if u.deleted {
        if local.is_some() {
            delete_local(app, &u.row.id).await?;
        }
        return Ok(());
    }
    if let Some(l) = local {
        if l.created_unix() == u.row.created_at.timestamp() {
            if *l.tier() != *u.row.tier {
                reg.set_tier(&u.row.id, &u.row.tier)?;
            }
            return Ok(());
        }
        // Another incarnation of the id: deleted and created again elsewhere, or a user of the
        // same id made on two replicas before cluster mode. Its keys go; its usage records
        // stay (billing data is never dropped on a guess).
        forget_local(app, &u.row.id)?;
    }
    let month = Month::of(app.clock.now());
    reg.create_user(&u.row.id, &u.row.tier, u.row.email.as_deref(), u.row.created_at, month)?;
    Ok(())
}

/// Makes the local copy of one key match PostgreSQL's row, importing its user first when it is
/// not here yet. The caller holds the change lock.
pub(super) async fn apply_key_row(app: &App, cluster: &Cluster, k: &KeyRow) -> Result<(), SharedError> {
    if app.registry.user(&k.user_id).is_none() {
        match fetch_user(cluster, &k.user_id).await? {
            Some(u) if !u.deleted => apply_user_row(app, &u).await?,
            _ => return Ok(()),
        }
    }
    match app.registry.import_key(k) {
        Ok(()) | Err(IdentityError::NoUser(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Takes a user and their keys out of the registry here (not their usage records).
fn forget_local(app: &App, id: &str) -> Result<Option<Vec<String>>, SharedError> {
    match app.registry.delete_user(id) {
        Ok(k) => {
            app.alerts.forget(id);
            Ok(Some(k))
        }
        Err(IdentityError::NoUser(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a user here as the embedded admin path does: keys, alert state, usage records.
/// Returns the records deleted; a user not here is nothing to do.
async fn delete_local(app: &App, id: &str) -> Result<u64, SharedError> {
    let Some(key_ids) = forget_local(app, id)? else {
        return Ok(0);
    };
    app.recorder
        .delete_user(id, key_ids)
        .await
        .map_err(|e| SharedError::Local(e.to_string()))
}

/// Pushes a user known here but not in PostgreSQL (from before cluster mode); never overwrites.
pub(super) async fn push_user(cluster: &Cluster, u: &UserRow) -> Result<(), SharedError> {
    let c = client(cluster).await?;
    c.execute(
        "WITH u AS (
            INSERT INTO gm_users (id, tier, email, created_at) VALUES ($1, $2, $3, $4)
            ON CONFLICT (id) DO NOTHING RETURNING id)
         SELECT pg_notify('gm_changes', 'user:' || id) FROM u",
        &[&u.id, &u.tier, &u.email, &seconds(u.created_at)],
    )
    .await
    .map_err(|e| failed(cluster, e))?;
    Ok(())
}

/// Pushes a key known here: a new one (its user must be there, not deleted), or the revocation
/// of one PostgreSQL still has active. Never un-revokes.
pub(super) async fn push_key(cluster: &Cluster, k: &KeyRow) -> Result<(), SharedError> {
    let c = client(cluster).await?;
    c.execute(
        "WITH k AS (
            INSERT INTO gm_keys (key_id, user_id, hash, prefix, created_at, revoked_at)
            SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM gm_users WHERE id = $2 AND NOT deleted)
            ON CONFLICT (key_id) DO UPDATE SET revoked_at = EXCLUDED.revoked_at
            WHERE gm_keys.revoked_at IS NULL AND EXCLUDED.revoked_at IS NOT NULL
            RETURNING key_id)
         SELECT pg_notify('gm_changes', 'key:' || key_id) FROM k",
        &[
            &k.key_id,
            &k.user_id,
            &k.hash,
            &k.prefix,
            &seconds(k.created_at),
            &k.revoked_at,
        ],
    )
    .await
    .map_err(|e| failed(cluster, e))?;
    Ok(())
}
