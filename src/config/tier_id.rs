//! Tier names interned as small numbers.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

/// A tier name as a small number, so each of a million users holds 2 bytes rather than a
/// pointer, and admission finds its tier by index rather than by hashing a string.
///
/// Ids are process-wide and never reused: a name keeps its id across reloads, and a runtime
/// maps the ids of the tiers it has ([`Runtime::tier_by_id`]); a name it lacks maps to none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TierId(u16);

#[derive(Default)]
struct TierNames {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u16>,
}

// Process-wide because tier names outlive any one config snapshot and are few (the names seen in
// configs and stored users); tests run several gateways in one process, which share it harmlessly.
static TIER_NAMES: LazyLock<RwLock<TierNames>> = LazyLock::new(Default::default);

impl TierId {
    /// Stands for a name that could not be interned (over 65,535 distinct names): no runtime has it.
    pub const OVERFLOW: TierId = TierId(u16::MAX);

    /// The id of a tier name, assigned on first use.
    pub fn of(name: &str) -> TierId {
        let read = TIER_NAMES.read().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = read.ids.get(name) {
            return TierId(id);
        }
        drop(read);
        let mut w = TIER_NAMES.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = w.ids.get(name) {
            return TierId(id);
        }
        let Ok(id) = u16::try_from(w.names.len()) else {
            return TierId::OVERFLOW;
        };
        if id == u16::MAX {
            return TierId::OVERFLOW;
        }
        let name: Arc<str> = Arc::from(name);
        w.names.push(name.clone());
        w.ids.insert(name, id);
        TierId(id)
    }

    /// The tier's name.
    pub fn name(self) -> Arc<str> {
        let read = TIER_NAMES.read().unwrap_or_else(|p| p.into_inner());
        read.names
            .get(usize::from(self.0))
            .cloned()
            .unwrap_or_else(|| Arc::from("(unknown)"))
    }

    /// The id as stored in a user's slot.
    pub fn raw(self) -> u16 {
        self.0
    }

    /// An id read back from [`TierId::raw`].
    pub fn from_raw(raw: u16) -> TierId {
        TierId(raw)
    }

    /// The id as an index into a table of tiers.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}
