//! tunedModels: create (answers the tuning operation), get, list, delete. A tuned model is
//! CREATING until its operation finishes (the second poll of either the model or the
//! operation), then ACTIVE. Generation on a tuned model is the models' generate. A missing
//! tuned model is 404 NOT_FOUND.

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::body::MockBody;
use super::files::Files;
use super::ops::{self, Operations, Outcome};
use super::store::{Collection, empty_ok, invalid, not_found, pretty};
use super::{query_param, random_id};

/// A stored tuned model.
#[derive(Debug, Clone)]
pub(crate) struct Tuned {
    model: TunedModel,
    op_id: String,
}

/// A TunedModel resource, fields in wire order.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct TunedModel {
    name: String,
    base_model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    display_name: Option<String>,
    state: &'static str,
    create_time: String,
    update_time: String,
    tuning_task: TuningTask,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct TuningTask {
    start_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    complete_time: Option<String>,
    hyperparameters: Hyper,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
struct Hyper {
    epoch_count: u64,
    batch_size: u64,
    learning_rate: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    display_name: Option<String>,
    base_model: Option<String>,
    tuning_task: Option<TaskIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskIn {
    hyperparameters: Option<HyperIn>,
    training_data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HyperIn {
    epoch_count: Option<u64>,
    batch_size: Option<u64>,
    learning_rate: Option<f64>,
}

/// Every tuned model of one mock.
#[derive(Debug, Default)]
pub(crate) struct TunedModels {
    items: Collection<Tuned>,
}

impl TunedModels {
    /// `POST tunedModels[?tunedModelId=]`: the tuning operation, with
    /// totalSteps = ceil(examples × epochs / batch size).
    pub(crate) fn create(&self, ops: &Operations, query: Option<&str>, body: &[u8]) -> Response<MockBody> {
        let Ok(req) = serde_json::from_slice::<CreateBody>(body) else {
            return invalid("Invalid JSON payload received.");
        };
        let Some(base_model) = req.base_model.filter(|m| !m.is_empty()) else {
            return invalid("base_model is required.");
        };
        let task = req.tuning_task;
        let h = task.as_ref().and_then(|t| t.hyperparameters.as_ref());
        let hyper = Hyper {
            epoch_count: h.and_then(|h| h.epoch_count).unwrap_or(5).max(1),
            batch_size: h.and_then(|h| h.batch_size).unwrap_or(4).max(1),
            learning_rate: h.and_then(|h| h.learning_rate).unwrap_or(0.001),
        };
        let examples = task
            .as_ref()
            .and_then(|t| t.training_data.as_ref())
            .and_then(|d| d.pointer("/examples/examples"))
            .and_then(Value::as_array)
            .map_or(0, Vec::len) as u64;
        let total_steps = examples
            .saturating_mul(hyper.epoch_count)
            .div_ceil(hyper.batch_size)
            .max(1);
        let id = match query_param(query, "tunedModelId").filter(|s| !s.is_empty()) {
            Some(id) if self.items.get(id).is_some() => {
                return super::store::error_status(
                    StatusCode::CONFLICT,
                    "A tuned model with this id already exists.",
                    "ALREADY_EXISTS",
                );
            }
            Some(id) if id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => id.to_owned(),
            Some(_) => return invalid("Invalid tunedModelId."),
            None => format!("tuned-{}", random_id(12).to_ascii_lowercase()),
        };
        let name = format!("tunedModels/{id}");
        let now = ops::now();
        let model = TunedModel {
            name: name.clone(),
            base_model,
            display_name: req.display_name,
            state: "ACTIVE",
            create_time: now.clone(),
            update_time: now.clone(),
            tuning_task: TuningTask {
                start_time: now.clone(),
                complete_time: Some(now),
                hyperparameters: hyper,
            },
        };
        let metadata = json!({
            "@type": ops::type_url("CreateTunedModelMetadata"),
            "tunedModel": name,
            "totalSteps": total_steps,
        });
        let mut done = serde_json::to_value(&model).unwrap_or(Value::Null);
        if let Some(o) = done.as_object_mut() {
            o.insert("@type".to_owned(), json!(ops::type_url("TunedModel")));
        }
        let op = ops.create(Some(&name), Some(metadata), Outcome::Fixed(done));
        let op_id = op.name().rsplit('/').next().unwrap_or_default().to_owned();
        self.items.insert(&id, Tuned { model, op_id });
        pretty(StatusCode::OK, &op)
    }

    /// The model as it looks now: CREATING until its operation has finished. Polls the
    /// operation when `poll`.
    fn current(&self, ops: &Operations, files: &Files, id: &str, poll: bool) -> Option<TunedModel> {
        let t = self.items.get(id)?;
        let done = if poll {
            ops.poll(files, &t.op_id, None).is_some_and(|op| op.is_done())
        } else {
            ops.is_done(&t.op_id)
        };
        Some(shown(t.model, done))
    }

    /// True when `tunedModels/{id}` exists.
    pub(crate) fn exists(&self, id: &str) -> bool {
        self.items.get(id).is_some()
    }

    /// `GET tunedModels/{id}`.
    pub(crate) fn get(&self, ops: &Operations, files: &Files, id: &str) -> Response<MockBody> {
        match self.current(ops, files, id, true) {
            Some(m) => pretty(StatusCode::OK, &m),
            None => not_found(),
        }
    }

    /// `GET tunedModels` (`tunedModels`); listing does not poll.
    pub(crate) fn list(&self, ops: &Operations, query: Option<&str>) -> Response<MockBody> {
        self.items
            .list_with("tunedModels", query, |t| shown(t.model, ops.is_done(&t.op_id)))
    }

    /// `DELETE tunedModels/{id}`.
    pub(crate) fn delete(&self, id: &str) -> Response<MockBody> {
        match self.items.remove(id) {
            Some(_) => empty_ok(),
            None => not_found(),
        }
    }
}

/// The finished model, shown as CREATING while its operation runs.
fn shown(mut m: TunedModel, done: bool) -> TunedModel {
    if !done {
        m.state = "CREATING";
        m.update_time.clone_from(&m.create_time);
        m.tuning_task.complete_time = None;
    }
    m
}
