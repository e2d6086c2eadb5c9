//! Pipeline checks on a tiny random model (no assets): attention tap, features, chunk files,
//! resume-safe manifest, probe files and the errors on bad input; the ffn family end to end
//! (grid, `--select`, old folders without it).
use candle_core::{Device, Tensor};
use umbra_common::fs::{write_atomic, write_json};
use umbra_common::progress::Progress;
use umbra_haluprobe::eval::{run_grid, train_selected, EvalConfig};
use umbra_haluprobe::features::{
    extract_ids, key_shapes, ExtractConfig, Features, FFN_KEYS, FFN_STATS, FFN_STAT_NAMES,
};
use umbra_haluprobe::probe::{
    FeatureRef, Net, ProbeFile, ProbeKind, ProbeMeta, TrainConfig, PROBE_FORMAT,
};
use umbra_haluprobe::score::Scorer;
use umbra_haluprobe::store::{
    chunk_bytes, ChunkInfo, FeatureStore, Manifest, Matrix, ModelDims, FORMAT, MANIFEST,
};
use umbra_haluprobe::HaluError;
use umbra_model::llama::{Llama, TapPoint};
use umbra_model::testing;
use umbra_model::{Forward, Input, TapOptions};

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
    let plain = m
        .forward(Input::Embeds(&emb), &mut c, Forward::hidden())
        .unwrap();
    let mut probs = vec![];
    let mut points = vec![];
    let mut c2 = m.new_cache();
    let tapped = m
        .forward(
            Input::Embeds(&emb),
            &mut c2,
            Forward::hidden().taps(TapOptions::ATTENTION, &mut |p, t| {
                points.push(p);
                if let TapPoint::Attention(_) = p {
                    probs.push(t.clone());
                }
            }),
        )
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
    m.forward(
        Input::Embeds(&emb),
        &mut c3,
        Forward::hidden().tap(&mut |p, _| any_attn |= matches!(p, TapPoint::Attention(_))),
    )
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
    m.forward(
        Input::Embeds(&one),
        &mut c2,
        Forward::hidden().taps(TapOptions::ATTENTION, &mut |p, t| {
            if let TapPoint::Attention(_) = p {
                assert_eq!(t.dims(), &[1, 4, 1, 6]);
                n += 1;
            }
        }),
    )
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
    // FFN statistics: [L, 7] per stage, in range, shared prompt -> equal understanding row.
    assert_eq!(FFN_STAT_NAMES.len(), FFN_STATS);
    for fe in &f {
        for (k, _) in FFN_KEYS {
            assert_eq!(shapes[k], vec![3, FFN_STATS], "{k}");
            for l in fe[k].chunks_exact(FFN_STATS) {
                let [_mean, std, mean_abs, max_abs, active, positive, kurt] =
                    <[f32; FFN_STATS]>::try_from(l).unwrap();
                assert!(std > 0.0 && kurt > 0.0, "{k}: {l:?}");
                assert!(max_abs >= mean_abs && mean_abs > 0.0, "{k}: {l:?}");
                assert!((0.0..=1.0).contains(&active) && (0.0..=1.0).contains(&positive));
            }
        }
    }
    assert_eq!(
        f[0]["ffn.understanding.mean"],
        f[1]["ffn.understanding.mean"]
    );
    assert_ne!(f[0]["ffn.generation.mean"], f[1]["ffn.generation.mean"]);
    // One-token answer: last = mean over the answer.
    assert_eq!(f[0]["ffn.generation.last"], f[0]["ffn.generation.mean"]);
}

/// The `ffn.*` rows are the statistics of the engine's own FFN tap: recompute one from
/// `TapPoint::Ffn` of the same passes (prompt, then the answer from the prompt's cache).
#[test]
fn ffn_features_come_from_the_engine_tap() {
    use umbra_haluprobe::ffn_stats::ffn_token_stats;
    use umbra_model::llama::TapOptions;
    let m = tiny(2);
    let prompt = [1u32, 4, 6, 8, 10, 12];
    let answer = vec![5u32, 7, 9, 11];
    let f = &extract_ids(
        &m,
        &ExtractConfig::default(),
        &prompt,
        std::slice::from_ref(&answer),
    )
    .unwrap()[0];
    let mut c = m.new_cache();
    let mut acts = vec![];
    let emb = m
        .embed(
            &Tensor::new(&prompt[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    m.forward(
        Input::Embeds(&emb),
        &mut c,
        Forward::hidden().taps(TapOptions::FFN, &mut |p, t| {
            if let TapPoint::Ffn(_) = p {
                acts.push(t.clone())
            }
        }),
    )
    .unwrap();
    let aemb = m
        .embed(
            &Tensor::new(&answer[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    m.forward(
        Input::Embeds(&aemb),
        &mut c,
        Forward::hidden().taps(TapOptions::FFN, &mut |p, t| {
            if let TapPoint::Ffn(_) = p {
                acts.push(t.clone())
            }
        }),
    )
    .unwrap();
    assert_eq!(acts.len(), 4);
    assert_eq!(acts[2].dims(), &[1, 4, m.config().intermediate_size]);
    // Layer 1, last answer token.
    let want = ffn_token_stats(&acts[3]).unwrap()[3];
    let got = &f["ffn.generation.last"][FFN_STATS..2 * FFN_STATS];
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() < 1e-5 * (1.0 + w.abs()),
            "{got:?} vs {want:?}"
        );
    }
    // Layer 0, understanding: mean over the 6 prompt tokens.
    let rows = ffn_token_stats(&acts[0]).unwrap();
    let mean0 = rows.iter().map(|r| r[0]).sum::<f32>() / 6.0;
    assert!((f["ffn.understanding.mean"][0] - mean0).abs() < 1e-5);
}

fn write_store(dir: &std::path::Path, m: &Llama, pairs: usize) -> Manifest {
    write_store_keys(dir, m, pairs, |_| true)
}

/// A feature folder holding only the keys `keep` accepts (e.g. an older folder without ffn).
fn write_store_keys(
    dir: &std::path::Path,
    m: &Llama,
    pairs: usize,
    keep: impl Fn(&str) -> bool,
) -> Manifest {
    let dims = ModelDims::of(m.config());
    let mut keys = key_shapes(dims.num_layers, dims.hidden_size, dims.num_heads);
    keys.retain(|k, _| keep(k));
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
            answers: None,
            questions: None,
        }],
        own: None,
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

fn small_eval() -> EvalConfig {
    EvalConfig {
        bootstrap: 50,
        mlp_hidden: vec![8],
        ..EvalConfig::default()
    }
}

#[test]
fn ffn_family_in_grid_select_and_probe_files() {
    let m = tiny(2);
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), &m, 40);
    let store = FeatureStore::open(dir.path()).unwrap();
    let x = store.load_layer("ffn.generation.mean", 1).unwrap();
    assert_eq!((x.rows, x.cols), (80, FFN_STATS));
    let (report, _) = run_grid(&store, small_eval(), &Progress::hidden()).unwrap();
    // Per layer and all layers, for every ffn key; and the combination with ffn.
    for (k, stage) in FFN_KEYS {
        let cells: Vec<_> = report
            .cells
            .iter()
            .filter(|c| c.family == "ffn" && c.name.starts_with(k))
            .collect();
        assert_eq!(cells.len(), 3, "{k}");
        assert!(cells.iter().all(|c| c.stage == stage.name()));
    }
    assert!(report
        .cells
        .iter()
        .any(|c| c.family == "combo" && c.name.ends_with("+lookback+logit+ffn")));
    // (A random tiny model carries no reliable signal; the SmolLM2 test checks the AUROC.)
    let gen = report
        .cells
        .iter()
        .find(|c| c.name == "ffn.generation.mean")
        .unwrap();
    assert!((0.0..=1.0).contains(&gen.test_auroc), "{gen:?}");
    let json = umbra_haluprobe::report::flat_json(&report);
    assert!(json.get("best_ffn_generation_mean").is_some(), "{json}");
    // --select with ffn alone and in a list; the probe file round-trips and scores features.
    let refs: Vec<FeatureRef> = "hidden:L1:generation.mean,lookback:generation,ffn:generation.mean"
        .split(',')
        .map(|s| FeatureRef::parse(s).unwrap())
        .collect();
    let (cell, probe) = train_selected(&store, small_eval(), refs).unwrap();
    assert_eq!(probe.net.input_dim(), 32 + 2 * 4 + 2 * FFN_STATS);
    assert!((0.0..=1.0).contains(&cell.test_auroc), "{cell:?}");
    let (_, probe) = train_selected(
        &store,
        small_eval(),
        vec![FeatureRef::parse("ffn:L0:query").unwrap()],
    )
    .unwrap();
    let p = dir.path().join("ffn.safetensors");
    probe.save(&p).unwrap();
    let scorer = Scorer::load(&p, m.config()).unwrap();
    let f = feats(&m);
    let s = scorer.score_features(&f[0]).unwrap();
    assert!((s.score - probe.score(&f[0]).unwrap()).abs() < 1e-6);
    assert_eq!(s.stage, umbra_haluprobe::features::Stage::Query);
    // Features without the ffn keys (another source) are refused with the key's name.
    let mut no_ffn = f[0].clone();
    no_ffn.remove("ffn.query.mean");
    let e = scorer.score_features(&no_ffn).unwrap_err().to_string();
    assert!(e.contains("ffn.query.mean"), "{e}");
    // An ffn probe cannot be moved under an obfuscation key.
    let e = umbra_haluprobe::obfuscated::check_transformable(
        &probe,
        m.config(),
        &umbra_aloepri::ObfuscationParams::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("FFN activation statistics"), "{e}");
}

#[test]
fn folders_without_the_ffn_family_still_load() {
    let m = tiny(2);
    let dir = tempfile::tempdir().unwrap();
    write_store_keys(dir.path(), &m, 40, |k| !k.starts_with("ffn."));
    let store = FeatureStore::open(dir.path()).unwrap();
    let (report, _) = run_grid(&store, small_eval(), &Progress::hidden()).unwrap();
    assert!(report.cells.iter().all(|c| c.family != "ffn"));
    assert!(report.cells.iter().any(|c| c.family == "lookback"));
    let e = train_selected(
        &store,
        small_eval(),
        vec![FeatureRef::parse("ffn:generation.mean").unwrap()],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("extracted before the ffn family"), "{e}");
    // A bad selector names the ffn forms.
    let e = FeatureRef::parse("ffn:L:x").unwrap_err().to_string();
    assert!(e.contains("ffn:generation.mean"), "{e}");
}

#[test]
fn transfer_matrix_covers_every_family_and_pair() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_store(a.path(), &tiny(2), 40);
    write_store(b.path(), &tiny(2), 30);
    let tasks = vec![
        ("a".to_string(), FeatureStore::open(a.path()).unwrap()),
        ("b".to_string(), FeatureStore::open(b.path()).unwrap()),
    ];
    let m = umbra_haluprobe::transfer::transfer_matrix(&tasks, &small_eval()).unwrap();
    assert_eq!(m.families.len(), umbra_haluprobe::transfer::FAMILIES.len());
    assert_eq!(m.cells.len(), m.families.len() * 4);
    // Synthetic answers differ in length and tokens: in-domain cells separate them (the
    // logit features hold the length itself).
    for f in &m.families {
        let c = m.cell(f, "a", "a").unwrap();
        assert!(c.test_auroc > 0.6 && c.ci_low <= c.test_auroc, "{f}: {c:?}");
        assert!(c.layer.is_some() == f.starts_with("hidden"), "{f}");
    }
    assert!(m.cell("logit", "a", "b").unwrap().test_auroc > 0.9);
    assert!(m.markdown().contains("| train \\ test | a | b |"));
    // One folder is not a matrix; folders of models of other sizes do not mix.
    assert!(umbra_haluprobe::transfer::transfer_matrix(&tasks[..1], &small_eval()).is_err());
    let c = tempfile::tempdir().unwrap();
    write_store(c.path(), &tiny(3), 30);
    let mixed = vec![
        ("a".to_string(), FeatureStore::open(a.path()).unwrap()),
        ("c".to_string(), FeatureStore::open(c.path()).unwrap()),
    ];
    let e = umbra_haluprobe::transfer::transfer_matrix(&mixed, &small_eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("other dimensions"), "{e}");
}
