//! GGUF/ggml quantized tensors kept quantized: block types, exact dequantization, quantized
//! matrices and the quantized [`crate::linear::LinearBackend`].
//!
//! A quantized matrix `W` `[rows, cols]` is stored as llama.cpp stores it: each row is
//! `cols / block_size` consecutive blocks, each block a scale (and for some types a minimum or
//! sub-block scales) plus packed small integers. Dequantization ([`dequant`]) is bit-exact with
//! llama.cpp's `dequantize_row_*` and the `gguf` Python package (same f32 operations in the same
//! order). Products `x W^T` never dequantize `W`: the activations are quantized to 8 bits per
//! row ([`crate::kernels::qact`]) and integer dot products run on the packed blocks
//! ([`crate::kernels::qdot`]), as llama.cpp does.
//!
//! Block layouts (`d`, `m`, `dmin` are f16; element `i` of a block):
//! - `Q4_0` (32, 18 B): `d`, `qs[16]`; `w_i = d (q_i - 8)`, `q_i` = low nibble of `qs[i]` for
//!   `i < 16`, high nibble of `qs[i - 16]` after.
//! - `Q4_1` (32, 20 B): `d`, `m`, `qs[16]`; `w_i = d q_i + m`.
//! - `Q5_0` (32, 22 B): `d`, `qh[4]`, `qs[16]`; `w_i = d (q_i - 16)`, `q_i` = nibble as in `Q4_0`
//!   plus bit `i` of `qh` as bit 4.
//! - `Q5_1` (32, 24 B): `d`, `m`, `qh[4]`, `qs[16]`; `w_i = d q_i + m`.
//! - `Q8_0` (32, 34 B): `d`, `qs[32]` (i8); `w_i = d q_i`.
//! - `Q4_K` (256, 144 B): `d`, `dmin`, `scales[12]` (eight 6-bit scales `sc_j` and mins `m_j`),
//!   `qs[128]`; sub-block `j` (32 elements) `w = d sc_j q - dmin m_j`.
//! - `Q5_K` (256, 176 B): as `Q4_K` plus `qh[32]` (the fifth bits).
//! - `Q6_K` (256, 210 B): `ql[128]`, `qh[64]`, `scales[16]` (i8, one per 16 elements), `d`;
//!   `w = d sc (q - 32)`, `q` 6 bits.
//! - `Q2_K`, `Q3_K`: read (dequantized through candle) but not kept quantized.
use crate::error::{ModelError, Result};

pub mod backend;
pub mod dequant;
pub mod layout;
pub mod matrix;

pub use backend::{QuantBackend, QuantLinear, QuantWeights, WeightDtype};
pub use matrix::QMatrix;

/// A ggml tensor type this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// Every ggml type id with its name (llama.cpp's `ggml_type`), supported or not, so that an
/// unsupported tensor is named in errors.
const GGML_TYPES: [(u32, &str); 32] = [
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

/// The name llama.cpp gives ggml type `id` (`None` for an id it does not define).
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    GGML_TYPES.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)
}

impl QuantType {
    /// candle's name for this type (its GGUF `ggml_type`).
    pub(crate) fn ggml_dtype(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType;
        match self {
            QuantType::F32 => GgmlDType::F32,
            QuantType::F16 => GgmlDType::F16,
            QuantType::BF16 => GgmlDType::BF16,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q5_0 => GgmlDType::Q5_0,
            QuantType::Q5_1 => GgmlDType::Q5_1,
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q2_K => GgmlDType::Q2K,
            QuantType::Q3_K => GgmlDType::Q3K,
            QuantType::Q4_K => GgmlDType::Q4K,
            QuantType::Q5_K => GgmlDType::Q5K,
            QuantType::Q6_K => GgmlDType::Q6K,
        }
    }

    /// All types this crate reads.
    pub const ALL: [QuantType; 13] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// The type of ggml type id `id`; [`ModelError::UnsupportedQuant`] (naming `tensor` and the
    /// type) for ids this crate does not read.
    pub fn from_ggml(id: u32, tensor: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.ggml_id() == id)
            .ok_or_else(|| ModelError::UnsupportedQuant {
                tensor: tensor.to_string(),
                type_name: ggml_type_name(id)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("unknown type id {id}")),
                supported: Self::ALL
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// llama.cpp's `ggml_type` id.
    pub fn ggml_id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::BF16 => 30,
        }
    }

    /// The name llama.cpp prints (`Q4_K`, `F32`, ...).
    pub fn name(self) -> &'static str {
        ggml_type_name(self.ggml_id()).unwrap_or("?")
    }

    /// Parses a name as written on the command line (`q8_0`, `Q4_K`, `f32`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Bytes of `n` elements (`None` when `n` is not a whole number of blocks, or overflows).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.block_bytes())
    }

    /// Whether products run on the packed blocks ([`crate::kernels::qdot`]); other types are
    /// converted when a quantized model loads.
    pub fn has_kernel(self) -> bool {
        matches!(
            self,
            Self::Q4_0
                | Self::Q4_1
                | Self::Q5_0
                | Self::Q8_0
                | Self::Q4_K
                | Self::Q5_K
                | Self::Q6_K
        )
    }

    /// Whether this is a plain float type (no blocks).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_sizes_round_trip() {
        for t in QuantType::ALL {
            assert_eq!(QuantType::from_ggml(t.ggml_id(), "x").unwrap(), t);
            assert_eq!(QuantType::parse(&t.name().to_lowercase()), Some(t));
            assert_eq!(t.bytes_for(t.block_size() * 3), Some(3 * t.block_bytes()));
        }
        assert_eq!(QuantType::Q4_K.bytes_for(576), None);
        let e = QuantType::from_ggml(16, "blk.0.attn_q.weight").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("IQ2_XXS") && s.contains("blk.0.attn_q.weight"),
            "{s}"
        );
        let e = QuantType::from_ggml(99, "t").unwrap_err().to_string();
        assert!(e.contains("unknown type id 99"), "{e}");
    }
}
