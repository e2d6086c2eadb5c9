use super::*;
use crate::taps::{TapOptions, TapPoint};
use crate::testing;
use crate::weights::Weights;

fn tiny() -> (LlamaConfig, Weights, Llama) {
    let cfg = testing::tiny_config(32, 4, 2, 3, 64);
    let w = testing::random_weights(&cfg, 11);
    let m = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    (cfg, w, m)
}

/// Prefill (t = 5) and a one-position continuation with every tap option: outputs equal
/// the plain path, taps come in order, and each `Ffn(i)` is the activation that turned the
/// block's post-attention residual into `Layer(i)`.
#[test]
fn ffn_tap_is_opt_in_and_is_the_down_proj_input() {
    let (cfg, w, m) = tiny();
    let ffn = cfg.intermediate_size;
    let emb = m
        .embed(&Tensor::new(&[[1u32, 5, 9, 3, 7]], &Device::Cpu).unwrap())
        .unwrap();
    let one = m
        .embed(&Tensor::new(&[[2u32]], &Device::Cpu).unwrap())
        .unwrap();
    let mut c = m.new_cache();
    let plain = m
        .forward(Input::Embeds(&emb), &mut c, Forward::hidden())
        .unwrap();
    let plain1 = m
        .forward(Input::Embeds(&one), &mut c, Forward::hidden())
        .unwrap();
    for opts in [
        TapOptions::NONE,
        TapOptions::FFN,
        TapOptions::ATTENTION,
        TapOptions::ALL,
    ] {
        let mut c = m.new_cache();
        for (x, want) in [(&emb, &plain), (&one, &plain1)] {
            let t = x.dim(1).unwrap();
            let mut points = vec![];
            let mut acts = vec![];
            let mut layers = vec![];
            let out = m
                .forward(
                    Input::Embeds(x),
                    &mut c,
                    Forward::hidden().taps(opts, &mut |p, v| {
                        points.push(p);
                        match p {
                            TapPoint::Ffn(_) => acts.push(v.clone()),
                            TapPoint::Layer(_) => layers.push(v.clone()),
                            _ => {}
                        }
                    }),
                )
                .unwrap();
            assert!(testing::max_abs_diff(&out, want) < 1e-5, "{opts:?}");
            let mut order = vec![TapPoint::Embeddings];
            for i in 0..3 {
                if opts.attention {
                    order.push(TapPoint::Attention(i));
                }
                if opts.ffn {
                    order.push(TapPoint::Ffn(i));
                }
                order.push(TapPoint::Layer(i));
            }
            assert_eq!(points, order, "{opts:?}");
            if !opts.ffn {
                assert!(acts.is_empty());
                continue;
            }
            for (i, (a, out_i)) in acts.iter().zip(&layers).enumerate() {
                assert_eq!(a.dims(), &[1, t, ffn]);
                let p = format!("model.layers.{i}");
                let wt = |n: &str| w.get(&format!("{p}.{n}")).unwrap().clone();
                // mid = Layer(i) - down_proj(a) is the residual after attention; the SwiGLU
                // of its post-attention norm, computed here from the HF weights, must give
                // back `a` (and so `mid + down_proj(a)` reproduces the block output).
                let down = a
                    .squeeze(0)
                    .unwrap()
                    .matmul(&wt("mlp.down_proj.weight").t().unwrap())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let mid = (out_i - &down).unwrap();
                let h = candle_nn::ops::rms_norm(
                    &mid.contiguous().unwrap(),
                    &wt("post_attention_layernorm.weight"),
                    cfg.rms_norm_eps as f32,
                )
                .unwrap();
                let proj = |n: &str| {
                    h.squeeze(0)
                        .unwrap()
                        .matmul(&wt(n).t().unwrap())
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap()
                };
                let want_a = (candle_nn::ops::silu(&proj("mlp.gate_proj.weight")).unwrap()
                    * proj("mlp.up_proj.weight"))
                .unwrap();
                let err = testing::max_abs_diff(a, &want_a);
                assert!(err < 1e-4, "layer {i} t {t} {opts:?}: {err}");
            }
        }
    }
}
