//! Throughput on a random model of SmolLM2-135M's shape (F32, CPU). Ignored by default:
//! `cargo test --release -p umbra-model --test engine_bench -- --ignored --nocapture --test-threads=1`
//! (`BENCH_TOKENS=n` sets the decode length; `UMBRA_PAR_MIN_WORK` the multi-thread threshold.)
use candle_core::{Device, Tensor};
use std::time::Instant;
use umbra_model::generate::{generate, GenerateParams};
use umbra_model::llama::Llama;
use umbra_model::sampling::SamplingParams;
use umbra_model::testing;
use umbra_model::{Forward, Input};

#[test]
#[ignore]
fn engine_bench_smollm2_shape_decode() {
    let cfg = testing::smollm2_135m_config();
    let w = testing::random_weights(&cfg, 7);
    let model = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let prompt: Vec<u32> = (0..32u32).map(|i| (i * 997) % 49152).collect();
    let n: usize = std::env::var("BENCH_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    // Warm up.
    let params = GenerateParams {
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    generate(&model, &prompt, &params, |_| true).unwrap();
    let params = GenerateParams {
        max_tokens: n,
        ..params
    };
    let out = generate(&model, &prompt, &params, |_| true).unwrap();
    println!(
        "smollm2-shape F32: prefill {} tok in {:.3}s ({:.1} tok/s); decode {} tok in {:.3}s => {:.1} tok/s",
        prompt.len(),
        out.prefill_s,
        prompt.len() as f64 / out.prefill_s,
        out.ids.len() - 1,
        out.decode_s,
        out.decode_tok_per_s()
    );
}

#[test]
#[ignore]
fn engine_bench_matvec_layouts() {
    let dev = Device::Cpu;
    for (k, n) in [
        (576usize, 1536usize),
        (1536, 576),
        (576, 49152),
        (576, 3072),
    ] {
        let x = Tensor::randn(0f32, 1.0, (1, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(); // [out, in]
        let wt = w.t().unwrap().contiguous().unwrap(); // [in, out]
        let reps = 200;
        let t = Instant::now();
        for _ in 0..reps {
            x.matmul(&wt).unwrap();
        }
        let a = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            x.matmul(&w.t().unwrap()).unwrap();
        }
        let b = t.elapsed().as_secs_f64() / reps as f64;
        let gb = (k * n * 4) as f64 / 1e9;
        println!(
            "k={k} n={n}: [in,out] {:.1}us ({:.1} GB/s), [out,in].t() {:.1}us ({:.1} GB/s)",
            a * 1e6,
            gb / a,
            b * 1e6,
            gb / b
        );
    }
}

/// Per-token framework overhead: SmolLM2's depth (30 layers) with tiny matrices.
#[test]
#[ignore]
fn engine_bench_op_overhead() {
    let mut cfg = testing::tiny_config(64, 4, 2, 30, 64);
    cfg.max_position_embeddings = 4096;
    let w = testing::random_weights(&cfg, 7);
    let model = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let params = GenerateParams {
        max_tokens: 200,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    let out = generate(&model, &[1, 2, 3], &params, |_| true).unwrap();
    println!(
        "30 tiny layers: {:.1} us/token",
        1e6 / out.decode_tok_per_s()
    );
}

#[test]
#[ignore]
fn engine_bench_op_costs() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 1, 64), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (64, 192), &dev).unwrap();
    let g = Tensor::ones(64, candle_core::DType::F32, &dev).unwrap();
    let q = Tensor::randn(0f32, 1.0, (1, 4, 1, 16), &dev).unwrap();
    let cs = Tensor::randn(0f32, 1.0, (1, 8), &dev).unwrap();
    let big = Tensor::zeros((1, 2, 256, 16), candle_core::DType::F32, &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 2, 1, 16), &dev).unwrap();
    let att = Tensor::randn(0f32, 1.0, (1, 2, 2, 100), &dev).unwrap();
    let time = |name: &str, f: &dyn Fn()| {
        for _ in 0..100 {
            f();
        }
        let t = Instant::now();
        for _ in 0..2000 {
            f();
        }
        println!("{name}: {:.2} us", t.elapsed().as_secs_f64() / 2000.0 * 1e6);
    };
    time("matmul 1x64x192", &|| {
        x.reshape((1, 64)).unwrap().matmul(&w).unwrap();
    });
    time("rms_norm", &|| {
        candle_nn::ops::rms_norm(&x, &g, 1e-5).unwrap();
    });
    time("rope", &|| {
        candle_nn::rotary_emb::rope(&q, &cs, &cs).unwrap();
    });
    time("softmax", &|| {
        candle_nn::ops::softmax_last_dim(&att).unwrap();
    });
    time("slice_set", &|| {
        big.slice_set(&k, 2, 5).unwrap();
    });
    time("add", &|| {
        (&x + &x).unwrap();
    });
    time("silu", &|| {
        candle_nn::ops::silu(&x).unwrap();
    });
    time("narrow+contig b=1", &|| {
        q.narrow(1, 0, 2).unwrap().contiguous().unwrap();
    });
    time("attn matmul q@kT", &|| {
        let kk = big.narrow(2, 0, 100).unwrap();
        q.reshape((1, 2, 2, 16))
            .unwrap()
            .matmul(&kk.t().unwrap())
            .unwrap();
    });
    time("attn matmul att@v", &|| {
        let vv = big.narrow(2, 0, 100).unwrap();
        att.matmul(&vv).unwrap();
    });
}

/// Same-window baseline: candle-transformers' stock llama on the same random weights.
#[test]
#[ignore]
fn engine_bench_candle_stock_baseline() {
    use candle_transformers::models::llama as cl;
    let cfg = testing::smollm2_135m_config();
    let w = testing::random_weights(&cfg, 7);
    let ccfg = cl::Config {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_kv_heads(),
        use_flash_attn: false,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: cfg.max_position_embeddings,
        tie_word_embeddings: true,
    };
    let dev = Device::Cpu;
    let vb =
        candle_nn::VarBuilder::from_tensors(w.into_iter().collect(), candle_core::DType::F32, &dev);
    let m = cl::Llama::load(vb, &ccfg).unwrap();
    let mut cache = cl::Cache::new(true, candle_core::DType::F32, &ccfg, &dev).unwrap();
    let prompt: Vec<u32> = (0..32u32).map(|i| (i * 997) % 49152).collect();
    let n: usize = std::env::var("BENCH_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let l = m
        .forward(
            &Tensor::from_vec(prompt.clone(), (1, 32), &dev).unwrap(),
            0,
            &mut cache,
        )
        .unwrap();
    let mut tok = l.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
    let t = Instant::now();
    for i in 0..n - 1 {
        let l = m
            .forward(&Tensor::new(&[[tok]], &dev).unwrap(), 32 + i, &mut cache)
            .unwrap();
        tok = l.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "candle stock llama, same shape: decode {} tok in {s:.3}s => {:.1} tok/s",
        n - 1,
        (n - 1) as f64 / s
    );
}

/// Decode-step cost with B rows spread over groups of different lengths
/// ([`Llama::forward_groups`]), vs B = 1: the speed-up continuous batching can give.
#[test]
#[ignore]
fn engine_bench_decode_groups() {
    let cfg = testing::smollm2_135m_config();
    let w = testing::random_weights(&cfg, 7);
    let model = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let mut base = 0.0;
    for b in [1usize, 2, 4, 8, 16, 32] {
        // One group per row, prompt lengths 20..20+b (the serving worst case).
        let mut caches: Vec<_> = (0..b)
            .map(|i| {
                let mut c = model.new_cache_with_capacity(128);
                let p: Vec<u32> = (0..(20 + i) as u32)
                    .map(|j| (j * 991 + 7) % 49152)
                    .collect();
                model
                    .forward(
                        Input::Ids(
                            &Tensor::from_vec(p.clone(), (1, p.len()), &Device::Cpu).unwrap(),
                        ),
                        &mut c,
                        Forward::last_logits(),
                    )
                    .unwrap();
                c
            })
            .collect();
        let ids: Vec<Tensor> = (0..b as u32)
            .map(|i| Tensor::new(&[[i * 17 + 3]], &Device::Cpu).unwrap())
            .collect();
        let steps = 16;
        let t = Instant::now();
        for _ in 0..steps {
            let mut groups: Vec<_> = ids.iter().map(Input::Ids).zip(caches.iter_mut()).collect();
            model
                .forward_groups(&mut groups, Forward::last_logits())
                .unwrap();
        }
        let per_step = t.elapsed().as_secs_f64() / steps as f64;
        let tok_s = b as f64 / per_step;
        if b == 1 {
            base = tok_s;
        }
        println!(
            "B={b:>2}: {:.1} ms/step, {:.1} tok/s, {:.2}x of B=1",
            per_step * 1e3,
            tok_s,
            tok_s / base
        );
    }
}
