//! Routing of the stateful resources and the billable extras: which call a path is, the
//! API-key check, and the hand-off to each resource's module. Never on the generate path
//! (tuned-model generation checks that the tuned model exists, then is the models' generate).

use std::sync::atomic::Ordering::Relaxed;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;

use super::batches::{Batches, Ctx, Kind};
use super::body::MockBody;
use super::caches::Caches;
use super::files::Files;
use super::ops::{self, Operations};
use super::search::{SearchStores, Upload};
use super::store::{RequestLog, not_found};
use super::tuned::TunedModels;
use super::{
    MAX_JSON_BODY, Shared, billable, count_body, generate, read_all, reject_native, reject_openai, request_host, upload,
};

/// The per-mock state of every resource kind, and the request log.
#[derive(Debug, Default)]
pub(crate) struct Resources {
    pub files: Files,
    pub caches: Caches,
    pub batches: Batches,
    pub ops: Operations,
    pub tuned: TunedModels,
    pub stores: SearchStores,
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
    CreateBatch {
        kind: Kind,
        model: String,
    },
    ListBatches,
    GetBatch(String),
    CancelBatch(String),
    DeleteBatch(String),
    PredictLongRunning(String),
    /// An operation by id; `full` is the whole name when the path gave one.
    GetOp {
        id: String,
        full: Option<String>,
    },
    ListOps,
    CreateTuned,
    ListTuned,
    GetTuned(String),
    DeleteTuned(String),
    TunedGenerate {
        id: String,
        stream: bool,
    },
    CreateStore,
    ListStores,
    GetStore(String),
    DeleteStore(String),
    ImportFile(String),
    UploadToStore(String),
    ListDocs(String),
    GetDoc(String, String),
    DeleteDoc(String, String),
    EmbedContent,
    BatchEmbedContents,
    Predict,
    OpenAiEmbeddings,
    OpenAiImages,
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
    let top = match (&m, rest) {
        (&Method::GET, "files") => Some(Call::ListFiles),
        (&Method::GET, "cachedContents") => Some(Call::ListCaches),
        (&Method::POST, "cachedContents") => Some(Call::CreateCache),
        (&Method::GET, "batches") => Some(Call::ListBatches),
        (&Method::GET, "operations") => Some(Call::ListOps),
        (&Method::GET, "tunedModels") => Some(Call::ListTuned),
        (&Method::POST, "tunedModels") => Some(Call::CreateTuned),
        (&Method::GET, "fileSearchStores") => Some(Call::ListStores),
        (&Method::POST, "fileSearchStores") => Some(Call::CreateStore),
        (&Method::POST, "openai/embeddings") => Some(Call::OpenAiEmbeddings),
        (&Method::POST, "openai/images/generations") => Some(Call::OpenAiImages),
        _ => None,
    };
    if top.is_some() {
        return top;
    }
    if m == Method::GET
        && let Some(call) = parse_op(rest)
    {
        return Some(call);
    }
    if let Some(call) = parse_documents(&m, rest) {
        return Some(call);
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
    if let Some((id, verb)) = member(rest, "tunedModels") {
        return match (m, verb) {
            (Method::GET, None) => Some(Call::GetTuned(owned(id))),
            (Method::DELETE, None) => Some(Call::DeleteTuned(owned(id))),
            (Method::POST, Some(v @ ("generateContent" | "streamGenerateContent"))) => Some(Call::TunedGenerate {
                id: owned(id),
                stream: v == "streamGenerateContent",
            }),
            _ => None,
        };
    }
    if let Some((id, verb)) = member(rest, "fileSearchStores") {
        return match (m, verb) {
            (Method::GET, None) => Some(Call::GetStore(owned(id))),
            (Method::DELETE, None) => Some(Call::DeleteStore(owned(id))),
            (Method::POST, Some("importFile")) => Some(Call::ImportFile(owned(id))),
            _ => None,
        };
    }
    if let Some((model, Some(verb))) = member(rest, "models") {
        if m != Method::POST {
            return None;
        }
        return match verb {
            "batchGenerateContent" => Some(Call::CreateBatch {
                kind: Kind::Generate,
                model: owned(model),
            }),
            "asyncBatchEmbedContent" => Some(Call::CreateBatch {
                kind: Kind::Embed,
                model: owned(model),
            }),
            "predictLongRunning" => Some(Call::PredictLongRunning(owned(model))),
            "embedContent" => Some(Call::EmbedContent),
            "batchEmbedContents" => Some(Call::BatchEmbedContents),
            "predict" => Some(Call::Predict),
            _ => None,
        };
    }
    None
}

/// `operations/{op}` or `{parent}/operations/{op}`.
fn parse_op(rest: &str) -> Option<Call> {
    if let Some(id) = rest.strip_prefix("operations/").filter(|id| is_id(id)) {
        return Some(Call::GetOp {
            id: id.to_owned(),
            full: None,
        });
    }
    let (parent, id) = rest.rsplit_once("/operations/")?;
    (is_id(id) && !parent.is_empty() && !parent.contains(':')).then(|| Call::GetOp {
        id: id.to_owned(),
        full: Some(rest.to_owned()),
    })
}

/// `fileSearchStores/{s}/documents[/{d}]`.
fn parse_documents(m: &Method, rest: &str) -> Option<Call> {
    let (store, tail) = rest.strip_prefix("fileSearchStores/")?.split_once('/')?;
    if !is_id(store) {
        return None;
    }
    let store = store.to_owned();
    match (m, tail.strip_prefix("documents")?) {
        (&Method::GET, "") => Some(Call::ListDocs(store)),
        (&Method::GET, d) => d
            .strip_prefix('/')
            .filter(|d| is_id(d))
            .map(|d| Call::GetDoc(store, d.to_owned())),
        (&Method::DELETE, d) => d
            .strip_prefix('/')
            .filter(|d| is_id(d))
            .map(|d| Call::DeleteDoc(store, d.to_owned())),
        _ => None,
    }
}

/// The upload-path call of `rest` (after `/upload/{version}/`), if it is a resource one.
pub(crate) fn parse_upload(method: &Method, rest: &str) -> Option<Call> {
    let (id, verb) = member(rest, "fileSearchStores")?;
    (method == Method::POST && verb == Some("uploadToFileSearchStore")).then(|| Call::UploadToStore(id.to_owned()))
}

/// Answers a resource call (after the API-key check).
pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>, call: Call) -> Response<MockBody> {
    let rejected = match call {
        Call::OpenAiEmbeddings | Call::OpenAiImages => reject_openai(shared, &req),
        _ => reject_native(shared, &req),
    };
    if let Some(r) = rejected {
        return r;
    }
    let res = &shared.resources;
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    match call {
        Call::ListFiles => res.files.list(query),
        Call::GetFile(id) => res.files.get_response(&id),
        Call::DeleteFile(id) => res.files.delete(&id),
        Call::DownloadFile(id) => res.files.download(&id),
        Call::ListCaches => res.caches.list(query),
        Call::GetCache(id) => res.caches.get(&id),
        Call::DeleteCache(id) => res.caches.delete(&id),
        Call::ListBatches => res.batches.list(&shared.unary_text, query),
        Call::GetBatch(id) => res.batches.get(&ctx(shared, &req), &id),
        Call::CancelBatch(id) => res.batches.cancel(&id),
        Call::DeleteBatch(id) => res.batches.delete(&id),
        Call::GetOp { id, full } => res.ops.get_response(&res.files, &id, full.as_deref()),
        Call::ListOps => res.ops.list(query),
        Call::ListTuned => res.tuned.list(&res.ops, query),
        Call::GetTuned(id) => res.tuned.get(&res.ops, &res.files, &id),
        Call::DeleteTuned(id) => res.tuned.delete(&id),
        Call::TunedGenerate { id, stream } => {
            if res.tuned.exists(&id) {
                generate(shared, req, id, stream).await
            } else {
                not_found()
            }
        }
        Call::ListStores => res.stores.list(query),
        Call::GetStore(id) => res.stores.get(&id),
        Call::DeleteStore(id) => res.stores.delete(&id, query),
        Call::ListDocs(id) => res.stores.list_documents(&id, query),
        Call::GetDoc(id, doc) => res.stores.get_document(&id, &doc),
        Call::DeleteDoc(id, doc) => res.stores.delete_document(&id, &doc),
        Call::UploadToStore(id) => upload_to_store(shared, req, &id).await,
        call => with_body(shared, req, call).await,
    }
}

fn ctx<'a>(shared: &'a Shared, req: &Request<Incoming>) -> Ctx<'a> {
    Ctx {
        files: &shared.resources.files,
        text: &shared.unary_text,
        chunks: shared.chunks,
        host: request_host(req),
    }
}

/// The calls that read a JSON body.
async fn with_body(shared: &Shared, req: Request<Incoming>, call: Call) -> Response<MockBody> {
    let res = &shared.resources;
    let ctx = ctx(shared, &req);
    let query = req.uri().query().map(str::to_owned);
    let body = match read_all(req.into_body(), MAX_JSON_BODY).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    match call {
        Call::CreateCache => res.caches.create(&body),
        Call::PatchCache(id) => res.caches.patch(&id, &body),
        Call::CreateBatch { kind, model } => res.batches.create(&ctx, kind, &model, &body),
        Call::PredictLongRunning(model) => ops::predict_long_running(&res.ops, ctx.host, &model, &body),
        Call::CreateTuned => res.tuned.create(&res.ops, query.as_deref(), &body),
        Call::CreateStore => res.stores.create(&body),
        Call::ImportFile(id) => res.stores.import(&res.ops, &res.files, &id, &body),
        Call::EmbedContent => billable::embed_content(&body),
        Call::BatchEmbedContents => billable::batch_embed_contents(&body),
        Call::Predict => billable::predict(&body),
        Call::OpenAiEmbeddings => billable::openai_embeddings(&body),
        Call::OpenAiImages => billable::openai_images(&body),
        _ => not_found(),
    }
}

/// `POST /upload/{v}/fileSearchStores/{id}:uploadToFileSearchStore`: a resumable `start`
/// (chunks then go to the session URL), or a single shot whose raw bytes are the document
/// (type from `X-Goog-Upload-Header-Content-Type` or `Content-Type`, name from
/// `X-Goog-Upload-File-Name`).
async fn upload_to_store(shared: &Shared, req: Request<Incoming>, id: &str) -> Response<MockBody> {
    let h = req.headers();
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if text("x-goog-upload-command").is_some_and(|c| c.eq_ignore_ascii_case("start")) {
        if !shared.resources.stores.exists(id) {
            return not_found();
        }
        return upload::start(shared, req, upload::Target::Store(id.to_owned())).await;
    }
    let mime = text("x-goog-upload-header-content-type")
        .or_else(|| text(CONTENT_TYPE.as_str()))
        .filter(|m| !m.is_empty())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let display_name = text("x-goog-upload-file-name").map(str::to_owned);
    let Ok(size) = count_body(req.into_body()).await else {
        return super::store::invalid("Failed to read the upload.");
    };
    shared.stats.upload_bytes.fetch_add(size, Relaxed);
    let up = Upload {
        display_name,
        mime,
        size,
    };
    let mut r = shared.resources.stores.upload(&shared.resources.ops, id, up);
    r.headers_mut()
        .insert("x-goog-upload-status", HeaderValue::from_static("final"));
    r
}
