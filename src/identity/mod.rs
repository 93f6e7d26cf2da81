//! Who is calling: users, their keys (generated from OS randomness, stored only as SHA-256
//! hashes) and the in-memory index that maps a presented key to its user in one lookup.

pub mod keys;
pub mod registry;
mod slots;

pub use keys::{KeyHash, generate_key, hash_key};
pub use registry::{IdentityError, KeyEntry, KeyRow, Registry, User, UserRow, new_key, valid_user_id};
