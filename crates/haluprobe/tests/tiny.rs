//! Pipeline checks on a tiny random model (no assets): attention tap, features, chunk files,
//! resume-safe manifest, probe files and the errors on bad input.
use candle_core::{Device, Tensor};
use umbra_haluprobe::features::{extract_ids, key_shapes, ExtractConfig, Features};
use umbra_haluprobe::probe::{
    FeatureRef, Net, ProbeFile, ProbeKind, ProbeMeta, TrainConfig, PROBE_FORMAT,
};
use umbra_haluprobe::score::Scorer;
use umbra_haluprobe::store::{
    chunk_bytes, write_atomic, write_json, ChunkInfo, FeatureStore, Manifest, Matrix, ModelDims,
    FORMAT, MANIFEST,
};
use umbra_haluprobe::HaluError;
use umbra_model::llama::{testing, Llama, TapPoint};

fn tiny(layers: usize) -> Llama {
    let cfg = testing::tiny_config(32, 4, 2, layers, 64);
    Llama::new(&cfg, &testing::random_weights(&cfg, 3), &Device::Cpu).unwrap()
}

#[test]
fn attention_tap_is_opt_in_and_exact() {
    let m = tiny(2);
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7]], &Device::Cpu).unwrap();
    let emb = m.embed(&ids).unwrap();
    let mut c = m.new_cache();
    let plain = m.forward_embeds(&emb, &mut c).unwrap();
    let mut probs = vec![];
    let mut points = vec![];
    let mut c2 = m.new_cache();
    let tapped = m
        .forward_embeds_with_attention_taps(&emb, &mut c2, &mut |p, t| {
            points.push(p);
            if let TapPoint::Attention(_) = p {
                probs.push(t.clone());
            }
        })
        .unwrap();
    let d = (plain - tapped).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    assert_eq!(
        points,
        vec![
            TapPoint::Embeddings,
            TapPoint::Attention(0),
            TapPoint::Layer(0),
            TapPoint::Attention(1),
            TapPoint::Layer(1)
        ]
    );
    // Plain taps never see attention.
    let mut c3 = m.new_cache();
    let mut any_attn = false;
    m.forward_embeds_with_taps(&emb, &mut c3, &mut |p, _| {
        any_attn |= matches!(p, TapPoint::Attention(_))
    })
    .unwrap();
    assert!(!any_attn);
    let p = probs[1].squeeze(0).unwrap().to_vec3::<f32>().unwrap(); // [nh, t, L]
    assert_eq!((p.len(), p[0].len(), p[0][0].len()), (4, 5, 5));
    for h in &p {
        for (i, row) in h.iter().enumerate() {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(row[i + 1..].iter().all(|&x| x == 0.0), "causal");
        }
    }
    // A one-token continuation with taps still gets its attention row (no fast path).
    let one = m
        .embed(&Tensor::new(&[[2u32]], &Device::Cpu).unwrap())
        .unwrap();
    let mut n = 0;
    m.forward_embeds_with_attention_taps(&one, &mut c2, &mut |p, t| {
        if let TapPoint::Attention(_) = p {
            assert_eq!(t.dims(), &[1, 4, 1, 6]);
            n += 1;
        }
    })
    .unwrap();
    assert_eq!(n, 2);
}

fn feats(m: &Llama) -> Vec<Features> {
    extract_ids(
        m,
        &ExtractConfig::default(),
        &[1, 4, 6, 8, 10, 12],
        &[vec![3], vec![5, 7, 9, 11]],
    )
    .unwrap()
}

#[test]
fn features_have_the_declared_shapes_and_ranges() {
    let m = tiny(3);
    let f = feats(&m);
    let shapes = key_shapes(3, 32, 4);
    assert_eq!(f.len(), 2);
    for fe in &f {
        assert_eq!(
            fe.keys().collect::<Vec<_>>(),
            shapes.keys().collect::<Vec<_>>()
        );
        for (k, s) in &shapes {
            assert_eq!(fe[k].len(), s.iter().product::<usize>(), "{k}");
            assert!(fe[k].iter().all(|x| x.is_finite()), "{k}");
        }
        assert!(fe["lookback.generation.mean"]
            .iter()
            .all(|&x| (0.0..=1.0).contains(&x)));
        assert!(fe["logit.generation"][0] <= 0.0);
    }
    // Shared prompt: understanding is identical, the answers differ.
    assert_eq!(
        f[0]["hidden.understanding.mean"],
        f[1]["hidden.understanding.mean"]
    );
    assert_ne!(
        f[0]["hidden.generation.mean"],
        f[1]["hidden.generation.mean"]
    );
    assert_eq!(f[0]["logit.generation"][7], 1.0);
    assert_eq!(f[1]["logit.generation"][7], 4.0);
    // One-token answer: the single LLM-Check row pair (last prompt token, answer) is finite.
    assert_eq!(f[0]["llmcheck.generation"].len(), 3);
}

fn write_store(dir: &std::path::Path, m: &Llama, pairs: usize) -> Manifest {
    let dims = ModelDims::of(m.config());
    let keys = key_shapes(dims.num_layers, dims.hidden_size, dims.num_heads);
    let mut all = vec![];
    let mut labels = vec![];
    let mut rows = vec![];
    for r in 0..pairs {
        let a = (r % 60) as u32 + 1;
        let f = extract_ids(
            m,
            &ExtractConfig::default(),
            &[1, a, 6],
            &[vec![a + 1], vec![a, 9, 9]],
        )
        .unwrap();
        for (l, fe) in [0.0, 1.0].into_iter().zip(f) {
            all.push(fe);
            labels.push(l);
            rows.push(r as u32);
        }
    }
    write_atomic(
        &dir.join("chunk-00000.safetensors"),
        &chunk_bytes(&keys, &all, &labels, &rows).unwrap(),
    )
    .unwrap();
    let man = Manifest {
        format: FORMAT.into(),
        model: dims,
        model_path: "tiny".into(),
        data: "synthetic".into(),
        seed: 0,
        extract: ExtractConfig::default(),
        chunk_rows: pairs,
        keys,
        chunks: vec![ChunkInfo {
            file: "chunk-00000.safetensors".into(),
            index: 0,
            triples: 2 * pairs,
        }],
    };
    write_json(&dir.join(MANIFEST), &man).unwrap();
    man
}

#[test]
fn store_roundtrip_probe_file_and_bad_input() {
    let m = tiny(2);
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), &m, 40);
    let store = FeatureStore::open(dir.path()).unwrap();
    assert_eq!(store.len(), 80);
    let f = feats(&m);
    // The stored hidden states are F16: within half precision of the originals.
    let x = store.load_layer("hidden.generation.mean", 1).unwrap();
    assert_eq!((x.rows, x.cols), (80, 32));
    let logit = store.load("logit.generation").unwrap();
    // Answer lengths 1 and 3 separate the classes exactly; a probe on them is perfect.
    let net = Net::fit(&logit, &store.labels, &TrainConfig::logreg(1e-3)).unwrap();
    let p = net.predict(&logit).unwrap();
    assert_eq!(
        umbra_haluprobe::metrics::auroc(&p, &store.labels),
        Some(1.0)
    );
    let meta = ProbeMeta {
        format: PROBE_FORMAT.into(),
        kind: ProbeKind::Logreg,
        features: vec![FeatureRef::new("logit.generation", None)],
        stage: umbra_haluprobe::features::Stage::Generation,
        model: store.manifest.model.clone(),
        extract: ExtractConfig::default(),
        threshold: 0.5,
        obfuscated: None,
    };
    let probe = ProbeFile { meta, net };
    let path = dir.path().join("probe.safetensors");
    probe.save(&path).unwrap();
    let loaded = Scorer::load(&path, m.config()).unwrap();
    let s0 = loaded.score_features(&f[0]).unwrap().score;
    let s1 = loaded.score_features(&f[1]).unwrap().score;
    assert!(s1 > s0, "longer answer scores higher: {s0} {s1}");
    assert!((probe.score(&f[1]).unwrap() - s1).abs() < 1e-6);

    // Probe for another model (layer count) -> clear error.
    let other = tiny(3);
    let e = Scorer::load(&path, other.config()).unwrap_err();
    assert!(matches!(e, HaluError::ProbeMismatch(_)), "{e}");
    assert!(e.to_string().contains("2 layers"), "{e}");
    // Not a probe file.
    std::fs::write(dir.path().join("junk.safetensors"), b"not safetensors").unwrap();
    assert!(matches!(
        ProbeFile::load(&dir.path().join("junk.safetensors")),
        Err(HaluError::Malformed { .. })
    ));
    // Wrong feature width.
    let bad = Matrix {
        rows: 1,
        cols: 3,
        data: vec![0.0; 3],
    };
    assert!(matches!(
        probe.net.predict(&bad),
        Err(HaluError::FeatureMismatch(_))
    ));

    // Malformed features: a truncated chunk, then a manifest with no chunks.
    let chunk = dir.path().join("chunk-00000.safetensors");
    let bytes = std::fs::read(&chunk).unwrap();
    std::fs::write(&chunk, &bytes[..bytes.len() / 2]).unwrap();
    let e = FeatureStore::open(dir.path()).err().unwrap();
    assert!(matches!(e, HaluError::Malformed { .. }), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let mut man = write_store(empty.path(), &m, 3);
    man.chunks.clear();
    write_json(&empty.path().join(MANIFEST), &man).unwrap();
    assert!(matches!(
        FeatureStore::open(empty.path()),
        Err(HaluError::Empty(_))
    ));
    assert!(matches!(
        FeatureStore::open(&empty.path().join("nope")),
        Err(HaluError::Io { .. })
    ));
}
