//! The OpenAPI 3.1 document of the gateway's own routes (`GET /openapi.json`): usage API,
//! admin API, statements, health, metrics and the pages; not the proxied Gemini routes.
//!
//! Built with utoipa from the schema types below (`ToSchema`) and one `#[utoipa::path]` per
//! operation. The handlers build their JSON in place, so these types are the contract they are
//! held to: schemathesis (`scripts/schemathesis`) checks every operation's answers against them
//! and `tests/openapi.rs` checks that every routed path is here.

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use crate::proxy::body::ProxyBody;

/// The Gemini-style error envelope every error of the gateway is answered with.
#[derive(ToSchema)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

/// The inside of [`ErrorEnvelope`].
#[derive(ToSchema)]
pub struct ErrorBody {
    /// HTTP status code.
    pub code: u16,
    /// google.rpc status name, e.g. `INVALID_ARGUMENT`.
    pub status: String,
    /// What went wrong, for people.
    pub message: String,
    /// `google.rpc.ErrorInfo` details, when there are any.
    pub details: Option<Vec<Value>>,
}

/// `GET /healthz`.
#[derive(ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` while storage writes fail.
    #[schema(pattern = "^(ok|degraded)$")]
    pub status: String,
    /// The recorder's state.
    pub storage: HealthStorage,
    /// Cluster mode only: the ledger's shipping to PostgreSQL.
    pub cluster: Option<HealthCluster>,
}

/// The cluster part of [`Health`] (cluster mode only).
#[derive(ToSchema)]
pub struct HealthCluster {
    /// Usage records written on this replica and not shipped to PostgreSQL yet.
    pub shipping_backlog: u64,
    /// Age of the oldest of them, in seconds (null when none waits).
    pub oldest_unshipped_seconds: Option<f64>,
    /// Records this process shipped.
    pub records_shipped: u64,
    /// The shipper's last PostgreSQL error, cleared by its next success.
    pub last_error: Option<String>,
}

/// The storage part of [`Health`].
#[derive(ToSchema)]
pub struct HealthStorage {
    /// Records handed to the recorder and not yet written.
    pub queued_records: u64,
    /// The last storage error, if any.
    pub last_error: Option<String>,
}

/// Usage amounts; `cost` is an exact decimal string.
#[derive(ToSchema)]
pub struct Amounts {
    /// Messages.
    pub messages: u64,
    /// Tokens.
    pub tokens: u64,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Exact cost, decimal string.
    pub cost: String,
    /// Response bytes streamed back.
    pub response_bytes: u64,
}

/// What calls in flight hold under hard enforcement.
#[derive(ToSchema)]
pub struct Reserved {
    /// Tokens held.
    pub tokens: u64,
    /// Cost held, decimal string.
    pub cost: String,
}

/// A tier's limits; `null` where unlimited.
#[derive(ToSchema)]
pub struct Limits {
    /// Messages per month.
    pub messages: Option<u64>,
    /// Tokens per month.
    pub tokens: Option<u64>,
    /// Bytes per month.
    pub bytes: Option<u64>,
    /// Cost per month, decimal string.
    pub cost: Option<String>,
    /// Requests per minute per key.
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute per user.
    pub tokens_per_minute: Option<u64>,
    /// Model allow-list.
    pub models: Option<Vec<String>>,
}

/// Percent of each limited quota used; `null` where unlimited.
#[derive(ToSchema)]
pub struct Percentage {
    /// Messages.
    pub messages: Option<f64>,
    /// Tokens.
    pub tokens: Option<f64>,
    /// Bytes.
    pub bytes: Option<f64>,
    /// Cost.
    pub cost: Option<f64>,
}

/// `GET /api/usage/current`: this month against the plan.
#[derive(ToSchema)]
pub struct Current {
    /// The user.
    pub user_id: String,
    /// The user's tier.
    pub tier: String,
    /// `YYYY-MM`.
    pub month: String,
    /// When the month's quotas reset (RFC 3339).
    pub resets_at: String,
    /// This month's totals.
    pub current_month: Amounts,
    /// Held by calls in flight.
    pub reserved: Reserved,
    /// The tier's limits.
    pub limits: Limits,
    /// Percent used.
    pub percentage: Percentage,
}

/// A usage record.
#[derive(ToSchema)]
pub struct UsageRecord {
    /// 32 hex digits, sortable by time.
    pub id: String,
    /// The user billed.
    pub user_id: String,
    /// `message_sent`, `ai_response` or `file_upload`.
    #[schema(rename = "type", pattern = "^(message_sent|ai_response|file_upload)$")]
    pub kind: String,
    /// Tokens.
    pub tokens: u64,
    /// Messages.
    pub messages: u64,
    /// Bytes.
    pub bytes: u64,
    /// Exact cost, decimal string.
    pub cost: String,
    /// What the record says beyond its amounts.
    pub metadata: Value,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// A page of records, newest first.
#[derive(ToSchema)]
pub struct RecordPage {
    /// The records.
    pub data: Vec<UsageRecord>,
    /// The cursor of the next page, `null` at the end.
    pub next_cursor: Option<String>,
}

/// One day and type of usage.
#[derive(ToSchema)]
pub struct DayRow {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Record type.
    #[schema(rename = "type")]
    pub kind: String,
    /// Messages.
    pub messages: u64,
    /// Tokens.
    pub tokens: u64,
    /// Bytes.
    pub bytes: u64,
    /// Cost, decimal string.
    pub cost: String,
    /// Records.
    pub records: u64,
}

/// Per day and type totals.
#[derive(ToSchema)]
pub struct Daily {
    /// Days covered.
    pub days: u64,
    /// First day (`YYYY-MM-DD`).
    pub since: String,
    /// The rows.
    pub data: Vec<DayRow>,
}

/// A row of the breakdown: a type (`type`) or a model (`model`) and its totals.
#[derive(ToSchema)]
pub struct BreakdownRow {
    /// The record type (type rows; `null` in the total).
    #[schema(rename = "type")]
    pub kind: Option<String>,
    /// The model (model rows; `null` for records without one).
    pub model: Option<String>,
    /// Records.
    pub records: u64,
    /// Messages.
    pub messages: u64,
    /// Tokens.
    pub tokens: u64,
    /// Bytes.
    pub bytes: u64,
    /// Cost, decimal string.
    pub cost: String,
}

/// `GET /api/usage/breakdown`: a month by type and by model.
#[derive(ToSchema)]
pub struct Breakdown {
    /// `YYYY-MM`.
    pub month: String,
    /// The month's totals.
    pub total: BreakdownRow,
    /// By record type.
    pub by_type: Vec<BreakdownRow>,
    /// By model, most cost first.
    pub by_model: Vec<BreakdownRow>,
    /// Whether the model rows cover every record of the month.
    pub models_complete: bool,
    /// Records read for the model rows.
    pub records_scanned: u64,
}

/// A user.
#[derive(ToSchema)]
pub struct User {
    /// 1 to 64 characters of `a-z A-Z 0-9 _ - .`.
    pub id: String,
    /// The tier.
    pub tier: String,
    /// Where alerts are mailed.
    pub email: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// This month against the plan (`GET /admin/users/{id}` only).
    pub current: Option<Current>,
}

/// `POST /admin/users`.
#[derive(ToSchema)]
pub struct NewUser {
    /// 1 to 64 characters of `a-z A-Z 0-9 _ - .`.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    pub id: String,
    /// A configured tier.
    pub tier: String,
    /// Optional address for alert mails.
    pub email: Option<String>,
}

/// `PATCH /admin/users/{id}`.
#[derive(ToSchema)]
pub struct TierChange {
    /// A configured tier.
    pub tier: String,
}

/// `DELETE /admin/users/{id}`.
#[derive(ToSchema)]
pub struct UserDeleted {
    /// The user deleted.
    pub deleted: String,
    /// Their records removed.
    pub records_deleted: u64,
}

/// `POST /admin/users/{id}/keys`: the key, shown this once.
#[derive(ToSchema)]
pub struct NewKey {
    /// `gm_` and at least 32 base62 characters.
    pub key: String,
    /// The key's id (for listing and revoking).
    pub key_id: String,
    /// The owner.
    pub user_id: String,
}

/// A key as listed (never its plaintext).
#[derive(ToSchema)]
pub struct KeyInfo {
    /// The key's id.
    pub key_id: String,
    /// The key's first characters.
    pub prefix: Option<String>,
    /// RFC 3339.
    pub created_at: Option<String>,
    /// RFC 3339, `null` while active.
    pub revoked_at: Option<String>,
    /// Not revoked.
    pub active: bool,
}

/// `GET /admin/users/{id}/keys`.
#[derive(ToSchema)]
pub struct KeyList {
    /// The keys.
    pub data: Vec<KeyInfo>,
}

/// `DELETE /admin/keys/{key_id}`.
#[derive(ToSchema)]
pub struct KeyRevoked {
    /// The key revoked.
    pub revoked: String,
}

/// Month totals over every user.
#[derive(ToSchema)]
pub struct Summary {
    /// `YYYY-MM`.
    pub month: String,
    /// Messages.
    pub messages: u64,
    /// Tokens.
    pub tokens: u64,
    /// Bytes.
    pub bytes: u64,
    /// Cost, decimal string.
    pub cost: String,
    /// The same as `cost`.
    pub revenue: String,
    /// Response bytes.
    pub response_bytes: u64,
    /// Users with usage.
    pub active_users: u64,
    /// Records.
    pub records: u64,
}

/// A group's totals (a model, a user, a tag value).
#[derive(ToSchema)]
pub struct GroupRow {
    /// The model (`/admin/analytics/models`).
    pub model: Option<String>,
    /// The user (`/admin/analytics/top-users`).
    pub user_id: Option<String>,
    /// The tag value (`/admin/analytics/tags`).
    pub value: Option<String>,
    /// Records.
    pub requests: u64,
    /// Messages.
    pub messages: u64,
    /// Tokens.
    pub tokens: u64,
    /// Bytes.
    pub bytes: u64,
    /// Cost, decimal string.
    pub cost: String,
}

/// A list of group totals for a month.
#[derive(ToSchema)]
pub struct GroupList {
    /// `YYYY-MM`.
    pub month: String,
    /// `cost`, `tokens` or `messages` (top users).
    pub by: Option<String>,
    /// The tag's name (tags).
    pub name: Option<String>,
    /// The rows.
    pub data: Vec<GroupRow>,
}

/// `GET /admin/alerts`.
#[derive(ToSchema)]
pub struct AlertList {
    /// `YYYY-MM`.
    pub month: String,
    /// The user asked for, if any.
    pub user_id: Option<String>,
    /// Alerts and deliveries by state.
    pub counts: Value,
    /// The delivery pipeline's counters.
    pub metrics: Value,
    /// The alerts, each with its deliveries.
    pub data: Vec<Value>,
}

/// `GET /admin/config/status`, `POST /admin/reload`.
#[derive(ToSchema)]
pub struct ConfigStatus {
    /// Whether the reload succeeded (`POST /admin/reload` only).
    pub ok: Option<bool>,
    /// When the running config was loaded (RFC 3339).
    pub loaded_at: Option<String>,
    /// Why the last load failed, if it did.
    pub last_error: Option<String>,
}

/// `POST /admin/retention/run`.
#[derive(ToSchema)]
pub struct RetentionRun {
    /// Records deleted.
    pub deleted: u64,
    /// Records before this time (RFC 3339) were deleted.
    pub cutoff: String,
}

/// `?month=YYYY-MM` (default: this month, UTC).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MonthQuery {
    /// `YYYY-MM`.
    #[param(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$")]
    pub month: Option<String>,
}

/// A statement's query.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatementQuery {
    /// `YYYY-MM` (default: this month, UTC).
    #[param(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$")]
    pub month: Option<String>,
    /// `pdf` (default) or `csv`.
    #[param(pattern = "^(pdf|csv)$")]
    pub format: Option<String>,
}

/// A page's query.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Records per page, default 50; at most 500 (a larger value is taken as 500).
    #[param(minimum = 1)]
    pub limit: Option<u64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9a-f]{16}$")]
    pub cursor: Option<String>,
}

/// `?days=N`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DaysQuery {
    /// Days back from today, default 30; at most 366 (a larger value is taken as 366).
    #[param(minimum = 1)]
    pub days: Option<u64>,
}

/// `GET /admin/usage` filters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AdminUsageQuery {
    /// Only this user's records.
    pub user_id: Option<String>,
    /// Only records of this type (empty: any).
    #[param(rename = "type", pattern = "^(message_sent|ai_response|file_upload)?$")]
    pub kind: Option<String>,
    /// From (RFC 3339 or `YYYY-MM-DD`), inclusive (empty: no bound).
    #[param(
        pattern = "^([0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])(T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))?)?$"
    )]
    pub from: Option<String>,
    /// To (RFC 3339 or `YYYY-MM-DD`), exclusive (empty: no bound).
    #[param(
        pattern = "^([0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])(T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))?)?$"
    )]
    pub to: Option<String>,
    /// Records per page, default 50; at most 500 (a larger value is taken as 500).
    #[param(minimum = 1)]
    pub limit: Option<u64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9a-f]{16}$")]
    pub cursor: Option<String>,
}

/// `GET /admin/analytics/top-users`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TopUsersQuery {
    /// `cost` (default), `tokens` or `messages`.
    #[param(pattern = "^(cost|tokens|messages)$")]
    pub by: Option<String>,
    /// `YYYY-MM`.
    #[param(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$")]
    pub month: Option<String>,
    /// Rows, default 10; at most 1000 (a larger value is taken as 1000).
    #[param(minimum = 1)]
    pub limit: Option<u64>,
}

/// `GET /admin/analytics/tags`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TagsQuery {
    /// The tag's name (`x-meter-tag-<name>`).
    pub name: String,
    /// `YYYY-MM`.
    #[param(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$")]
    pub month: Option<String>,
    /// Rows, default 10; at most 1000 (a larger value is taken as 1000).
    #[param(minimum = 1)]
    pub limit: Option<u64>,
}

/// `GET /admin/export`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// `YYYY-MM`.
    #[param(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$")]
    pub month: Option<String>,
    /// `csv` (default) or `jsonl`.
    #[param(pattern = "^(csv|jsonl)$")]
    pub format: Option<String>,
}

/// `?limit=&cursor=` of the admin pages that go on by an opaque cursor.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CursorQuery {
    /// Items per page (capped by the route).
    #[param(minimum = 1)]
    pub limit: Option<u64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of an admin list.
#[derive(ToSchema)]
pub struct CursorPage {
    /// The items.
    pub data: Vec<Value>,
    /// The next page's cursor; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /admin/resources`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResourcesQuery {
    /// Only this user's resources.
    pub user: Option<String>,
    /// One kind: files, cachedContents, batches, tunedModels, fileSearchStores or operations.
    pub kind: Option<String>,
    /// `true`: one upstream page of resources no one owns.
    pub unowned: Option<String>,
    /// The upstream's page token (with `unowned=true`).
    #[param(rename = "pageToken")]
    pub page_token: Option<String>,
}

/// `GET /admin/resources`.
#[derive(ToSchema)]
pub struct ResourceList {
    /// The resources (owned: name, kind, user_id, created_at_ms; unowned: the upstream's objects).
    pub data: Vec<Value>,
    /// The upstream's next page (unowned only).
    #[schema(rename = "nextPageToken")]
    pub next_page_token: Option<String>,
}

/// `PUT /admin/resources/{collection}/{id}`.
#[derive(ToSchema)]
pub struct ResourceAssign {
    /// The user to give it to.
    pub user: String,
}

/// `GET /admin/alerts`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertsQuery {
    /// Only this user's alerts (empty: everyone's).
    pub user_id: Option<String>,
    /// `YYYY-MM` (empty: this month).
    #[param(pattern = "^([0-9]{4}-(0[1-9]|1[0-2]))?$")]
    pub month: Option<String>,
}

/// The operations: doc-only functions, one per route (the router is `api::route`).
pub mod ops {
    #![allow(missing_docs)]
    use super::*;

    /// Health of the gateway and its storage.
    #[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
    pub fn healthz() {}

    /// Prometheus metrics.
    #[utoipa::path(get, path = "/metrics", tag = "health",
        responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
    pub fn metrics() {}

    /// This document.
    #[utoipa::path(get, path = "/openapi.json", tag = "health",
        responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
    pub fn openapi() {}

    /// The usage page for a person (public; it asks for the key).
    #[utoipa::path(get, path = "/dashboard", tag = "pages",
        responses((status = 200, description = "HTML page", content_type = "text/html", body = String)))]
    pub fn dashboard() {}

    /// The operator's analytics page (public; it asks for the admin token).
    #[utoipa::path(get, path = "/admin/dashboard", tag = "pages",
        responses((status = 200, description = "HTML page", content_type = "text/html", body = String)))]
    pub fn admin_dashboard() {}

    /// This month's usage against the plan.
    #[utoipa::path(get, path = "/api/usage/current", tag = "usage", security(("api_key" = []), ("api_key_query" = []), ("bearer" = [])),
        responses((status = 200, body = Current), (status = 401, body = ErrorEnvelope)))]
    pub fn usage_current() {}

    /// The caller's records, newest first.
    #[utoipa::path(get, path = "/api/usage/history", tag = "usage", params(PageQuery), security(("api_key" = []), ("api_key_query" = []), ("bearer" = [])),
        responses((status = 200, body = RecordPage), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope)))]
    pub fn usage_history() {}

    /// The caller's usage per day and type.
    #[utoipa::path(get, path = "/api/usage/daily", tag = "usage", params(DaysQuery), security(("api_key" = []), ("api_key_query" = []), ("bearer" = [])),
        responses((status = 200, body = Daily), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope)))]
    pub fn usage_daily() {}

    /// The caller's month by type and by model.
    #[utoipa::path(get, path = "/api/usage/breakdown", tag = "usage", params(MonthQuery), security(("api_key" = []), ("api_key_query" = []), ("bearer" = [])),
        responses((status = 200, body = Breakdown), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope)))]
    pub fn usage_breakdown() {}

    /// Server-Sent Events: an `event: usage` with the `current` body after every change.
    #[utoipa::path(get, path = "/api/usage/stream", tag = "usage", security(("api_key" = []), ("api_key_query" = []), ("bearer" = [])),
        responses((status = 200, description = "text/event-stream of `current` bodies", content_type = "text/event-stream", body = String),
                  (status = 401, body = ErrorEnvelope)))]
    pub fn usage_stream() {}

    /// The caller's monthly statement.
    #[utoipa::path(get, path = "/api/usage/statement", tag = "statements", params(StatementQuery), security(("api_key" = []), ("api_key_query" = []), ("bearer" = [])),
        responses((status = 200, description = "The statement (a download)", content(
                      (String = "application/pdf"), (String = "text/csv"))),
                  (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope)))]
    pub fn usage_statement() {}

    /// Creates a user.
    #[utoipa::path(post, path = "/admin/users", tag = "admin", request_body = NewUser, security(("admin_token" = [])),
        responses((status = 201, body = User), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope),
                  (status = 403, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope)))]
    pub fn create_user() {}

    /// A user, with this month's usage.
    #[utoipa::path(get, path = "/admin/users/{id}", tag = "admin", params(("id" = String, Path, description = "User id")), security(("admin_token" = [])),
        responses((status = 200, body = User), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
    pub fn get_user() {}

    /// Changes a user's tier.
    #[utoipa::path(patch, path = "/admin/users/{id}", tag = "admin", params(("id" = String, Path, description = "User id")), request_body = TierChange, security(("admin_token" = [])),
        responses((status = 200, body = User), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope),
                  (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
    pub fn patch_user() {}

    /// Deletes a user, their keys and their records.
    #[utoipa::path(delete, path = "/admin/users/{id}", tag = "admin", params(("id" = String, Path, description = "User id")), security(("admin_token" = [])),
        responses((status = 200, body = UserDeleted), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
    pub fn delete_user() {}

    /// Issues a key (its plaintext is in this answer only).
    #[utoipa::path(post, path = "/admin/users/{id}/keys", tag = "admin", params(("id" = String, Path, description = "User id")), security(("admin_token" = [])),
        responses((status = 201, body = NewKey), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
    pub fn create_key() {}

    /// A user's keys (no plaintext).
    #[utoipa::path(get, path = "/admin/users/{id}/keys", tag = "admin", params(("id" = String, Path, description = "User id")), security(("admin_token" = [])),
        responses((status = 200, body = KeyList), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
    pub fn list_keys() {}

    /// A user's monthly statement.
    #[utoipa::path(get, path = "/admin/users/{id}/statement", tag = "statements", params(("id" = String, Path, description = "User id"), StatementQuery), security(("admin_token" = [])),
        responses((status = 200, description = "The statement (a download)", content(
                      (String = "application/pdf"), (String = "text/csv"))),
                  (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
    pub fn user_statement() {}

    /// Revokes a key, at once.
    #[utoipa::path(delete, path = "/admin/keys/{key_id}", tag = "admin", params(("key_id" = String, Path, description = "Key id")), security(("admin_token" = [])),
        responses((status = 200, body = KeyRevoked), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
    pub fn revoke_key() {}

    /// Records across users, newest first.
    #[utoipa::path(get, path = "/admin/usage", tag = "admin", params(AdminUsageQuery), security(("admin_token" = [])),
        responses((status = 200, body = RecordPage), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn admin_usage() {}

    /// Everyone's usage per day and type.
    #[utoipa::path(get, path = "/admin/analytics/daily", tag = "analytics", params(DaysQuery), security(("admin_token" = [])),
        responses((status = 200, body = Daily), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn analytics_daily() {}

    /// Month totals over every user.
    #[utoipa::path(get, path = "/admin/analytics/summary", tag = "analytics", params(MonthQuery), security(("admin_token" = [])),
        responses((status = 200, body = Summary), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn analytics_summary() {}

    /// Month totals per model.
    #[utoipa::path(get, path = "/admin/analytics/models", tag = "analytics", params(MonthQuery), security(("admin_token" = [])),
        responses((status = 200, body = GroupList), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn analytics_models() {}

    /// The month's top users.
    #[utoipa::path(get, path = "/admin/analytics/top-users", tag = "analytics", params(TopUsersQuery), security(("admin_token" = [])),
        responses((status = 200, body = GroupList), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn analytics_top_users() {}

    /// Month totals per value of a tag.
    #[utoipa::path(get, path = "/admin/analytics/tags", tag = "analytics", params(TagsQuery), security(("admin_token" = [])),
        responses((status = 200, body = GroupList), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn analytics_tags() {}

    /// A month of records, streamed.
    #[utoipa::path(get, path = "/admin/export", tag = "admin", params(ExportQuery), security(("admin_token" = [])),
        responses((status = 200, description = "CSV (header `id,user_id,type,tokens,messages,bytes,cost,metadata,created_at`) or JSON lines",
                      content((String = "text/csv"), (String = "application/x-ndjson"))),
                  (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn export() {}

    /// A month's quota alerts and their deliveries.
    #[utoipa::path(get, path = "/admin/alerts", tag = "admin", params(AlertsQuery), security(("admin_token" = [])),
        responses((status = 200, body = AlertList), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn alerts() {}

    /// Reloads the config now.
    #[utoipa::path(post, path = "/admin/reload", tag = "admin", security(("admin_token" = [])),
        responses((status = 200, body = ConfigStatus), (status = 400, description = "The config does not validate; the running one stays", body = ConfigStatus),
                  (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn reload() {}

    /// When the running config was loaded, and the last load error.
    #[utoipa::path(get, path = "/admin/config/status", tag = "admin", security(("admin_token" = [])),
        responses((status = 200, body = ConfigStatus), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn config_status() {}

    /// The users, page by page (by id).
    #[utoipa::path(get, path = "/admin/users", tag = "admin", params(CursorQuery), security(("admin_token" = [])),
        responses((status = 200, body = CursorPage), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn list_users() {}

    /// A user's totals for a month.
    #[utoipa::path(get, path = "/admin/users/{id}/usage", tag = "admin", params(("id" = String, Path, description = "The user id"), MonthQuery),
        security(("admin_token" = [])),
        responses((status = 200, body = Value), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope),
                  (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
    pub fn user_usage() {}

    /// The audit trail of admin actions, newest first.
    #[utoipa::path(get, path = "/admin/audit", tag = "admin", params(CursorQuery), security(("admin_token" = [])),
        responses((status = 200, body = CursorPage), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn audit() {}

    /// Upstream resources: a user's (`user`), or one upstream page of those no one owns
    /// (`unowned=true`, with `kind` and `pageToken`).
    #[utoipa::path(get, path = "/admin/resources", tag = "admin", params(ResourcesQuery), security(("admin_token" = [])),
        responses((status = 200, body = ResourceList), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope),
                  (status = 403, body = ErrorEnvelope), (status = 502, body = ErrorEnvelope), (status = 503, body = ErrorEnvelope)))]
    pub fn list_resources() {}

    /// Gives an upstream resource (e.g. `files/abc`) to a user.
    #[utoipa::path(put, path = "/admin/resources/{collection}/{id}", tag = "admin",
        params(("collection" = String, Path, description = "files, cachedContents, batches, tunedModels, fileSearchStores or operations"),
               ("id" = String, Path, description = "The resource id")),
        request_body = ResourceAssign, security(("admin_token" = [])),
        responses((status = 200, body = Value), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope),
                  (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope), (status = 500, body = ErrorEnvelope)))]
    pub fn assign_resource() {}

    /// Deletes an upstream resource (with the real key) and forgets its owner.
    #[utoipa::path(delete, path = "/admin/resources/{collection}/{id}", tag = "admin",
        params(("collection" = String, Path, description = "files, cachedContents, batches, tunedModels, fileSearchStores or operations"),
               ("id" = String, Path, description = "The resource id")),
        security(("admin_token" = [])),
        responses((status = 200, body = Value), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope),
                  (status = 403, body = ErrorEnvelope), (status = 502, body = ErrorEnvelope), (status = 503, body = ErrorEnvelope)))]
    pub fn delete_resource() {}

    /// Cluster mode: the live replicas (version, config hash, shipping backlog) and the health
    /// of Redis and PostgreSQL. 404 when the gateway runs alone.
    #[utoipa::path(get, path = "/admin/cluster", tag = "admin", security(("admin_token" = [])),
        responses((status = 200, body = Value), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope),
                  (status = 404, body = ErrorEnvelope)))]
    pub fn cluster() {}

    /// Deletes records older than `storage.retention_months` now.
    #[utoipa::path(post, path = "/admin/retention/run", tag = "admin", security(("admin_token" = [])),
        responses((status = 200, body = RetentionRun), (status = 401, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
    pub fn retention_run() {}
}

/// Adds the security schemes: the caller's key (header, query or bearer) and the admin token.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-goog-api-key"))),
        );
        c.add_security_scheme(
            "api_key_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("key"))),
        );
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token (server.admin_token_env)"))
                    .build(),
            ),
        );
    }
}

/// The document's root.
#[derive(OpenApi)]
#[openapi(
    info(title = "gemini-meter", description = "The gateway's own API: usage (the caller's key), admin (the admin token), statements, health and metrics. The proxied Gemini routes are Gemini's own API and not described here."),
    paths(
        ops::healthz, ops::metrics, ops::openapi, ops::dashboard, ops::admin_dashboard,
        ops::usage_current, ops::usage_history, ops::usage_daily, ops::usage_breakdown, ops::usage_stream, ops::usage_statement,
        ops::create_user, ops::get_user, ops::patch_user, ops::delete_user, ops::create_key, ops::list_keys, ops::user_statement,
        ops::revoke_key, ops::admin_usage, ops::analytics_daily, ops::analytics_summary, ops::analytics_models,
        ops::analytics_top_users, ops::analytics_tags, ops::export, ops::alerts, ops::reload, ops::config_status, ops::retention_run,
        ops::list_resources, ops::assign_resource, ops::delete_resource, ops::list_users, ops::user_usage, ops::audit, ops::cluster,
    ),
    modifiers(&Security),
    tags(
        (name = "usage", description = "A caller's own usage, with the key the gateway issued them"),
        (name = "statements", description = "Monthly statements (PDF or CSV)"),
        (name = "admin", description = "Users, keys, records, config (admin token)"),
        (name = "analytics", description = "Usage across users (admin token)"),
        (name = "health", description = "Health, metrics and this document"),
        (name = "pages", description = "The HTML pages"),
    )
)]
pub struct ApiDoc;

/// The document as built from the types, once.
static DOC: LazyLock<Value> = LazyLock::new(|| {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    serde_json::to_value(&doc).unwrap_or_default()
});

/// The document as served: the built one with the running config's tier names as the enum of
/// the tier fields (tiers live in the config, not in the code).
pub fn document<'a>(tiers: impl IntoIterator<Item = &'a String>) -> Value {
    let mut doc = DOC.clone();
    let tiers: Vec<Value> = tiers.into_iter().map(|t| Value::String(t.clone())).collect();
    for schema in ["NewUser", "TierChange"] {
        if let Some(tier) = doc
            .pointer_mut(&format!("/components/schemas/{schema}/properties/tier"))
            .and_then(Value::as_object_mut)
        {
            tier.insert("enum".into(), Value::Array(tiers.clone()));
        }
    }
    doc
}

/// `GET /openapi.json`.
pub fn response<'a>(tiers: impl IntoIterator<Item = &'a String>) -> Response<ProxyBody> {
    let body = Bytes::from(document(tiers).to_string());
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Each documented path as its segments (`None` for a `{parameter}`) with its methods.
type Templates = Vec<(Vec<Option<String>>, Vec<http::Method>)>;

static TEMPLATES: LazyLock<Templates> = LazyLock::new(|| {
    let mut out = Vec::new();
    for (path, item) in DOC["paths"].as_object().into_iter().flatten() {
        let segs = path
            .trim_start_matches('/')
            .split('/')
            .map(|s| (!s.starts_with('{')).then(|| s.to_string()))
            .collect();
        let methods = item
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(m, _)| http::Method::from_bytes(m.to_uppercase().as_bytes()).ok())
            .collect();
        out.push((segs, methods));
    }
    out
});

/// For a request to a documented path with a method it does not take: the `Allow` header's
/// value (the methods it takes). `None` when the path is not documented or takes the method.
pub fn not_allowed(method: &http::Method, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut allow: Vec<&http::Method> = Vec::new();
    for (tpl, methods) in TEMPLATES.iter() {
        let fits = tpl.len() == segs.len()
            && tpl.iter().zip(&segs).all(|(t, s)| match t {
                Some(lit) => lit == s,
                None => !s.is_empty(),
            });
        if fits {
            if methods.contains(method) {
                return None;
            }
            allow.extend(methods);
        }
    }
    if allow.is_empty() {
        return None;
    }
    allow.sort_by_key(|m| m.as_str());
    allow.dedup();
    Some(allow.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "))
}
