//! Fidelity of an obfuscated checkpoint against its plaintext model (filled in below).
