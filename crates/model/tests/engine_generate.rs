//! Generation: greedy output equals an uncached argmax loop; stops, callbacks, batching.
use candle_core::{Device, Tensor};
use umbra_model::generate::{generate, generate_batch, FinishReason, GenerateParams};
use umbra_model::llama::Llama;
use umbra_model::sampling::{argmax, SamplingParams};
use umbra_model::testing;
use umbra_model::{Forward, Input};

fn model() -> Llama {
    let c = testing::tiny_config(48, 6, 2, 2, 64);
    Llama::new(&c, &testing::random_weights(&c, 3), &Device::Cpu).unwrap()
}

/// Greedy without a cache: re-run the whole sequence each step.
fn slow_greedy(m: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut s = prompt.to_vec();
    for _ in 0..n {
        let ids = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap();
        let l: Vec<Vec<f32>> = m
            .forward(Input::Ids(&ids), &mut m.new_cache(), Forward::logits())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        s.push(argmax(l.last().unwrap()));
    }
    s[prompt.len()..].to_vec()
}

#[test]
fn engine_gen_greedy_matches_uncached_loop() {
    let m = model();
    let prompt = [5u32, 9, 2, 33];
    let want = slow_greedy(&m, &prompt, 12);
    let p = GenerateParams {
        max_tokens: 12,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    let mut streamed = vec![];
    let out = generate(&m, &prompt, &p, |t| {
        streamed.push(t);
        true
    })
    .unwrap();
    assert_eq!(out.ids, want);
    assert_eq!(streamed, want);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert!(out.prefill_s > 0.0 && out.decode_s > 0.0);
}

#[test]
fn engine_gen_stop_id_and_callback_stop() {
    let m = model();
    let prompt = [1u32, 2, 3];
    let free = slow_greedy(&m, &prompt, 8);
    let stop = free[3];
    let first = free.iter().position(|&t| t == stop).unwrap();
    let p = GenerateParams {
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![stop],
    };
    let out = generate(&m, &prompt, &p, |_| true).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.ids, free[..first].to_vec(), "stop id is excluded");
    let p = GenerateParams {
        stop_ids: vec![],
        ..p
    };
    let mut n = 0;
    let out = generate(&m, &prompt, &p, |_| {
        n += 1;
        n < 2
    })
    .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.ids, free[..2].to_vec());
    let p = GenerateParams { max_tokens: 0, ..p };
    assert!(generate(&m, &prompt, &p, |_| true).unwrap().ids.is_empty());
}

#[test]
fn engine_gen_sampled_is_reproducible() {
    let m = model();
    let p = GenerateParams {
        max_tokens: 10,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: Some(20),
            top_p: Some(0.9),
            seed: 5,
        },
        stop_ids: vec![],
    };
    let a = generate(&m, &[4, 4, 4], &p, |_| true).unwrap().ids;
    assert_eq!(a, generate(&m, &[4, 4, 4], &p, |_| true).unwrap().ids);
    assert_eq!(a.len(), 10);
}

#[test]
fn engine_gen_batch_equals_individual_runs() {
    let m = model();
    let prompts: [&[u32]; 3] = [&[1, 2, 3, 4], &[9, 8, 7, 6], &[1, 2, 3, 5]];
    let params = [
        GenerateParams {
            max_tokens: 6,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
        },
        GenerateParams {
            max_tokens: 9,
            sampling: SamplingParams::with_temperature(0.8, 77),
            stop_ids: vec![],
        },
        GenerateParams {
            max_tokens: 7,
            sampling: SamplingParams {
                temperature: 1.2,
                top_k: Some(5),
                top_p: None,
                seed: 3,
            },
            stop_ids: vec![],
        },
    ];
    let mut seen = vec![vec![]; 3];
    let outs = generate_batch(&m, &prompts, &params, |i, t| {
        seen[i].push(t);
        true
    })
    .unwrap();
    for i in 0..3 {
        let single = generate(&m, prompts[i], &params[i], |_| true).unwrap();
        assert_eq!(outs[i].ids, single.ids, "sequence {i}");
        assert_eq!(outs[i].ids.len(), params[i].max_tokens);
        assert_eq!(seen[i], single.ids);
    }
    // A stop id in one sequence ends only that one.
    let stop = outs[1].ids[2];
    let mut p2 = params.clone();
    p2[1].stop_ids = vec![stop];
    let o2 = generate_batch(&m, &prompts, &p2, |_, _| true).unwrap();
    let cut = outs[1].ids.iter().position(|&t| t == stop).unwrap();
    assert_eq!(o2[1].ids, outs[1].ids[..cut].to_vec());
    assert_eq!(o2[1].finish_reason, FinishReason::Stop);
    assert_eq!(o2[0].ids, outs[0].ids);
    assert_eq!(o2[2].ids, outs[2].ids);
}
