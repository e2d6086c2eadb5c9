//! The split forward (customer: embeddings + blocks 0..k; vendor: blocks k..L) equals the
//! unsplit forward of candle-transformers' reference BERT on all-MiniLM-L6-v2, for every k.
use candle_core::{DType, Device, Tensor};
use umbra_sap::bert::BertEncoder;
use umbra_sap::data::WordPiece;
use umbra_sap::split::Customer;

fn minilm() -> std::path::PathBuf {
    umbra_assets::Cache::from_env()
        .unwrap()
        .require(umbra_assets::Asset::MiniLm)
        .unwrap()
}

#[test]
fn split_forward_equals_reference_unsplit() {
    let dir = minilm();
    let dev = Device::Cpu;
    let enc = BertEncoder::load(&dir, &dev).unwrap();
    assert_eq!(enc.num_blocks(), 6);
    assert_eq!(enc.hidden(), 384);
    let tok = WordPiece::load(&dir, 64).unwrap();
    let texts = [
        "self-driving cars just seem lazy and a waste of money",
        "I love it!",
        "you'll never get me in an autonomous vehicle. Ever. Never. #nope 42",
    ];
    let seqs: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    // padding is off: lengths differ and the first token is [CLS], the last [SEP]
    assert!(seqs[1].len() < seqs[0].len());
    assert_eq!(seqs[1][0], 101);
    assert_eq!(*seqs[1].last().unwrap(), 102);
    let tmax = seqs.iter().map(Vec::len).max().unwrap();
    let mut ids = vec![0u32; 3 * tmax];
    let mut mask = vec![0f32; 3 * tmax];
    for (r, s) in seqs.iter().enumerate() {
        ids[r * tmax..r * tmax + s.len()].copy_from_slice(s);
        mask[r * tmax..r * tmax + s.len()]
            .iter_mut()
            .for_each(|m| *m = 1.0);
    }
    let ids_t = Tensor::from_vec(ids.clone(), (3, tmax), &dev).unwrap();
    let mask_t = Tensor::from_vec(mask.clone(), (3, tmax), &dev).unwrap();

    // reference: candle-transformers BERT
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
            &ids_t,
            &ids_t.zeros_like().unwrap(),
            Some(&mask_t.to_dtype(DType::U32).unwrap()),
        )
        .unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    // ours, unsplit
    let ours: Vec<f32> = enc
        .forward(&ids_t, &mask_t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    // compare real tokens only
    let real = |v: &[f32]| -> Vec<f32> {
        let mut out = Vec::new();
        for (r, s) in seqs.iter().enumerate() {
            out.extend_from_slice(&v[r * tmax * 384..(r * tmax + s.len()) * 384]);
        }
        out
    };
    assert!(
        close(&real(&ours), &real(&want)) < 1e-3,
        "unsplit differs: {}",
        close(&real(&ours), &real(&want))
    );

    // split at every k: customer output per sequence (unpadded) -> vendor rest (re-padded)
    for k in 0..=6 {
        let c = Customer::new(&enc, k).unwrap();
        let cut = c.cut_outputs(&seqs, 2).unwrap();
        for (s, r) in seqs.iter().zip(&cut) {
            assert_eq!(r.len(), s.len() * 384, "no padding rows leave the customer");
        }
        let parts: Vec<&[f32]> = cut.iter().map(|v| v.as_slice()).collect();
        let (x, m) = umbra_sap::split::pad_rows(&parts, 384, &dev).unwrap();
        let bias = BertEncoder::attention_bias(&m).unwrap();
        let h = enc.forward_blocks(&x, &bias, k..6, false).unwrap();
        let got: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
        let err = close(&real(&got), &real(&want));
        assert!(err < 1e-3, "split at {k}: max abs diff {err}");
    }
    // and the split really changes something when the rest is skipped
    let c = Customer::new(&enc, 3).unwrap();
    let cut = c.cut_outputs(&seqs[..1], 1).unwrap();
    assert!(close(&cut[0], &real(&want)[..cut[0].len()]) > 0.1);
    assert!(Customer::new(&enc, 7).is_err());
}
