//! fileSearchStores: create, list, get, delete; `:importFile` of an uploaded file and the
//! single-shot `uploadToFileSearchStore` each add a document and answer an operation;
//! documents can be listed, fetched and deleted. A missing store or document is 404 NOT_FOUND.

use std::sync::Arc;

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::body::MockBody;
use super::files::Files;
use super::ops::{self, Operations, Outcome};
use super::store::{Collection, empty_ok, error_status, invalid, not_found, pretty};
use super::{query_param, random_id};

/// A stored file search store.
#[derive(Debug, Clone)]
pub(crate) struct SearchStore {
    name: String,
    display_name: Option<String>,
    create_time: String,
    update_time: String,
    docs: Arc<Collection<Document>>,
}

/// A Document resource, fields in wire order.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Document {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    display_name: Option<String>,
    state: &'static str,
    size_bytes: String,
    mime_type: String,
    create_time: String,
    update_time: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StoreView<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    display_name: Option<&'a str>,
    create_time: &'a str,
    update_time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    active_documents_count: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size_bytes: Option<String>,
}

impl SearchStore {
    fn view(&self) -> StoreView<'_> {
        let (count, size) = self.docs.fold((0u64, 0u64), |(n, s), d| {
            (n + 1, s + d.size_bytes.parse::<u64>().unwrap_or(0))
        });
        StoreView {
            name: &self.name,
            display_name: self.display_name.as_deref(),
            create_time: &self.create_time,
            update_time: &self.update_time,
            // protobuf-JSON leaves zero int64s out.
            active_documents_count: (count > 0).then(|| count.to_string()),
            size_bytes: (size > 0).then(|| size.to_string()),
        }
    }
}

/// The stored store, rendered when listed.
struct Listed(SearchStore);

impl Serialize for Listed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.view().serialize(s)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    display_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImportBody {
    file_name: Option<String>,
}

/// What an uploaded document is made of.
pub(crate) struct Upload {
    pub display_name: Option<String>,
    pub mime: String,
    pub size: u64,
}

/// Every file search store of one mock.
#[derive(Debug, Default)]
pub(crate) struct SearchStores {
    items: Collection<SearchStore>,
}

impl SearchStores {
    /// `POST fileSearchStores`.
    pub(crate) fn create(&self, body: &[u8]) -> Response<MockBody> {
        let display_name = if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            match serde_json::from_slice::<CreateBody>(body) {
                Ok(b) => b.display_name,
                Err(_) => return invalid("Invalid JSON payload received."),
            }
        };
        let id = random_id(12).to_ascii_lowercase();
        let now = ops::now();
        let s = SearchStore {
            name: format!("fileSearchStores/{id}"),
            display_name,
            update_time: now.clone(),
            create_time: now,
            docs: Arc::default(),
        };
        self.items.insert(&id, s.clone());
        pretty(StatusCode::OK, &s.view())
    }

    /// `GET fileSearchStores`.
    pub(crate) fn list(&self, query: Option<&str>) -> Response<MockBody> {
        self.items.list_with("fileSearchStores", query, Listed)
    }

    /// True when `fileSearchStores/{id}` exists.
    pub(crate) fn exists(&self, id: &str) -> bool {
        self.items.get(id).is_some()
    }

    /// `GET fileSearchStores/{id}`.
    pub(crate) fn get(&self, id: &str) -> Response<MockBody> {
        match self.items.get(id) {
            Some(s) => pretty(StatusCode::OK, &s.view()),
            None => not_found(),
        }
    }

    /// `DELETE fileSearchStores/{id}[?force=true]`: a store with documents needs `force`.
    pub(crate) fn delete(&self, id: &str, query: Option<&str>) -> Response<MockBody> {
        let Some(s) = self.items.get(id) else {
            return not_found();
        };
        let force = query_param(query, "force") == Some("true");
        if !force && !s.docs.is_empty() {
            return error_status(
                StatusCode::BAD_REQUEST,
                "Cannot delete a non-empty FileSearchStore without force=true.",
                "FAILED_PRECONDITION",
            );
        }
        self.items.remove(id);
        empty_ok()
    }

    fn add_document(&self, id: &str, up: Upload) -> Option<(String, String)> {
        let s = self.items.get(id)?;
        let doc_id = random_id(12).to_ascii_lowercase();
        let now = ops::now();
        let doc = Document {
            name: format!("{}/documents/{doc_id}", s.name),
            display_name: up.display_name,
            state: "STATE_ACTIVE",
            size_bytes: up.size.to_string(),
            mime_type: up.mime,
            update_time: now.clone(),
            create_time: now,
        };
        let name = doc.name.clone();
        s.docs.insert(&doc_id, doc);
        Some((s.name, name))
    }

    /// `POST fileSearchStores/{id}:importFile` `{"fileName": "files/x"}`: the operation
    /// `fileSearchStores/{id}/operations/{op}`.
    pub(crate) fn import(&self, ops: &Operations, files: &Files, id: &str, body: &[u8]) -> Response<MockBody> {
        let Ok(req) = serde_json::from_slice::<ImportBody>(body) else {
            return invalid("Invalid JSON payload received.");
        };
        let Some(file_name) = req.file_name else {
            return invalid("file_name is required.");
        };
        if self.items.get(id).is_none() {
            return not_found();
        }
        let file_id = file_name.strip_prefix("files/").unwrap_or(&file_name);
        let Some(f) = files.get(file_id) else {
            let msg = format!("You do not have permission to access the File {file_id} or it may not exist.");
            return error_status(StatusCode::FORBIDDEN, &msg, "PERMISSION_DENIED");
        };
        let up = Upload {
            display_name: f.display_name.clone().or_else(|| Some(file_id.to_owned())),
            mime: f.mime_type.clone(),
            size: f.size_bytes.parse().unwrap_or(0),
        };
        self.document_op(ops, id, up, "", "ImportFileResponse")
    }

    /// The single-shot `uploadToFileSearchStore`: the operation
    /// `fileSearchStores/{id}/upload/operations/{op}`.
    pub(crate) fn upload(&self, ops: &Operations, id: &str, up: Upload) -> Response<MockBody> {
        self.document_op(ops, id, up, "/upload", "UploadToFileSearchStoreResponse")
    }

    fn document_op(&self, ops: &Operations, id: &str, up: Upload, infix: &str, kind: &str) -> Response<MockBody> {
        let Some((store, doc)) = self.add_document(id, up) else {
            return not_found();
        };
        let response = json!({"@type": ops::type_url(kind), "parent": store, "documentName": doc});
        let op = ops.create(Some(&format!("{store}{infix}")), None, Outcome::Fixed(response));
        pretty(StatusCode::OK, &op)
    }

    /// `GET fileSearchStores/{id}/documents`.
    pub(crate) fn list_documents(&self, id: &str, query: Option<&str>) -> Response<MockBody> {
        match self.items.get(id) {
            Some(s) => s.docs.list_response("documents", query),
            None => not_found(),
        }
    }

    /// `GET fileSearchStores/{id}/documents/{doc}`.
    pub(crate) fn get_document(&self, id: &str, doc: &str) -> Response<MockBody> {
        match self.items.get(id).and_then(|s| s.docs.get(doc)) {
            Some(d) => pretty(StatusCode::OK, &d),
            None => not_found(),
        }
    }

    /// `DELETE fileSearchStores/{id}/documents/{doc}`.
    pub(crate) fn delete_document(&self, id: &str, doc: &str) -> Response<MockBody> {
        match self.items.get(id).and_then(|s| s.docs.remove(doc)) {
            Some(_) => empty_ok(),
            None => not_found(),
        }
    }
}
