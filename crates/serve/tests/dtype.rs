//! `umbra serve --dtype`: the server runs the quantized engine on a GGUF (issue 18). On the
//! shipped SmolLM2-135M GGUF (CI fetches it) requantized to Q8_0 at load, the served greedy ids
//! equal a local greedy loop over the same quantized model, and the model reports the type it
//! holds; F32 and `auto` on an HF folder stay the path the server loads itself.
mod common;

use candle_core::{Device, Tensor};
use common::*;
use serde_json::json;
use umbra_assets::{Asset, Cache};
use umbra_model::llama::{Forward, Input, Llama};
use umbra_model::load::{load_model, WeightDtype};
use umbra_model::quant::QuantType;
use umbra_serve::server::{start, ModelSource, ServeConfig};

/// `n` greedy ids after `prompt`, one forward pass per token.
fn greedy(m: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = m.new_cache_with_capacity(prompt.len() + n);
    let mut ids = prompt.to_vec();
    let mut out = vec![];
    for _ in 0..n {
        let x = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let l = m
            .forward(Input::Ids(&x), &mut cache, Forward::last_logits())
            .unwrap();
        let row = l.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let next = umbra_model::sampling::argmax(&row);
        out.push(next);
        ids = vec![next];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q8_0_server_answers_as_the_local_quantized_model() {
    let gguf = Cache::from_env()
        .unwrap()
        .require(Asset::SmolLM2Gguf)
        .unwrap_or_else(|e| panic!("{e}"));
    let q8 = WeightDtype::Quant(QuantType::Q8_0);
    let local = load_model(&gguf, q8, &Device::Cpu).unwrap();
    assert!(local.dtype.starts_with("q8_0"), "{}", local.dtype);
    let prompt: Vec<u32> = local
        .tokenizer
        .as_ref()
        .unwrap()
        .encode("The capital of France is", false)
        .unwrap();
    let want = greedy(&local.model, &prompt, 12);

    let source = ModelSource::with_dtype(&gguf, q8).unwrap();
    assert!(matches!(source, ModelSource::Loaded { .. }));
    let srv = start(ServeConfig::new(source, loopback())).await.unwrap();
    let (status, body) = post_text(
        &format!("{}/v1/completions", srv.url()),
        &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let got = ids_of(&v);
    assert_eq!(got, want[..got.len()], "served ids = local Q8_0 greedy ids");
    assert!(!got.is_empty());
    srv.stop().await;
}

#[test]
fn f32_and_hf_auto_stay_paths_and_bad_dtypes_are_refused() {
    let dir = smollm2();
    assert!(matches!(
        ModelSource::with_dtype(&dir, WeightDtype::Auto).unwrap(),
        ModelSource::Path(_)
    ));
    assert!(matches!(
        ModelSource::with_dtype(&dir, WeightDtype::F32).unwrap(),
        ModelSource::Path(_)
    ));
    let e = WeightDtype::parse("q3_x").unwrap_err().to_string();
    assert!(e.contains("--dtype q3_x"), "{e}");
}
