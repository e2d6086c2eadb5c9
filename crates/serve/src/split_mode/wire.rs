//! The split-mode wire format (`POST /v1/split/forward`, JSON; tensors are little-endian F32,
//! base64):
//!
//! ```text
//! request  {"session": null | "split-..", "rows": n, "width": d', "embeddings": b64([n, d']),
//!           "return": "last" | "all", "close": false}
//! response {"session": "split-..", "position": L, "rows": m, "width": d', "hidden": b64([m, d'])}
//! ```
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The route split-mode clients call.
pub const FORWARD_PATH: &str = "/v1/split/forward";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// F32 little-endian, base64.
pub fn encode_f32(v: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    B64.encode(bytes)
}

/// Inverse of [`encode_f32`]; `expect` floats, every one finite.
pub fn decode_f32(s: &str, expect: usize, what: &str) -> Result<Vec<f32>, String> {
    let bytes = B64
        .decode(s)
        .map_err(|e| format!("`{what}` is not valid base64: {e}"))?;
    if bytes.len() != expect * 4 {
        return Err(format!(
            "`{what}` holds {} bytes, rows x width needs {} (F32)",
            bytes.len(),
            expect * 4
        ));
    }
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(format!("`{what}` has non-finite values"));
    }
    Ok(v)
}

/// `POST /v1/split/forward` body.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ForwardRequest {
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub rows: usize,
    #[serde(default)]
    pub width: usize,
    #[serde(default)]
    pub embeddings: Option<String>,
    /// `"last"` (default) or `"all"`.
    #[serde(default, rename = "return")]
    pub return_rows: Option<String>,
    #[serde(default)]
    pub close: bool,
}

/// `POST /v1/split/forward` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardResponse {
    pub session: String,
    /// Positions in the session's cache after this step.
    pub position: usize,
    pub rows: usize,
    pub width: usize,
    pub hidden: String,
    #[serde(default)]
    pub closed: bool,
}
