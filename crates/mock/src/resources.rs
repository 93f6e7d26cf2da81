//! Routing of the stateful resources (files, cachedContents, batches): which call a path is,
//! the API-key check, and the hand-off to each resource's module. Never on the generate path.

use http::{Method, Request, Response};
use hyper::body::Incoming;

use super::batches::{Batches, Ctx, Kind};
use super::body::MockBody;
use super::caches::Caches;
use super::files::Files;
use super::store::RequestLog;
use super::{MAX_JSON_BODY, Shared, read_all, reject_native, request_host};

/// The per-mock state of every resource kind, and the request log.
#[derive(Debug, Default)]
pub(crate) struct Resources {
    pub files: Files,
    pub caches: Caches,
    pub batches: Batches,
    pub log: RequestLog,
}

/// One resource call, parsed from the path after the version.
#[derive(Debug)]
pub(crate) enum Call {
    ListFiles,
    GetFile(String),
    DeleteFile(String),
    DownloadFile(String),
    CreateCache,
    ListCaches,
    GetCache(String),
    PatchCache(String),
    DeleteCache(String),
    CreateBatch { kind: Kind, model: String },
    ListBatches,
    GetBatch(String),
    CancelBatch(String),
    DeleteBatch(String),
}

fn is_id(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', ':'])
}

/// `{collection}/{id}[:{verb}]` split into id and verb.
fn member<'a>(rest: &'a str, collection: &str) -> Option<(&'a str, Option<&'a str>)> {
    let target = rest.strip_prefix(collection)?.strip_prefix('/')?;
    let (id, verb) = match target.split_once(':') {
        Some((id, verb)) => (id, Some(verb)),
        None => (target, None),
    };
    is_id(id).then_some((id, verb))
}

/// The resource call of `method` on `rest` (the path after `/{version}/`), if it is one.
pub(crate) fn parse(method: &Method, rest: &str) -> Option<Call> {
    let m = method.clone();
    let owned = |s: &str| s.to_owned();
    match (&m, rest) {
        (&Method::GET, "files") => return Some(Call::ListFiles),
        (&Method::GET, "cachedContents") => return Some(Call::ListCaches),
        (&Method::POST, "cachedContents") => return Some(Call::CreateCache),
        (&Method::GET, "batches") => return Some(Call::ListBatches),
        _ => {}
    }
    if let Some((id, verb)) = member(rest, "files") {
        return match (m, verb) {
            (Method::GET, None) => Some(Call::GetFile(owned(id))),
            (Method::DELETE, None) => Some(Call::DeleteFile(owned(id))),
            (Method::GET, Some("download")) => Some(Call::DownloadFile(owned(id))),
            _ => None,
        };
    }
    if let Some((id, verb)) = member(rest, "cachedContents") {
        return match (m, verb) {
            (Method::GET, None) => Some(Call::GetCache(owned(id))),
            (Method::PATCH, None) => Some(Call::PatchCache(owned(id))),
            (Method::DELETE, None) => Some(Call::DeleteCache(owned(id))),
            _ => None,
        };
    }
    if let Some((id, verb)) = member(rest, "batches") {
        return match (m, verb) {
            (Method::GET, None) => Some(Call::GetBatch(owned(id))),
            (Method::POST, Some("cancel")) => Some(Call::CancelBatch(owned(id))),
            (Method::DELETE, None) => Some(Call::DeleteBatch(owned(id))),
            _ => None,
        };
    }
    if let Some((model, Some(verb))) = member(rest, "models") {
        let kind = match verb {
            "batchGenerateContent" => Kind::Generate,
            "asyncBatchEmbedContent" => Kind::Embed,
            _ => return None,
        };
        return (m == Method::POST).then(|| Call::CreateBatch {
            kind,
            model: owned(model),
        });
    }
    None
}

/// Answers a resource call (after the API-key check).
pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>, call: Call) -> Response<MockBody> {
    if let Some(r) = reject_native(shared, &req) {
        return r;
    }
    let res = &shared.resources;
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let ctx = || Ctx {
        files: &res.files,
        text: &shared.unary_text,
        chunks: shared.chunks,
        host: request_host(&req),
    };
    match call {
        Call::ListFiles => res.files.list(query),
        Call::GetFile(id) => res.files.get_response(&id),
        Call::DeleteFile(id) => res.files.delete(&id),
        Call::DownloadFile(id) => res.files.download(&id),
        Call::ListCaches => res.caches.list(query),
        Call::GetCache(id) => res.caches.get(&id),
        Call::DeleteCache(id) => res.caches.delete(&id),
        Call::ListBatches => res.batches.list(&shared.unary_text, query),
        Call::GetBatch(id) => res.batches.get(&ctx(), &id),
        Call::CancelBatch(id) => res.batches.cancel(&id),
        Call::DeleteBatch(id) => res.batches.delete(&id),
        Call::CreateCache | Call::PatchCache(_) | Call::CreateBatch { .. } => {
            let ctx = ctx();
            let body = match read_all(req.into_body(), MAX_JSON_BODY).await {
                Ok(b) => b,
                Err(e) => return e.response(),
            };
            match call {
                Call::CreateCache => res.caches.create(&body),
                Call::PatchCache(id) => res.caches.patch(&id, &body),
                Call::CreateBatch { kind, model } => res.batches.create(&ctx, kind, &model, &body),
                _ => super::store::not_found(),
            }
        }
    }
}
