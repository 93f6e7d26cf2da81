//! Version 2 of the PostgreSQL schema: what replicas share besides the ledger.

use crate::cluster::migration::Migration;

/// Users, keys (hashes only), upload sessions, resource ownership and alert marks.
pub const MIGRATION: Migration = Migration {
    version: 2,
    name: "shared users, keys, uploads, ownership, alert marks",
    sql: r#"
CREATE TABLE gm_users (
    id text PRIMARY KEY,
    tier text NOT NULL,
    email text,
    created_at timestamptz NOT NULL,
    -- A tombstone, so a replica that missed the deletion learns of it at its next resync.
    deleted boolean NOT NULL DEFAULT false
);

-- Never the plaintext: the SHA-256 of the key, as the embedded store keeps it.
CREATE TABLE gm_keys (
    key_id text PRIMARY KEY,
    user_id text NOT NULL,
    hash text NOT NULL UNIQUE,
    prefix text NOT NULL,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX gm_keys_user ON gm_keys (user_id);

-- The upload id is a bearer capability: kept as its SHA-256 (hex) only.
CREATE TABLE gm_upload_sessions (
    upload_hash text PRIMARY KEY,
    key_id text NOT NULL,
    declared bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Index name -> owner, plus the settled mark and the note the embedded index keeps per name.
CREATE TABLE gm_resources (
    name text PRIMARY KEY,
    user_id text,
    created_ms bigint NOT NULL DEFAULT 0,
    deleted boolean NOT NULL DEFAULT false,
    settled boolean NOT NULL DEFAULT false,
    -- The replica billing it now (a one-time settlement), and since when: a claim left by a
    -- replica that died expires, so the resource is billed on a later read, never lost.
    settling text,
    settling_at timestamptz,
    note bytea
);
CREATE INDEX gm_resources_user ON gm_resources (user_id);

-- One row per alert across replicas: the first INSERT decides which replica's alert (named by
-- the record that crossed the line) is delivered.
CREATE TABLE gm_alert_marks (
    user_id text NOT NULL,
    user_created bigint NOT NULL,
    month text NOT NULL,
    quota text NOT NULL,
    threshold smallint NOT NULL,
    record_id text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, user_created, month, quota, threshold)
);
"#,
};
