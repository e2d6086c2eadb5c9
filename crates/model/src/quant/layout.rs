//! The in-memory row layout of the 32-element block types: each row's block fields split into
//! runs (`d` of every block, then `m`, then `qh`, then `qs`), the same bytes as the GGUF row in a
//! different order.
//!
//! GGUF interleaves the fields block by block (`d qs | d qs | ...`). With the scales of eight
//! consecutive blocks adjacent, a kernel converts them with one `vcvtph2ps` and multiplies them
//! by the activations' eight block scales with one vector multiply, instead of one scalar f16
//! conversion and multiply per block: that halves the instructions per 32 weights of
//! `Q4_0`/`Q4_1`/`Q5_0`/`Q8_0`. The k-quants (256-element blocks) keep the GGUF layout.
use super::QuantType;

/// Field sizes of a 32-element block type, in bytes: `(d, m, qh, qs)`; `None` for types that
/// keep the GGUF layout.
pub fn fields(ty: QuantType) -> Option<[usize; 4]> {
    Some(match ty {
        QuantType::Q4_0 => [2, 0, 0, 16],
        QuantType::Q4_1 => [2, 2, 0, 16],
        QuantType::Q5_0 => [2, 0, 4, 16],
        QuantType::Q5_1 => [2, 2, 4, 16],
        QuantType::Q8_0 => [2, 0, 0, 32],
        _ => return None,
    })
}

/// Whether rows of `ty` are held split.
pub fn is_split(ty: QuantType) -> bool {
    fields(ty).is_some()
}

/// Offsets of the runs in a split row of `nb` blocks: `(d, m, qh, qs)`.
pub fn runs(ty: QuantType, nb: usize) -> [usize; 4] {
    let f = fields(ty).unwrap_or([0; 4]);
    let d = 0;
    let m = d + f[0] * nb;
    let qh = m + f[1] * nb;
    let qs = qh + f[2] * nb;
    [d, m, qh, qs]
}

/// GGUF row bytes -> split row bytes (`out` as long as `row`). Types without a split layout are
/// copied.
pub fn split_row(ty: QuantType, row: &[u8], out: &mut [u8]) {
    let Some(f) = fields(ty) else {
        out.copy_from_slice(row);
        return;
    };
    let bb = ty.block_bytes();
    let nb = row.len() / bb;
    let r = runs(ty, nb);
    for (i, b) in row.chunks_exact(bb).enumerate() {
        let mut src = 0;
        for (&size, &run) in f.iter().zip(&r) {
            out[run + i * size..run + (i + 1) * size].copy_from_slice(&b[src..src + size]);
            src += size;
        }
    }
}

/// Split row bytes -> GGUF row bytes (inverse of [`split_row`]).
pub fn join_row(ty: QuantType, row: &[u8], out: &mut [u8]) {
    let Some(f) = fields(ty) else {
        out.copy_from_slice(row);
        return;
    };
    let bb = ty.block_bytes();
    let nb = row.len() / bb;
    let r = runs(ty, nb);
    for (i, b) in out.chunks_exact_mut(bb).enumerate() {
        let mut dst = 0;
        for (&size, &run) in f.iter().zip(&r) {
            b[dst..dst + size].copy_from_slice(&row[run + i * size..run + (i + 1) * size]);
            dst += size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join_are_inverse_and_group_fields() {
        for ty in QuantType::ALL {
            let n = 3 * ty.block_bytes();
            let row: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let mut s = vec![0u8; n];
            split_row(ty, &row, &mut s);
            let mut back = vec![0u8; n];
            join_row(ty, &s, &mut back);
            assert_eq!(back, row, "{ty}");
        }
        // Q4_1, 2 blocks: d0 d1 m0 m1 qs0 qs1.
        let row: Vec<u8> = (0..40).collect();
        let mut s = vec![0u8; 40];
        split_row(QuantType::Q4_1, &row, &mut s);
        assert_eq!(&s[..8], &[0, 1, 20, 21, 2, 3, 22, 23]);
        assert_eq!(&s[8..24], &row[4..20]);
        assert_eq!(runs(QuantType::Q5_0, 2), [0, 4, 4, 12]);
    }
}
