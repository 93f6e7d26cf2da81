//! One versioned step of the PostgreSQL schema (the list and how it is applied: `schema`).

/// One step of the schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its version: applied in order, each once.
    pub version: i32,
    /// What it does, in a few words.
    pub name: &'static str,
    /// The SQL (several statements).
    pub sql: &'static str,
}
