//! The quantized engine on real models: Qwen2.5-Coder-0.5B (qwen2: unpermuted q/k, q/k/v
//! biases, untied head; Q5_0/Q8_0/Q6_K/Q4_K) answers " Paris" in F32 and with its own blocks;
//! SmolLM2's quantized paths agree with its F32 path; batching and taps run on the quantized
//! backend like on F32 (same forward pass).
//!
//! Needs `umbra fetch smollm2` and `umbra fetch qwen2.5-coder-0.5b`.
use candle_core::{Device, Tensor};
use std::path::PathBuf;
use umbra_assets::{Asset, Cache};
use umbra_model::generate::{generate, generate_batch, GenerateParams};
use umbra_model::load::{load_model, LoadedModel, WeightDtype};
use umbra_model::quant::QuantType;
use umbra_model::sampling::{argmax, SamplingParams};
use umbra_model::tokenizer::ChatMessage;
use umbra_model::{Forward, Input, TapPoint};

fn asset(a: Asset) -> PathBuf {
    Cache::from_env()
        .and_then(|c| c.require(a))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn answer(m: &LoadedModel, question: &str, n: usize) -> String {
    let tok = m.tokenizer.as_ref().expect("tokenizer");
    let text = tok
        .apply_chat_template(&[ChatMessage::user(question)], true)
        .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let p = GenerateParams {
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop_ids: m.eos_token_ids.clone(),
    };
    let out = generate(&m.model, &ids, &p, |_| true).unwrap();
    tok.decode(&out.ids, true).unwrap()
}

#[test]
fn qwen_0_5b_answers_paris_in_f32_and_quantized() {
    let path = asset(Asset::Qwen05b);
    let q = load_model(&path, WeightDtype::Auto, &Device::Cpu).unwrap();
    assert!(
        q.dtype.contains("q5_0") && q.dtype.contains("q6_k"),
        "{}",
        q.dtype
    );
    assert_eq!(q.config.model_type, "qwen2");
    assert!(
        !q.config.tie_word_embeddings,
        "the file carries output.weight"
    );
    let a = answer(&q, "What is the capital of France?", 12);
    assert!(a.contains("Paris"), "quantized: {a:?}");
    // Quantized weights take about the file's size, not F32's four bytes a weight.
    assert!(q.weight_bytes < 520 << 20, "{}", q.weight_bytes);
    drop(q);
    let f = load_model(&path, WeightDtype::F32, &Device::Cpu).unwrap();
    let a = answer(&f, "What is the capital of France?", 12);
    assert!(a.contains("Paris"), "f32: {a:?}");
}

/// Top-1 agreement with the F32 path over the positions of a few real sentences.
fn agreement(a: &LoadedModel, b: &LoadedModel, texts: &[&str]) -> f64 {
    let tok = a.tokenizer.as_ref().unwrap();
    let (mut same, mut n) = (0usize, 0usize);
    for t in texts {
        let ids = tok.encode(t, false).unwrap();
        let x = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let run = |m: &LoadedModel| {
            let mut c = m.model.new_cache();
            m.model
                .forward(Input::Ids(&x), &mut c, Forward::logits())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        for (ra, rb) in run(a).iter().zip(run(b)) {
            same += usize::from(argmax(ra) == argmax(&rb));
            n += 1;
        }
    }
    same as f64 / n as f64
}

const TEXTS: [&str; 3] = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the engineer Gustave Eiffel, whose company designed and built the tower.",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize foods from carbon dioxide and water.",
    "The Great Wall of China is a series of fortifications that were built across the historical northern borders of ancient Chinese states.",
];

#[test]
fn smollm2_quantized_paths_agree_with_f32() {
    let path = asset(Asset::SmolLM2Gguf);
    let f = load_model(&path, WeightDtype::F32, &Device::Cpu).unwrap();
    let own = load_model(&path, WeightDtype::Auto, &Device::Cpu).unwrap();
    assert_eq!(own.dtype, "q4_1 x210, q8_0 x1");
    let q8 = load_model(&path, WeightDtype::Quant(QuantType::Q8_0), &Device::Cpu).unwrap();
    assert_eq!(q8.dtype, "q8_0 x211");
    let a_own = agreement(&f, &own, &TEXTS);
    let a_q8 = agreement(&f, &q8, &TEXTS);
    // The file's own Q4_1 blocks are the F32 weights exactly: only the 8-bit activations differ.
    assert!(a_own >= 0.95, "q4_1 (own blocks) top-1 agreement {a_own}");
    assert!(a_q8 >= 0.95, "q8_0 top-1 agreement {a_q8}");
}

#[test]
fn quantized_batching_and_taps_match_single_sequences() {
    let path = asset(Asset::SmolLM2Gguf);
    let m = load_model(&path, WeightDtype::Auto, &Device::Cpu).unwrap();
    let tok = m.tokenizer.as_ref().unwrap();
    let p1 = tok.encode("The capital of France is", false).unwrap();
    let p2 = tok.encode("The capital of Japan is", false).unwrap();
    assert_eq!(p1.len(), p2.len());
    let params = GenerateParams {
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    let single: Vec<Vec<u32>> = [&p1, &p2]
        .iter()
        .map(|p| generate(&m.model, p, &params, |_| true).unwrap().ids)
        .collect();
    let batch = generate_batch(
        &m.model,
        &[&p1, &p2],
        &[params.clone(), params.clone()],
        |_, _| true,
    )
    .unwrap();
    assert_eq!(batch[0].ids, single[0]);
    assert_eq!(batch[1].ids, single[1]);
    // Taps fire on the quantized backend: every layer, [1, t, d].
    let x = Tensor::from_slice(&p1, (1, p1.len()), &Device::Cpu).unwrap();
    let mut layers = 0;
    let mut tap = |pt: TapPoint, t: &Tensor| {
        if let TapPoint::Layer(_) = pt {
            assert_eq!(t.dims(), &[1, p1.len(), 576]);
            layers += 1;
        }
    };
    m.model
        .forward(
            Input::Ids(&x),
            &mut m.model.new_cache(),
            Forward::last_logits().tap(&mut tap),
        )
        .unwrap();
    assert_eq!(layers, 30);
}
