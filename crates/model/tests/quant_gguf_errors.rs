//! Bad GGUF input is a clear, typed error (never a panic, never a half-loaded model): an
//! unsupported or unknown tensor type, metadata that disagrees with the tensors (shapes,
//! layer counts), a file truncated anywhere. The files are small ones this test writes byte by
//! byte (GGUF v3), next to a valid one that loads in F32 and quantized and runs.
use candle_core::{Device, Tensor};
use std::path::Path;
use umbra_model::gguf::GgufFile;
use umbra_model::load::{load_model, WeightDtype};
use umbra_model::quant::{QMatrix, QuantType};
use umbra_model::{Forward, Input, ModelError};

const D: usize = 32;
const HEADS: usize = 4;
const KV: usize = 2;
const FFN: usize = 64;
const VOCAB: usize = 40;

enum Val {
    U32(u32),
    F32(f32),
    Str(String),
}

struct TensorSpec {
    name: String,
    /// Innermost first (GGUF order).
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// GGUF v3 bytes: metadata, tensor table, data aligned to 32.
fn gguf_bytes(kv: &[(&str, Val)], tensors: &[TensorSpec]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut b, k);
        match v {
            Val::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Val::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Val::Str(s) => {
                b.extend(8u32.to_le_bytes());
                put_str(&mut b, s);
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = vec![];
    for t in tensors {
        offsets.push(offset);
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    for (t, off) in tensors.iter().zip(&offsets) {
        put_str(&mut b, &t.name);
        b.extend((t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    for t in tensors {
        b.extend(&t.data);
        b.resize(b.len().div_ceil(32) * 32, 0);
    }
    b
}

fn meta(layers: u32, d: u32) -> Vec<(&'static str, Val)> {
    vec![
        ("general.architecture", Val::Str("qwen2".into())),
        ("qwen2.embedding_length", Val::U32(d)),
        ("qwen2.block_count", Val::U32(layers)),
        ("qwen2.feed_forward_length", Val::U32(FFN as u32)),
        ("qwen2.attention.head_count", Val::U32(HEADS as u32)),
        ("qwen2.attention.head_count_kv", Val::U32(KV as u32)),
        ("qwen2.rope.freq_base", Val::F32(10000.0)),
        ("qwen2.attention.layer_norm_rms_epsilon", Val::F32(1e-6)),
        ("qwen2.context_length", Val::U32(64)),
    ]
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104729) % 1013) as f32 - 506.0) / 800.0)
        .collect()
}

fn f32_tensor(name: &str, ne: Vec<u64>, seed: usize) -> TensorSpec {
    let n: u64 = ne.iter().product();
    let data = values(n as usize, seed)
        .iter()
        .flat_map(|v| (1.0 + v).to_le_bytes())
        .collect();
    TensorSpec {
        name: name.into(),
        ne,
        ty: 0,
        data,
    }
}

fn q8_tensor(name: &str, rows: usize, cols: usize, seed: usize) -> TensorSpec {
    let m = QMatrix::quantize(&values(rows * cols, seed), rows, cols, QuantType::Q8_0).unwrap();
    TensorSpec {
        name: name.into(),
        ne: vec![cols as u64, rows as u64],
        ty: QuantType::Q8_0.ggml_id(),
        data: m.gguf_bytes(),
    }
}

/// A whole qwen2 model of `layers` layers (Q8_0 matrices, F32 norms and biases, untied head).
fn model_tensors(layers: usize) -> Vec<TensorSpec> {
    let hd = D / HEADS;
    let mut t = vec![
        q8_tensor("token_embd.weight", VOCAB, D, 1),
        f32_tensor("output_norm.weight", vec![D as u64], 2),
        q8_tensor("output.weight", VOCAB, D, 3),
    ];
    for l in 0..layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        let s = 10 * (l + 1);
        t.push(f32_tensor(&p("attn_norm.weight"), vec![D as u64], s));
        t.push(f32_tensor(&p("ffn_norm.weight"), vec![D as u64], s + 1));
        t.push(q8_tensor(&p("attn_q.weight"), HEADS * hd, D, s + 2));
        t.push(q8_tensor(&p("attn_k.weight"), KV * hd, D, s + 3));
        t.push(q8_tensor(&p("attn_v.weight"), KV * hd, D, s + 4));
        t.push(f32_tensor(
            &p("attn_q.bias"),
            vec![(HEADS * hd) as u64],
            s + 5,
        ));
        t.push(f32_tensor(&p("attn_k.bias"), vec![(KV * hd) as u64], s + 6));
        t.push(f32_tensor(&p("attn_v.bias"), vec![(KV * hd) as u64], s + 7));
        t.push(q8_tensor(&p("attn_output.weight"), D, HEADS * hd, s + 8));
        t.push(q8_tensor(&p("ffn_gate.weight"), FFN, D, s + 9));
        t.push(q8_tensor(&p("ffn_up.weight"), FFN, D, s + 10));
        t.push(q8_tensor(&p("ffn_down.weight"), D, FFN, s + 11));
    }
    t
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Opening, reading the config + checking tensors, and loading (F32 and quantized) all fail.
fn all_fail(path: &Path) -> ModelError {
    for dtype in [WeightDtype::F32, WeightDtype::Auto] {
        assert!(load_model(path, dtype, &Device::Cpu).is_err(), "{dtype:?}");
    }
    match GgufFile::open(path) {
        Err(e) => e,
        Ok(g) => {
            let cfg = g.config();
            match cfg {
                Err(e) => e,
                Ok(cfg) => g.check_tensors(&cfg).expect_err("check_tensors must fail"),
            }
        }
    }
}

#[test]
fn a_valid_crafted_model_loads_quantized_and_in_f32_and_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "ok.gguf",
        &gguf_bytes(&meta(2, D as u32), &model_tensors(2)),
    );
    let q = load_model(&p, WeightDtype::Auto, &Device::Cpu).unwrap();
    assert_eq!(q.dtype, "q8_0 x16");
    let f = load_model(&p, WeightDtype::F32, &Device::Cpu).unwrap();
    assert_eq!(f.dtype, "f32");
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 11]], &Device::Cpu).unwrap();
    let run = |m: &umbra_model::Llama| {
        let mut c = m.new_cache();
        m.forward(Input::Ids(&ids), &mut c, Forward::logits())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (lq, lf) = (run(&q.model), run(&f.model));
    let scale = lf.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = lq
        .iter()
        .zip(&lf)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 0.05 * scale,
        "quantized vs F32 logits: {diff} of {scale}"
    );
}

#[test]
fn unsupported_and_unknown_tensor_types_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (id, name) in [
        (16u32, "IQ2_XXS"),
        (23, "IQ4_XS"),
        (99, "unknown type id 99"),
    ] {
        let mut t = model_tensors(1);
        t[3].ty = id; // blk.0.attn_norm.weight
        let p = write(dir.path(), "bad.gguf", &gguf_bytes(&meta(1, D as u32), &t));
        match all_fail(&p) {
            ModelError::UnsupportedQuant {
                tensor, type_name, ..
            } => {
                assert_eq!(tensor, "blk.0.attn_norm.weight");
                assert_eq!(type_name, name);
            }
            e => panic!("expected UnsupportedQuant, got {e}"),
        }
    }
}

#[test]
fn metadata_that_disagrees_with_the_tensors_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // Hidden size: the metadata says 64, the tensors are 32 wide.
    let p = write(
        dir.path(),
        "d.gguf",
        &gguf_bytes(&meta(2, 64), &model_tensors(2)),
    );
    match all_fail(&p) {
        ModelError::Mismatch(m) => {
            assert!(m.contains("has shape") && m.contains("metadata"), "{m}");
        }
        e => panic!("expected Mismatch, got {e}"),
    }
    // Layer count: 3 in the metadata, 2 layers of tensors.
    let p = write(
        dir.path(),
        "l3.gguf",
        &gguf_bytes(&meta(3, D as u32), &model_tensors(2)),
    );
    match all_fail(&p) {
        ModelError::MissingTensor(m) => assert!(m.contains("blk.2."), "{m}"),
        e => panic!("expected MissingTensor, got {e}"),
    }
    // 1 in the metadata, 2 layers of tensors.
    let p = write(
        dir.path(),
        "l1.gguf",
        &gguf_bytes(&meta(1, D as u32), &model_tensors(2)),
    );
    match all_fail(&p) {
        ModelError::Mismatch(m) => {
            assert!(m.contains("blk.1.") && m.contains("block_count"), "{m}")
        }
        e => panic!("expected Mismatch, got {e}"),
    }
    // A tensor whose element count is not whole blocks of its type.
    let mut t = model_tensors(1);
    t[0].ne = vec![33, VOCAB as u64];
    let p = write(
        dir.path(),
        "blocks.gguf",
        &gguf_bytes(&meta(1, D as u32), &t),
    );
    match all_fail(&p) {
        ModelError::Malformed { msg, .. } => assert!(msg.contains("token_embd.weight"), "{msg}"),
        e => panic!("expected Malformed, got {e}"),
    }
}

#[test]
fn truncated_files_are_typed_errors_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    let full = gguf_bytes(&meta(1, D as u32), &model_tensors(1));
    let mut data_cuts = 0;
    let cuts: Vec<usize> = (0..full.len())
        .step_by(97)
        .chain([full.len() - 1])
        .collect();
    for cut in cuts {
        let p = write(dir.path(), "cut.gguf", &full[..cut]);
        match all_fail(&p) {
            ModelError::Truncated {
                what, needed, len, ..
            } => {
                assert_eq!(len, cut as u64);
                assert!(needed > len, "{what}: {needed} <= {len}");
                if what.starts_with("tensor `") {
                    data_cuts += 1;
                }
            }
            ModelError::Malformed { .. } if cut < 4 => {}
            e => panic!("cut at {cut}: expected Truncated, got {e}"),
        }
    }
    assert!(data_cuts > 0, "some cuts fall in the tensor data");
}
