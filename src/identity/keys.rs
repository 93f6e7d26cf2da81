//! Key generation and hashing.

use sha2::{Digest, Sha256};

/// SHA-256 of a key: the only form in which keys are stored or indexed.
pub type KeyHash = [u8; 32];

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Number of random base62 characters after the `gm_` prefix (about 238 bits).
pub const KEY_RANDOM_CHARS: usize = 40;

/// Errors of key generation.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomError(String);

/// Fills a string with `n` uniformly random base62 characters from the OS's secure source.
pub fn random_base62(n: usize) -> Result<String, RandomError> {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut buf).map_err(|e| RandomError(e.to_string()))?;
        for &b in &buf {
            // Rejection sampling keeps the distribution uniform (248 = 4 * 62).
            if b < 248 && out.len() < n {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    Ok(out)
}

/// A new caller key: `gm_` and 40 random base62 characters.
pub fn generate_key() -> Result<String, RandomError> {
    Ok(format!("gm_{}", random_base62(KEY_RANDOM_CHARS)?))
}

/// Hashes a presented key. Keys carry ~238 bits of entropy, so a fast hash is safe here.
pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// True when `key` has the shape of a gateway key (cheap pre-check before hashing).
pub fn looks_like_key(key: &str) -> bool {
    key.len() >= 3 + 32 && key.starts_with("gm_") && key[3..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_contract_shape() {
        let k = generate_key().unwrap();
        assert!(looks_like_key(&k), "{k}");
        assert_eq!(k.len(), 43);
        assert_ne!(generate_key().unwrap(), k);
        assert_eq!(hash_key(&k), hash_key(&k.clone()));
        assert!(!looks_like_key("gm_short"));
        assert!(!looks_like_key("AIzaSyD-not-ours-at-all-000000000000000"));
    }
}
