//! The usage ledger: records, the in-memory monthly counters, the background recorder and the
//! sled store. The hot path only touches counters (per-user mutex, no global lock) and sends
//! records down a channel; all disk I/O happens in the recorder, batched.

pub mod alerts;
pub mod counters;
pub mod details;
mod json;
pub mod log;
pub mod record;
pub mod recorder;
pub mod store;
pub mod totals;
pub mod window;

pub use alerts::Quota;
pub use counters::UserUsage;
pub use details::{AiResponse, Details, ErrorInfo, FileUpload, MessageSent, ResponseFormat, Status, Tags, TokenSource};
pub use record::{Record, RecordIds, RecordKind};
pub use recorder::{Recorder, RecorderHandle};
pub use store::{SledStore, StoreError};
pub use totals::Totals;
pub use window::TokenWindow;
