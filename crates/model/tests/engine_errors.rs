//! Bad input and bad checkpoints give typed errors, never panics.
use candle_core::{DType, Device, Tensor};
use umbra_model::generate::{generate, generate_batch, GenerateParams};
use umbra_model::llama::Llama;
use umbra_model::sampling::SamplingParams;
use umbra_model::testing;
use umbra_model::{Forward, Input};
use umbra_model::{LlamaConfig, ModelError};

fn cfg() -> LlamaConfig {
    testing::tiny_config(32, 4, 2, 2, 40)
}

fn model() -> Llama {
    Llama::new(&cfg(), &testing::random_weights(&cfg(), 1), &Device::Cpu).unwrap()
}

#[test]
fn engine_err_token_id_out_of_vocab() {
    let m = model();
    let ids = Tensor::new(&[[1u32, 40]], &Device::Cpu).unwrap();
    let e = m
        .forward(Input::Ids(&ids), &mut m.new_cache(), Forward::logits())
        .unwrap_err();
    assert!(
        matches!(e, ModelError::Input(ref s) if s.contains("40")),
        "{e}"
    );
    let p = GenerateParams {
        max_tokens: 3,
        ..Default::default()
    };
    assert!(matches!(
        generate(&m, &[3, 99], &p, |_| true),
        Err(ModelError::Input(_))
    ));
}

#[test]
fn engine_err_bad_id_tensor_shape_or_dtype() {
    let m = model();
    let mut c = m.new_cache();
    let one_d = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward(Input::Ids(&one_d), &mut c, Forward::logits()),
        Err(ModelError::Input(_))
    ));
    let f = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward(Input::Ids(&f), &mut c, Forward::logits()),
        Err(ModelError::Input(_))
    ));
    let empty = Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward(Input::Ids(&empty), &mut c, Forward::logits()),
        Err(ModelError::Input(_))
    ));
    let wrong_d = Tensor::zeros((1, 2, 31), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward(Input::Embeds(&wrong_d), &mut c, Forward::hidden()),
        Err(ModelError::Input(_))
    ));
    assert!(c.is_empty());
}

#[test]
fn engine_err_missing_tensor() {
    for name in [
        "model.layers.1.mlp.up_proj.weight",
        "lm_head.weight",
        "model.norm.weight",
    ] {
        let mut w = testing::random_weights(&cfg(), 1);
        w.remove(name);
        match Llama::new(&cfg(), &w, &Device::Cpu) {
            Err(ModelError::MissingTensor(n)) => assert_eq!(n, name),
            other => panic!(
                "{name}: expected MissingTensor, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    // Qwen2 needs q/k/v biases.
    let mut q = cfg();
    q.model_type = "qwen2".into();
    let mut w = testing::random_weights(&q, 1);
    w.remove("model.layers.0.self_attn.k_proj.bias");
    assert!(matches!(
        Llama::new(&q, &w, &Device::Cpu),
        Err(ModelError::MissingTensor(_))
    ));
}

#[test]
fn engine_err_wrong_shape() {
    let mut w = testing::random_weights(&cfg(), 1);
    w.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        matches!(Llama::new(&cfg(), &w, &Device::Cpu), Err(ModelError::Mismatch(ref s)) if s.contains("k_proj"))
    );
    // Weights for head_dim 8 do not fit a config that says head_dim 10.
    let mut c = cfg();
    c.head_dim = Some(10);
    let w = testing::random_weights(&cfg(), 1);
    assert!(matches!(
        Llama::new(&c, &w, &Device::Cpu),
        Err(ModelError::Mismatch(_))
    ));
}

#[test]
fn engine_err_unsupported_rope_scaling() {
    let mut c = cfg();
    c.rope_scaling = Some(serde_json::json!({"type": "yarn", "factor": 4.0}));
    let w = testing::random_weights(&c, 1);
    let e = Llama::new(&c, &w, &Device::Cpu).unwrap_err();
    assert!(
        matches!(e, ModelError::Unsupported(ref s) if s.contains("yarn")),
        "{e}"
    );
    c.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0}));
    assert!(matches!(
        Llama::new(&c, &w, &Device::Cpu),
        Err(ModelError::Unsupported(_))
    ));
    c.rope_scaling = Some(serde_json::json!({"rope_type": "default"}));
    Llama::new(&c, &w, &Device::Cpu).unwrap();
}

#[test]
fn engine_err_context_overflow() {
    let mut c = cfg();
    c.max_position_embeddings = 8;
    let m = Llama::new(&c, &testing::random_weights(&c, 1), &Device::Cpu).unwrap();
    let mut cache = m.new_cache();
    m.forward(
        Input::Ids(&Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap()),
        &mut cache,
        Forward::logits(),
    )
    .unwrap();
    let e = m
        .forward(
            Input::Ids(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap()),
            &mut cache,
            Forward::logits(),
        )
        .unwrap_err();
    assert!(
        matches!(e, ModelError::Input(ref s) if s.contains("max_position_embeddings")),
        "{e}"
    );
    assert_eq!(cache.len(), 6, "a rejected call must not advance the cache");
    let p = GenerateParams {
        max_tokens: 5,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    let e = generate(&m, &[1, 2, 3, 4], &p, |_| true).unwrap_err();
    assert!(
        matches!(e, ModelError::Input(ref s) if s.contains("max_position_embeddings")),
        "{e}"
    );
    let p = GenerateParams { max_tokens: 4, ..p };
    assert_eq!(
        generate(&m, &[1, 2, 3, 4], &p, |_| true).unwrap().ids.len(),
        4
    );
}

#[test]
fn engine_err_cache_mismatch_and_batch_inputs() {
    let m = model();
    let mut c = m.new_cache();
    m.forward(
        Input::Ids(&Tensor::new(&[[1u32, 2], [3, 4]], &Device::Cpu).unwrap()),
        &mut c,
        Forward::logits(),
    )
    .unwrap();
    assert!(matches!(
        m.forward(
            Input::Ids(&Tensor::new(&[[1u32]], &Device::Cpu).unwrap()),
            &mut c,
            Forward::logits()
        ),
        Err(ModelError::Input(_))
    ));
    let mut other = umbra_model::llama::KvCache::new(5);
    assert!(matches!(
        m.forward(
            Input::Ids(&Tensor::new(&[[1u32]], &Device::Cpu).unwrap()),
            &mut other,
            Forward::logits()
        ),
        Err(ModelError::Input(_))
    ));
    let p = GenerateParams {
        max_tokens: 2,
        ..Default::default()
    };
    let r = generate_batch(
        &m,
        &[&[1, 2], &[1, 2, 3]],
        &[p.clone(), p.clone()],
        |_, _| true,
    );
    assert!(matches!(r, Err(ModelError::Input(_))));
    let r = generate_batch(&m, &[&[1, 2], &[3, 4]], std::slice::from_ref(&p), |_, _| {
        true
    });
    assert!(matches!(r, Err(ModelError::Input(_))));
    assert!(matches!(
        generate(&m, &[], &p, |_| true),
        Err(ModelError::Input(_))
    ));
    let bad = GenerateParams {
        sampling: SamplingParams {
            temperature: -1.0,
            ..Default::default()
        },
        ..p
    };
    assert!(matches!(
        generate(&m, &[1], &bad, |_| true),
        Err(ModelError::Input(_))
    ));
}
