//! GGUF quant types read exactly: our dequantization of real tensors equals, bit for bit, the
//! `gguf` Python package's (`gguf.quants.dequantize`, llama.cpp's reference port), for every type
//! in the real files: Q4_1 and Q8_0 (SmolLM2-135M), Q5_0, Q8_0, Q6_K and Q4_K
//! (Qwen2.5-Coder-0.5B), Q4_K and Q6_K (Qwen2.5-Coder-1.5B Q4_K_M). The quantized matrices the
//! engine holds (split row layout) give the same values back.
//!
//! Needs the assets (`umbra fetch smollm2`, `umbra fetch qwen2.5-coder-0.5b`,
//! `umbra fetch qwen2.5-coder-1.5b`) and `python3 -m pip install gguf`.
use std::path::{Path, PathBuf};
use umbra_assets::{Asset, Cache};
use umbra_model::gguf::GgufFile;
use umbra_model::quant::{QMatrix, QuantType};

fn asset(a: Asset) -> PathBuf {
    Cache::from_env()
        .and_then(|c| c.require(a))
        .unwrap_or_else(|e| panic!("{e}"))
}

const DEQUANT_PY: &str = r#"
import sys
import numpy as np
try:
    import gguf
except ImportError:
    sys.exit("the gguf Python package is missing: python3 -m pip install gguf")
r = gguf.GGUFReader(sys.argv[1])
want = sys.argv[3:]
by_name = {t.name: t for t in r.tensors}
with open(sys.argv[2], "wb") as f:
    for n in want:
        t = by_name[n]
        v = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        f.write(np.ascontiguousarray(v).tobytes())
"#;

/// The `gguf` package's dequantization of `names`, concatenated.
fn python_dequant(path: &Path, names: &[&str]) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deq.bin");
    let st = std::process::Command::new("python3")
        .arg("-c")
        .arg(DEQUANT_PY)
        .arg(path)
        .arg(&out)
        .args(names)
        .output()
        .expect("python3 must be installed");
    assert!(
        st.status.success(),
        "python3 gguf failed (python3 -m pip install gguf): {}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read(&out)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn check_file(path: &Path, names: &[(&str, QuantType)]) {
    let g = GgufFile::open(path).unwrap();
    let ns: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
    let want = python_dequant(path, &ns);
    let mut off = 0;
    for (name, ty) in names {
        let t = &g.tensors[*name];
        assert_eq!(t.ty, *ty, "{name}");
        let ours = g.tensor_f32(name).unwrap();
        let theirs = &want[off..off + ours.len()];
        off += ours.len();
        let bad = ours
            .iter()
            .zip(theirs)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            bad.is_none(),
            "{name} ({ty}) differs at {bad:?}: {} vs {}",
            ours[bad.unwrap()],
            theirs[bad.unwrap()]
        );
        // The engine's in-memory matrix dequantizes to the same values.
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let m = QMatrix::new(*ty, rows, cols, g.tensor_bytes(name).unwrap()).unwrap();
        for r in [0, rows / 2, rows - 1] {
            assert_eq!(
                m.dequantize_row(r).unwrap(),
                ours[r * cols..(r + 1) * cols].to_vec(),
                "{name} row {r}"
            );
        }
        assert_eq!(m.gguf_bytes(), g.tensor_bytes(name).unwrap(), "{name}");
    }
    assert_eq!(off, want.len());
}

#[test]
fn smollm2_q4_1_and_q8_0_match_gguf_python() {
    check_file(
        &asset(Asset::SmolLM2Gguf),
        &[
            ("blk.0.attn_q.weight", QuantType::Q4_1),
            ("blk.29.ffn_down.weight", QuantType::Q4_1),
            ("token_embd.weight", QuantType::Q8_0),
        ],
    );
}

#[test]
fn qwen_0_5b_q5_0_q8_0_q6_k_q4_k_match_gguf_python() {
    check_file(
        &asset(Asset::Qwen05b),
        &[
            ("blk.0.attn_q.weight", QuantType::Q5_0),
            ("blk.0.attn_v.weight", QuantType::Q8_0),
            ("blk.0.ffn_down.weight", QuantType::Q6_K),
            ("blk.2.ffn_down.weight", QuantType::Q4_K),
        ],
    );
}

#[test]
fn qwen_1_5b_q4_k_and_q6_k_match_gguf_python() {
    check_file(
        &asset(Asset::Qwen15b),
        &[
            ("blk.0.attn_q.weight", QuantType::Q4_K),
            ("blk.0.attn_v.weight", QuantType::Q6_K),
            ("blk.27.ffn_down.weight", QuantType::Q6_K),
        ],
    );
}
