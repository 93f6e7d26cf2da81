//! The usage ledger: records, the in-memory monthly counters, the background recorder and the
//! sled store. The hot path only touches counters (per-user mutex, no global lock) and sends
//! records down a channel; all disk I/O happens in the recorder, batched.

pub mod alerts;
pub mod counters;
pub mod details;
pub mod log;
pub mod record;
pub mod recorder;
pub mod settled;
pub mod store;
pub mod totals;
pub mod window;

pub use alerts::Quota;
pub use counters::{Held, Reserved, UserUsage};
pub use details::{
    AiResponse, CacheAction, CacheStorage, Details, ErrorInfo, FileUpload, MessageSent, Price, PriceLine, PricePart,
    ResponseFormat, Status, Tags, TokenSource,
};
pub use record::{Record, RecordIds, RecordKind};
pub use recorder::{Recorder, RecorderHandle};
pub use settled::{Release, Settled, SettledSink};
pub use store::{SledStore, StoreError};
pub use totals::Totals;
pub use window::TokenWindow;
