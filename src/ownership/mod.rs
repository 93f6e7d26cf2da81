//! Who owns which upstream resource. Every user's calls reach Gemini under the one real key, so
//! upstream all resources share one project; the gateway keeps them apart. A resource created
//! through the gateway (a file, a cached content, a batch, a tuned model, a file search store,
//! a long-running operation) belongs to the user who created it, recorded durably from the
//! upstream's answer. A resource the caller does not own is answered as Gemini answers one that
//! does not exist, so ownership cannot be probed.
//!
//! This module owns the names, the index ([`Owners`]) and the scanner of references inside
//! request bodies ([`references`]); the proxy decides when to ask.

pub mod references;
mod store;

pub use store::{OwnedEntry, Owners, OwnershipError};

/// The kinds of upstream resources (defined with the route policy, which names them).
pub use crate::policy::kind::Kind;

/// The owned resource a path (without version, with its `:verb` cut off) acts on: its kind and
/// its name in the index (`files/abc`; nested names go with their parent, except operations of
/// a model, which are resources of their own). `None` when the path names no resource.
pub fn resource_of(path: &str) -> Option<(Kind, String)> {
    let path = path.split_once(':').map_or(path, |(p, _)| p);
    let mut segs = path.split('/');
    let collection = segs.next()?;
    let id = segs.next().filter(|s| !s.is_empty())?;
    if collection == "models" {
        return match (segs.next(), segs.next()) {
            (Some("operations"), Some(op)) if valid_id(op) && valid_id(id) => Some((
                Kind::Operation,
                format!("models/{id}/operations/{op}").to_ascii_lowercase(),
            )),
            _ => None,
        };
    }
    let kind = Kind::of_collection(collection)?;
    valid_id(id).then(|| (kind, format!("{collection}/{}", id.to_ascii_lowercase())))
}

/// The index name of a resource name as Gemini writes it in answers and bodies
/// (`files/abc`, `tunedModels/x/operations/y` → `tunedModels/x`).
pub fn index_name(name: &str) -> Option<(Kind, String)> {
    resource_of(name)
}

/// Resource ids are short runs of letters, digits, `-`, `_` and `.` (model ids have dots).
/// Anything else (escapes, spaces, path tricks) is not a name the index can hold.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && id != "."
        && id != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_paths() {
        assert_eq!(resource_of("files/abc"), Some((Kind::File, "files/abc".into())));
        assert_eq!(
            resource_of("files/ABC:download"),
            Some((Kind::File, "files/abc".into()))
        );
        assert_eq!(
            resource_of("fileSearchStores/s1/documents/d"),
            Some((Kind::FileSearchStore, "fileSearchStores/s1".into()))
        );
        assert_eq!(
            resource_of("tunedModels/t/operations/o"),
            Some((Kind::TunedModel, "tunedModels/t".into()))
        );
        assert_eq!(
            resource_of("models/veo-3.0/operations/op1"),
            Some((Kind::Operation, "models/veo-3.0/operations/op1".into()))
        );
        assert_eq!(resource_of("models/gemini-2.5-flash"), None);
        assert_eq!(resource_of("files"), None);
        assert_eq!(resource_of("files/"), None);
        assert_eq!(resource_of("files/a%62"), None);
        assert_eq!(resource_of("files/.."), None);
        assert_eq!(resource_of("Files/abc"), None);
    }
}
