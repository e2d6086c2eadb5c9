//! Seeds for runs where the user gave none (every seeded choice stays reproducible once printed).
use rand::TryRngCore;

/// 64 bits from the operating system's CSPRNG (falls back to a clock-keyed hash if the OS
/// source fails, which it does not on Linux).
pub fn os_seed() -> u64 {
    let mut b = [0u8; 8];
    if rand::rngs::OsRng.try_fill_bytes(&mut b).is_ok() {
        return u64::from_le_bytes(b);
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_differ() {
        assert_ne!(super::os_seed(), super::os_seed());
    }
}
