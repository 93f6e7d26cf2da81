//! The route policy: every Gemini REST method the gateway knows, each with one treatment.
//! Deny by default: a method not in [`RULES`] never reaches the upstream, unless the operator
//! lists it under `[routes] allow_unmetered` (unbilled). Billable methods the gateway cannot
//! meter yet are in the table as refused, for the same reason.
//!
//! Paths are judged in their canonical spelling ([`path::canonical`]), and the upstream is sent
//! that same spelling, so what is checked is what Gemini sees.

pub mod kind;
pub mod path;

use http::Method;

pub use kind::Kind;

/// How the gateway treats a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Billed from what flows: admitted against the caller's quotas, then metered.
    Metered,
    /// Forwarded unbilled (authenticated and rate limited): model lists, countTokens.
    Free,
    /// Acts on (creates, lists, reads, changes or deletes) the caller's own resources.
    Owned,
    /// Billable but not metered yet: refused unless the operator allows it unbilled.
    Refused,
}

impl Treatment {
    /// The word the README's table uses.
    pub fn label(self) -> &'static str {
        match self {
            Treatment::Metered => "metered",
            Treatment::Free => "free",
            Treatment::Owned => "owned-resource",
            Treatment::Refused => "refused (billable, not metered)",
        }
    }
}

/// What a method does with owned resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing.
    None,
    /// Acts on the resource its path names: the caller must own it.
    Path,
    /// Deletes the resource its path names (owned); forgotten once the upstream agrees.
    Delete,
    /// Creates a resource of this kind, owned by the caller (named in the answer).
    Create(Kind),
    /// Lists the caller's resources of this kind (answered from the ownership index).
    List(Kind),
    /// Acts on an owned resource (its path) and creates another (named in the answer).
    PathCreate(Kind),
}

/// One method of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Google's method name, e.g. `models.generateContent`.
    pub name: &'static str,
    /// The HTTP method.
    pub method: &'static str,
    /// Under `/upload/` (the media upload endpoint).
    pub upload: bool,
    /// The path after the version, `*` for one id segment, `:verb` on the last.
    pub pattern: &'static str,
    /// The treatment.
    pub treatment: Treatment,
    /// What it does with owned resources.
    pub access: Access,
    /// Its body can name resources (`fileUri`, `cachedContent`, …): scanned as it streams.
    pub refs: bool,
}

const fn rule(
    name: &'static str,
    method: &'static str,
    pattern: &'static str,
    treatment: Treatment,
    access: Access,
    refs: bool,
) -> Rule {
    Rule {
        name,
        method,
        upload: false,
        pattern,
        treatment,
        access,
        refs,
    }
}

use Access::{Create, Delete, List, Path, PathCreate};
use Treatment::{Free, Metered, Owned, Refused};

/// Every method the gateway knows (the generate calls first: they are looked up most).
#[rustfmt::skip]
pub static RULES: &[Rule] = &[
    rule("models.generateContent", "POST", "models/*:generateContent", Metered, Access::None, true),
    rule("models.streamGenerateContent", "POST", "models/*:streamGenerateContent", Metered, Access::None, true),
    rule("openai.chat.completions", "POST", "openai/chat/completions", Metered, Access::None, true),
    rule("models.countTokens", "POST", "models/*:countTokens", Free, Access::None, true),
    rule("models.list", "GET", "models", Free, Access::None, false),
    rule("models.get", "GET", "models/*", Free, Access::None, false),
    rule("openai.models.list", "GET", "openai/models", Free, Access::None, false),
    rule("openai.models.get", "GET", "openai/models/*", Free, Access::None, false),
    Rule { upload: true, ..rule("media.upload", "POST", "files", Metered, Create(Kind::File), false) },
    rule("files.list", "GET", "files", Owned, List(Kind::File), false),
    rule("files.get", "GET", "files/*", Owned, Path, false),
    rule("files.download", "GET", "files/*:download", Owned, Path, false),
    rule("files.delete", "DELETE", "files/*", Owned, Delete, false),
    rule("cachedContents.create", "POST", "cachedContents", Metered, Create(Kind::CachedContent), true),
    rule("cachedContents.list", "GET", "cachedContents", Owned, List(Kind::CachedContent), false),
    rule("cachedContents.get", "GET", "cachedContents/*", Owned, Path, false),
    rule("cachedContents.patch", "PATCH", "cachedContents/*", Refused, Path, true),
    rule("cachedContents.delete", "DELETE", "cachedContents/*", Owned, Delete, false),
    rule("models.batchGenerateContent", "POST", "models/*:batchGenerateContent", Metered, Create(Kind::Batch), true),
    rule("models.asyncBatchEmbedContent", "POST", "models/*:asyncBatchEmbedContent", Refused, Create(Kind::Batch), true),
    rule("batches.list", "GET", "batches", Owned, List(Kind::Batch), false),
    rule("batches.get", "GET", "batches/*", Owned, Path, false),
    rule("batches.cancel", "POST", "batches/*:cancel", Owned, Path, false),
    rule("batches.delete", "DELETE", "batches/*", Owned, Delete, false),
    rule("models.embedContent", "POST", "models/*:embedContent", Metered, Access::None, true),
    rule("models.batchEmbedContents", "POST", "models/*:batchEmbedContents", Metered, Access::None, true),
    rule("models.predict", "POST", "models/*:predict", Metered, Access::None, true),
    rule("models.predictLongRunning", "POST", "models/*:predictLongRunning", Metered, Create(Kind::Operation), true),
    rule("models.operations.get", "GET", "models/*/operations/*", Owned, Path, false),
    rule("operations.list", "GET", "operations", Owned, List(Kind::Operation), false),
    rule("operations.get", "GET", "operations/*", Owned, Path, false),
    rule("operations.cancel", "POST", "operations/*:cancel", Owned, Path, false),
    rule("operations.delete", "DELETE", "operations/*", Owned, Delete, false),
    rule("tunedModels.create", "POST", "tunedModels", Owned, Create(Kind::TunedModel), true),
    rule("tunedModels.list", "GET", "tunedModels", Owned, List(Kind::TunedModel), false),
    rule("tunedModels.get", "GET", "tunedModels/*", Owned, Path, false),
    rule("tunedModels.patch", "PATCH", "tunedModels/*", Owned, Path, false),
    rule("tunedModels.delete", "DELETE", "tunedModels/*", Owned, Delete, false),
    rule("tunedModels.generateContent", "POST", "tunedModels/*:generateContent", Metered, Path, true),
    rule("tunedModels.streamGenerateContent", "POST", "tunedModels/*:streamGenerateContent", Metered, Path, true),
    rule("tunedModels.operations.list", "GET", "tunedModels/*/operations", Owned, Path, false),
    rule("tunedModels.operations.get", "GET", "tunedModels/*/operations/*", Owned, Path, false),
    rule("fileSearchStores.create", "POST", "fileSearchStores", Owned, Create(Kind::FileSearchStore), false),
    rule("fileSearchStores.list", "GET", "fileSearchStores", Owned, List(Kind::FileSearchStore), false),
    rule("fileSearchStores.get", "GET", "fileSearchStores/*", Owned, Path, false),
    rule("fileSearchStores.delete", "DELETE", "fileSearchStores/*", Owned, Delete, false),
    rule("fileSearchStores.importFile", "POST", "fileSearchStores/*:importFile", Refused, PathCreate(Kind::Operation), true),
    Rule { upload: true, ..rule("fileSearchStores.uploadToFileSearchStore", "POST", "fileSearchStores/*:uploadToFileSearchStore", Refused, Path, false) },
    rule("fileSearchStores.documents.list", "GET", "fileSearchStores/*/documents", Owned, Path, false),
    rule("fileSearchStores.documents.get", "GET", "fileSearchStores/*/documents/*", Owned, Path, false),
    rule("fileSearchStores.documents.delete", "DELETE", "fileSearchStores/*/documents/*", Owned, Path, false),
    rule("fileSearchStores.operations.get", "GET", "fileSearchStores/*/operations/*", Owned, Path, false),
    rule("fileSearchStores.upload.operations.get", "GET", "fileSearchStores/*/upload/operations/*", Owned, Path, false),
    rule("openai.embeddings", "POST", "openai/embeddings", Metered, Access::None, true),
    rule("openai.images.generations", "POST", "openai/images/generations", Refused, Access::None, false),
];

/// A request target: under `/upload/` or not, its version, and the path after the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// Under `/upload/`.
    pub upload: bool,
    /// `v1`, `v1beta` or `v1alpha`.
    pub version: &'a str,
    /// The path after the version (no leading slash).
    pub rest: &'a str,
}

impl<'a> Target<'a> {
    /// The target of a canonical path; `None` outside the Gemini API's versions.
    pub fn of(path: &'a str) -> Option<Target<'a>> {
        let (upload, p) = match path.strip_prefix("/upload/") {
            Some(p) => (true, p),
            None => (false, path.strip_prefix('/')?),
        };
        let (version, rest) = p.split_once('/').unwrap_or((p, ""));
        matches!(version, "v1" | "v1beta" | "v1alpha").then_some(Target { upload, version, rest })
    }
}

/// Whether `rest` (a path after the version) fits `pattern`.
pub fn fits(pattern: &str, rest: &str) -> bool {
    let (mut p, mut r) = (pattern.split('/'), rest.split('/'));
    loop {
        match (p.next(), r.next()) {
            (None, None) => return true,
            (Some(ps), Some(rs)) => {
                let (pn, pv) = ps.split_once(':').map_or((ps, None), |(a, b)| (a, Some(b)));
                let (rn, rv) = rs.split_once(':').map_or((rs, None), |(a, b)| (a, Some(b)));
                let name_ok = if pn == "*" { !rn.is_empty() } else { pn == rn };
                if !name_ok || pv != rv {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// The rule of a request, if the table has one.
pub fn find(method: &Method, t: &Target<'_>) -> Option<&'static Rule> {
    RULES
        .iter()
        .find(|r| r.upload == t.upload && r.method == method.as_str() && fits(r.pattern, t.rest))
}

/// An entry of `[routes] allow_unmetered`: a method of the table, or `"VERB path"` for one
/// the table does not know (path after the version, `*` for one segment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// A method of the table by name.
    Named(&'static str),
    /// A method the table does not know.
    Pattern {
        /// The HTTP method.
        method: String,
        /// The path pattern after the version.
        pattern: String,
    },
}

impl Allowed {
    /// Parses an entry; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Allowed, String> {
        if let Some((verb, path)) = s.split_once(' ') {
            let verb = verb.trim();
            let path = path.trim().trim_start_matches('/');
            if !matches!(verb, "GET" | "POST" | "PUT" | "PATCH" | "DELETE") {
                return Err(format!(
                    "{verb:?} is not an HTTP method (GET, POST, PUT, PATCH, DELETE)"
                ));
            }
            let segs_ok = path.split('/').all(|s| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'*' | b'-' | b'_' | b'.' | b':'))
            });
            if !segs_ok {
                return Err(format!("{path:?} is not a path pattern like \"interactions/*\""));
            }
            return Ok(Allowed::Pattern {
                method: verb.to_string(),
                pattern: path.to_string(),
            });
        }
        RULES
            .iter()
            .find(|r| r.name == s)
            .map(|r| Allowed::Named(r.name))
            .ok_or_else(|| {
                format!("{s:?} is not a method of the route table (see the README), nor \"VERB path/pattern\"")
            })
    }
}

/// Why a request is refused before it reaches the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// Not in the table.
    Unknown(String),
    /// In the table, billable, not metered yet.
    NotMetered(&'static str),
    /// The Live API (WebSocket).
    Live,
}

impl Denial {
    /// The message the caller reads (403 `PERMISSION_DENIED`).
    pub fn message(&self) -> String {
        match self {
            Denial::Unknown(m) => format!("This method is not available through this gateway: {m}."),
            Denial::NotMetered(name) => format!(
                "This method is not available through this gateway: {name} is billable and this gateway does not meter it yet."
            ),
            Denial::Live => {
                "This method is not available through this gateway: the Live API (WebSocket) is not metered yet.".into()
            }
        }
    }
}

/// The treatment of a request for a method the table has, or the operator allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The method's name (`unlisted` for an operator's pattern).
    pub name: &'static str,
    /// Its treatment.
    pub treatment: Treatment,
    /// What it does with owned resources.
    pub access: Access,
    /// Whether its body is scanned for references.
    pub refs: bool,
}

/// Decides a request: its rule (or the operator's allowance), else why it is refused.
pub fn decide(method: &Method, t: &Target<'_>, allowed: &[Allowed]) -> Result<Decision, Denial> {
    if let Some(r) = find(method, t) {
        let allowed_here = || allowed.contains(&Allowed::Named(r.name));
        if r.treatment == Refused && !allowed_here() {
            return Err(Denial::NotMetered(r.name));
        }
        return Ok(Decision {
            name: r.name,
            treatment: r.treatment,
            access: r.access,
            refs: r.refs,
        });
    }
    let listed = allowed.iter().any(|a| match a {
        Allowed::Pattern { method: m, pattern } => !t.upload && m == method.as_str() && fits(pattern, t.rest),
        Allowed::Named(_) => false,
    });
    if listed {
        return Ok(Decision {
            name: "unlisted",
            treatment: Free,
            access: Access::None,
            refs: true,
        });
    }
    let up = if t.upload { "/upload" } else { "" };
    Err(Denial::Unknown(format!("{method} {up}/{}/{}", t.version, t.rest)))
}

/// The route table as a Markdown table (the README's copy is checked against it).
pub fn markdown_table() -> String {
    let mut s = String::from("| Method | HTTP | Path | Treatment |\n|---|---|---|---|\n");
    for r in RULES {
        let prefix = if r.upload { "/upload/{version}/" } else { "/{version}/" };
        s.push_str(&format!(
            "| `{}` | {} | `{}{}` | {} |\n",
            r.name,
            r.method,
            prefix,
            r.pattern,
            r.treatment.label()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(method: Method, path: &str, allowed: &[Allowed]) -> Result<Decision, Denial> {
        decide(&method, &Target::of(path).unwrap(), allowed)
    }

    #[test]
    fn table_decides() {
        assert_eq!(
            d(Method::POST, "/v1beta/models/gemini-2.5-flash:generateContent", &[])
                .unwrap()
                .treatment,
            Metered
        );
        assert_eq!(d(Method::GET, "/v1beta/files", &[]).unwrap().access, List(Kind::File));
        assert_eq!(d(Method::GET, "/v1/files/abc", &[]).unwrap().access, Path);
        assert_eq!(
            d(Method::POST, "/upload/v1beta/files", &[]).unwrap().access,
            Create(Kind::File)
        );
        assert_eq!(
            d(Method::POST, "/v1beta/openai/images/generations", &[]),
            Err(Denial::NotMetered("openai.images.generations"))
        );
        let allow = [Allowed::parse("openai.images.generations").unwrap()];
        assert_eq!(
            d(Method::POST, "/v1beta/openai/images/generations", &allow)
                .unwrap()
                .name,
            "openai.images.generations"
        );
        assert!(matches!(
            d(Method::POST, "/v1beta/interactions", &[]),
            Err(Denial::Unknown(_))
        ));
        assert!(matches!(
            d(Method::POST, "/v1beta/files:register", &[]),
            Err(Denial::Unknown(_))
        ));
        assert!(matches!(
            d(Method::GET, "/v1beta/FILES/abc", &[]),
            Err(Denial::Unknown(_))
        ));
        let allow = [Allowed::parse("POST interactions").unwrap()];
        assert_eq!(
            d(Method::POST, "/v1beta/interactions", &allow).unwrap().name,
            "unlisted"
        );
        assert!(Allowed::parse("models.nope").is_err());
        assert!(Allowed::parse("FETCH x").is_err());
        assert!(Target::of("/v2/files").is_none());
    }

    #[test]
    fn the_readme_holds_the_table() {
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains(&markdown_table()),
            "README.md's route table differs from RULES:\n{}",
            markdown_table()
        );
    }

    #[test]
    fn every_name_is_unique() {
        let mut names: Vec<_> = RULES.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RULES.len());
    }
}
