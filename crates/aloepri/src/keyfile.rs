//! The client's key file: versioned JSON, written atomically with mode 0600.
//!
//! It holds only what the client needs online (`tau`) plus the seed and parameters that regenerate
//! every other key. The fingerprint (a hash of everything else in the file) is recorded in the
//! obfuscated checkpoint's `config.json`, so a wrong or tampered key is refused.
use crate::error::{AloeError, Result};
use crate::params::ObfuscationParams;
use crate::tau::TokenPermutation;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// What a compiled checkpoint records in `config.json` under this key (GGUF: `umbra.*`).
pub const CONFIG_SECTION: &str = "umbra";

/// Current key file format.
pub const KEY_FORMAT_VERSION: u32 = 1;
const KIND: &str = "umbra-aloepri-client-key";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientKey {
    pub kind: String,
    pub format_version: u32,
    /// Hex SHA-256 (first 16 bytes) over the canonical content below.
    pub fingerprint: String,
    pub seed: u64,
    pub params: ObfuscationParams,
    /// `tau[i]` = obfuscated id of plaintext token `i`.
    pub tau: Vec<u32>,
}

#[derive(Serialize)]
struct Canonical<'a> {
    kind: &'a str,
    format_version: u32,
    seed: u64,
    params: &'a ObfuscationParams,
    tau: &'a [u32],
}

impl ClientKey {
    pub fn new(seed: u64, params: ObfuscationParams, tau: &TokenPermutation) -> Self {
        let mut key = Self {
            kind: KIND.into(),
            format_version: KEY_FORMAT_VERSION,
            fingerprint: String::new(),
            seed,
            params,
            tau: tau.forward_table().to_vec(),
        };
        key.fingerprint = key.compute_fingerprint();
        key
    }

    fn compute_fingerprint(&self) -> String {
        let canon = Canonical {
            kind: &self.kind,
            format_version: self.format_version,
            seed: self.seed,
            params: &self.params,
            tau: &self.tau,
        };
        let bytes = serde_json::to_vec(&canon).expect("canonical key serializes");
        hex::encode(&Sha256::digest(&bytes)[..16])
    }

    /// The validated permutation.
    pub fn permutation(&self) -> Result<TokenPermutation> {
        TokenPermutation::from_forward(self.tau.clone())
    }

    /// Reads and verifies a key file (kind, version, permutation, fingerprint).
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |msg: String| AloeError::KeyFile {
            path: path.into(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| AloeError::io(path, e))?;
        let key: ClientKey =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a key file ({e})")))?;
        if key.kind != KIND {
            return Err(bad(format!("kind is `{}`, expected `{KIND}`", key.kind)));
        }
        if key.format_version != KEY_FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not supported (this build reads {KEY_FORMAT_VERSION})",
                key.format_version
            )));
        }
        key.permutation().map_err(|e| bad(e.to_string()))?;
        if key.compute_fingerprint() != key.fingerprint {
            return Err(bad(
                "fingerprint does not match the content: the key was modified".into(),
            ));
        }
        Ok(key)
    }

    /// Writes the key atomically (temp file in the same folder, fsync, rename), mode 0600.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(self).expect("key serializes");
        write_private_atomic(path, &json)
    }

    /// Refuses a checkpoint whose recorded fingerprint differs from this key's.
    pub fn check_matches(&self, checkpoint_fingerprint: &str) -> Result<()> {
        if checkpoint_fingerprint != self.fingerprint {
            return Err(AloeError::KeyMismatch {
                key: self.fingerprint.clone(),
                checkpoint: checkpoint_fingerprint.into(),
            });
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` through a locked 0600 staging file, fsync and a rename (an existing
/// file is replaced).
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (staging, mut f) = umbra_common::fs::Staging::file(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| AloeError::io(staging.path(), e))?;
    }
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| AloeError::io(staging.path(), e))?;
    drop(f);
    staging.commit(true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn key() -> ClientKey {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        ClientKey::new(
            42,
            ObfuscationParams::paper(),
            &TokenPermutation::random(&mut rng, 64, &[0]),
        )
    }

    #[test]
    fn round_trips_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.key");
        let k = key();
        k.save(&p).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(ClientKey::load(&p).unwrap(), k);
        k.check_matches(&k.fingerprint).unwrap();
        assert!(matches!(
            k.check_matches("00"),
            Err(AloeError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn tampered_or_garbage_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let mut k = key();
        k.tau.swap(3, 4);
        std::fs::write(&p, serde_json::to_vec(&k).unwrap()).unwrap();
        let err = ClientKey::load(&p).unwrap_err().to_string();
        assert!(err.contains("modified"), "{err}");
        std::fs::write(&p, b"{not json").unwrap();
        assert!(ClientKey::load(&p)
            .unwrap_err()
            .to_string()
            .contains("not a key file"));
        let mut k = key();
        k.tau[0] = 5; // duplicates 5
        std::fs::write(&p, serde_json::to_vec(&k).unwrap()).unwrap();
        assert!(ClientKey::load(&p).is_err());
    }
}
