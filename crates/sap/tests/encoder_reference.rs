//! The encoders against independent implementations, split and unsplit:
//! - all-MiniLM-L6-v2 (BERT) against candle-transformers' BERT, at every split point;
//! - all-mpnet-base-v2 (MPNet) against HF transformers' `MPNetModel` (values recorded by
//!   `tests/reference/mpnet_reference.py` into `tests/reference/all-mpnet-base-v2.json`), and
//!   the split at the paper's 6 customer blocks;
//! - bad input: a tokenizer of another encoder and a truncated weight file are clear errors.
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;
use umbra_sap::encoder::Encoder;
use umbra_sap::roles::{pad_rows, Customer};
use umbra_sap::tokenizer::Tokenizer;

fn minilm() -> PathBuf {
    umbra_sap::experiment::model_dir("minilm", &None)
        .unwrap_or_else(|e| panic!("{e} (run `umbra fetch minilm`)"))
}

/// The MPNet folder: `$UMBRA_SAP_MPNET` or the `mpnet` asset.
fn mpnet() -> PathBuf {
    if let Ok(p) = std::env::var("UMBRA_SAP_MPNET") {
        return p.into();
    }
    umbra_sap::experiment::model_dir("mpnet", &None)
        .unwrap_or_else(|e| panic!("{e} (run `umbra fetch mpnet`)"))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// `seqs` padded to one batch: ids `[b, t]`, mask `[b, t]`.
fn batch(seqs: &[Vec<u32>], pad: u32, dev: &Device) -> (Tensor, Tensor, usize) {
    let tmax = seqs.iter().map(Vec::len).max().unwrap();
    let mut ids = vec![pad; seqs.len() * tmax];
    let mut mask = vec![0f32; seqs.len() * tmax];
    for (r, s) in seqs.iter().enumerate() {
        ids[r * tmax..r * tmax + s.len()].copy_from_slice(s);
        mask[r * tmax..r * tmax + s.len()]
            .iter_mut()
            .for_each(|m| *m = 1.0);
    }
    (
        Tensor::from_vec(ids, (seqs.len(), tmax), dev).unwrap(),
        Tensor::from_vec(mask, (seqs.len(), tmax), dev).unwrap(),
        tmax,
    )
}

/// Real-token rows of a padded `[b, t, d]` output.
fn real(v: &[f32], seqs: &[Vec<u32>], tmax: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for (r, s) in seqs.iter().enumerate() {
        out.extend_from_slice(&v[r * tmax * d..(r * tmax + s.len()) * d]);
    }
    out
}

const TEXTS: [&str; 3] = [
    "self-driving cars just seem lazy and a waste of money",
    "I love it!",
    "you'll never get me in an autonomous vehicle. Ever. Never. #nope 42",
];

#[test]
fn minilm_split_forward_equals_candle_transformers_bert() {
    let dir = minilm();
    let dev = Device::Cpu;
    let enc = Encoder::load(&dir, &dev).unwrap();
    assert_eq!((enc.num_blocks(), enc.hidden()), (6, 384));
    let tok = Tokenizer::load(&dir, 64, &enc.config).unwrap();
    let seqs: Vec<Vec<u32>> = TEXTS.iter().map(|t| tok.encode(t).unwrap()).collect();
    assert!(seqs[1].len() < seqs[0].len(), "padding is off");
    assert_eq!((seqs[1][0], *seqs[1].last().unwrap()), (101, 102));
    let (ids, mask, tmax) = batch(&seqs, 0, &dev);
    let cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &dev,
        )
        .unwrap()
    };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &cfg).unwrap();
    let want = reference
        .forward(
            &ids,
            &ids.zeros_like().unwrap(),
            Some(&mask.to_dtype(DType::U32).unwrap()),
        )
        .unwrap();
    let want = real(
        &want.flatten_all().unwrap().to_vec1().unwrap(),
        &seqs,
        tmax,
        384,
    );
    let ours = enc.forward(&ids, &mask).unwrap();
    let ours = real(
        &ours.flatten_all().unwrap().to_vec1().unwrap(),
        &seqs,
        tmax,
        384,
    );
    assert!(max_diff(&ours, &want) < 1e-3, "{}", max_diff(&ours, &want));
    for k in 0..=6 {
        let cut = Customer::new(&enc, k)
            .unwrap()
            .cut_outputs(&seqs, 2)
            .unwrap();
        for (s, r) in seqs.iter().zip(&cut) {
            assert_eq!(r.len(), s.len() * 384, "no padding rows leave the customer");
        }
        let parts: Vec<&[f32]> = cut.iter().map(|v| v.as_slice()).collect();
        let (x, m) = pad_rows(&parts, 384, &dev).unwrap();
        let h = enc
            .forward_blocks(&x, &enc.attention_bias(&m).unwrap(), k..6, false)
            .unwrap();
        let got = real(
            &h.flatten_all().unwrap().to_vec1().unwrap(),
            &seqs,
            tmax,
            384,
        );
        assert!(
            max_diff(&got, &want) < 1e-3,
            "split at {k}: {}",
            max_diff(&got, &want)
        );
    }
    assert!(Customer::new(&enc, 7).is_err());
}

#[derive(serde::Deserialize)]
struct Reference {
    sentences: Vec<Sentence>,
}

#[derive(serde::Deserialize)]
struct Sentence {
    text: String,
    ids: Vec<u32>,
    head16: Vec<Vec<f32>>,
    mean: Vec<f32>,
}

#[test]
fn mpnet_matches_transformers_and_splits_at_six_blocks() {
    let dir = mpnet();
    let dev = Device::Cpu;
    let enc = Encoder::load(&dir, &dev).unwrap();
    assert_eq!(
        (enc.num_blocks(), enc.hidden(), enc.config.vocab_size),
        (12, 768, 30527)
    );
    let tok = Tokenizer::load(&dir, 128, &enc.config).unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/all-mpnet-base-v2.json"
    );
    let r: Reference = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let seqs: Vec<Vec<u32>> = r
        .sentences
        .iter()
        .map(|s| tok.encode(&s.text).unwrap())
        .collect();
    for (s, ids) in r.sentences.iter().zip(&seqs) {
        assert_eq!(&s.ids, ids, "token ids of {:?}", s.text);
    }
    // one padded batch (pad id 1): padding must not change real tokens
    let (ids, mask, tmax) = batch(&seqs, 1, &dev);
    let out: Vec<f32> = enc
        .forward(&ids, &mask)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let out = real(&out, &seqs, tmax, 768);
    let (mut off, mut worst) = (0usize, 0f32);
    for s in &r.sentences {
        let n = s.ids.len();
        let rows = &out[off * 768..(off + n) * 768];
        for (t, want) in s.head16.iter().enumerate() {
            worst = worst.max(max_diff(&rows[t * 768..t * 768 + 16], want));
        }
        let mean: Vec<f32> = (0..768)
            .map(|j| (0..n).map(|t| rows[t * 768 + j]).sum::<f32>() / n as f32)
            .collect();
        worst = worst.max(max_diff(&mean, &s.mean));
        off += n;
    }
    eprintln!("max abs diff against transformers' MPNetModel: {worst:e}");
    assert!(worst < 1e-3, "max abs diff {worst}");
    // split at the paper's point: customer = embeddings + 6 blocks, vendor = blocks 6..12
    let cut = Customer::new(&enc, 6)
        .unwrap()
        .cut_outputs(&seqs, 2)
        .unwrap();
    let parts: Vec<&[f32]> = cut.iter().map(|v| v.as_slice()).collect();
    let (x, m) = pad_rows(&parts, 768, &dev).unwrap();
    let h = enc
        .forward_blocks(&x, &enc.attention_bias(&m).unwrap(), 6..12, false)
        .unwrap();
    let got = real(
        &h.flatten_all().unwrap().to_vec1().unwrap(),
        &seqs,
        tmax,
        768,
    );
    assert!(
        max_diff(&got, &out) < 1e-3,
        "split at 6: {}",
        max_diff(&got, &out)
    );
    // optional: every value of the last hidden state (the full dump of the reference script)
    if let Ok(full) = std::env::var("UMBRA_SAP_MPNET_FULL_REFERENCE") {
        #[derive(serde::Deserialize)]
        struct Full {
            hidden: Vec<Vec<f32>>,
        }
        let f: Vec<Full> = serde_json::from_str(&std::fs::read_to_string(full).unwrap()).unwrap();
        let want: Vec<f32> = f.iter().flat_map(|s| s.hidden.concat()).collect();
        eprintln!(
            "max abs diff over the whole last hidden state: {:e}",
            max_diff(&out, &want)
        );
    }
}

#[test]
fn wrong_tokenizer_and_truncated_weights_are_clear_errors() {
    let (mini, mp) = (minilm(), mpnet());
    let dev = Device::Cpu;
    // MiniLM's tokenizer with MPNet's encoder (30522 vs 30527 tokens), and the reverse
    let mcfg = Encoder::read_config(&mp).unwrap();
    let e = Tokenizer::load(&mini, 64, &mcfg).err().unwrap().to_string();
    assert!(e.contains("does not belong"), "{e}");
    let bcfg = Encoder::read_config(&mini).unwrap();
    let e = Tokenizer::load(&mp, 64, &bcfg).err().unwrap().to_string();
    assert!(e.contains("does not belong"), "{e}");
    // a weight file cut short (a truncated download)
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(mini.join("config.json"), t.path().join("config.json")).unwrap();
    let w = std::fs::read(mini.join("model.safetensors")).unwrap();
    std::fs::write(t.path().join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    let e = Encoder::load(t.path(), &dev).err().unwrap().to_string();
    assert!(
        e.contains("truncated") && e.contains("model.safetensors"),
        "{e}"
    );
}
