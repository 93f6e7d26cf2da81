//! The kinds of upstream resources a user can own: named by the route policy (which methods act
//! on which kind) and kept by the ownership index.

/// The kinds of upstream resources a user can own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `files/{id}`.
    File,
    /// `cachedContents/{id}`.
    CachedContent,
    /// `batches/{id}`.
    Batch,
    /// `tunedModels/{id}`.
    TunedModel,
    /// `fileSearchStores/{id}` (its documents and operations go with it).
    FileSearchStore,
    /// `operations/{id}` or `models/{model}/operations/{id}`.
    Operation,
}

impl Kind {
    /// Every kind, in the order the admin API lists them.
    pub const ALL: [Kind; 6] = [
        Kind::File,
        Kind::CachedContent,
        Kind::Batch,
        Kind::TunedModel,
        Kind::FileSearchStore,
        Kind::Operation,
    ];

    /// The collection segment of the kind's names.
    pub fn collection(self) -> &'static str {
        match self {
            Kind::File => "files",
            Kind::CachedContent => "cachedContents",
            Kind::Batch => "batches",
            Kind::TunedModel => "tunedModels",
            Kind::FileSearchStore => "fileSearchStores",
            Kind::Operation => "operations",
        }
    }

    /// The kind of a collection segment.
    pub fn of_collection(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.collection() == s)
    }

    /// The field Gemini's list answer puts the items in (batches are listed as operations).
    pub fn list_field(self) -> &'static str {
        match self {
            Kind::Batch => "operations",
            k => k.collection(),
        }
    }
}
