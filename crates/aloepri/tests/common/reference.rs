//! An independent Llama forward pass written from the HF `LlamaForCausalLM` spec with plain
//! per-position loops over `Vec<f32>` (no KV cache, no batching, no candle kernels): it shares no
//! code with `umbra-model`'s engine, so an obfuscated checkpoint that runs here is a standard one.
#![allow(dead_code)]
use candle_core::Tensor;
use std::collections::BTreeMap;
use umbra_model::LlamaConfig;

struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Mat {
    fn from(t: &Tensor) -> Mat {
        let (rows, cols) = t.dims2().unwrap();
        Mat {
            rows,
            cols,
            data: t.flatten_all().unwrap().to_vec1().unwrap(),
        }
    }
    /// `W x` for HF `[out, in]` weights.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.cols);
        (0..self.rows)
            .map(|r| {
                self.data[r * self.cols..(r + 1) * self.cols]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>() as f32
            })
            .collect()
    }
}

fn vec1(w: &BTreeMap<String, Tensor>, n: &str) -> Vec<f32> {
    w[n].to_vec1().unwrap()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, g)| ((*v as f64) * inv) as f32 * g)
        .collect()
}

fn rope(x: &mut [f32], pos: usize, theta: f64) {
    let hd = x.len();
    let half = hd / 2;
    for j in 0..half {
        let inv_freq = 1.0 / theta.powf(2.0 * j as f64 / hd as f64);
        let (s, c) = (pos as f64 * inv_freq).sin_cos();
        let (a, b) = (x[j] as f64, x[j + half] as f64);
        x[j] = (a * c - b * s) as f32;
        x[j + half] = (b * c + a * s) as f32;
    }
}

/// Logits `[t][V]` for one sequence.
pub fn forward(cfg: &LlamaConfig, w: &BTreeMap<String, Tensor>, ids: &[u32]) -> Vec<Vec<f32>> {
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let emb = Mat::from(&w["model.embed_tokens.weight"]);
    let mut xs: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| emb.data[i as usize * emb.cols..(i as usize + 1) * emb.cols].to_vec())
        .collect();
    let t = ids.len();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let get = |n: &str| Mat::from(&w[&format!("{p}.{n}.weight")]);
        let bias = |n: &str| {
            w.get(&format!("{p}.{n}.bias"))
                .map(|b| b.to_vec1::<f32>().unwrap())
        };
        let (wq, wk, wv, wo) = (
            get("self_attn.q_proj"),
            get("self_attn.k_proj"),
            get("self_attn.v_proj"),
            get("self_attn.o_proj"),
        );
        let in_norm = vec1(w, &format!("{p}.input_layernorm.weight"));
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, x) in xs.iter().enumerate() {
            let h = rms_norm(x, &in_norm, cfg.rms_norm_eps);
            let add = |mut y: Vec<f32>, b: Option<Vec<f32>>| {
                if let Some(b) = b {
                    y.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
                y
            };
            let mut q = add(wq.apply(&h), bias("self_attn.q_proj"));
            let mut k = add(wk.apply(&h), bias("self_attn.k_proj"));
            let v = add(wv.apply(&h), bias("self_attn.v_proj"));
            for hh in 0..nh {
                rope(&mut q[hh * hd..(hh + 1) * hd], pos, cfg.rope_theta);
            }
            for hh in 0..nkv {
                rope(&mut k[hh * hd..(hh + 1) * hd], pos, cfg.rope_theta);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let groups = nh / nkv;
        for i in 0..t {
            let mut att = vec![0f32; nh * hd];
            for hh in 0..nh {
                let g = hh / groups;
                let q = &qs[i][hh * hd..(hh + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &ks[j][g * hd..(g + 1) * hd];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for a in 0..hd {
                        att[hh * hd + a] += (ej / z * vs[j][g * hd + a] as f64) as f32;
                    }
                }
            }
            let mut o = wo.apply(&att);
            if let Some(b) = bias("self_attn.o_proj") {
                o.iter_mut().zip(b).for_each(|(a, b)| *a += b);
            }
            xs[i].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        let post = vec1(w, &format!("{p}.post_attention_layernorm.weight"));
        let (wg, wu, wd) = (
            get("mlp.gate_proj"),
            get("mlp.up_proj"),
            get("mlp.down_proj"),
        );
        for x in xs.iter_mut() {
            let h = rms_norm(x, &post, cfg.rms_norm_eps);
            let g = wg.apply(&h);
            let u = wu.apply(&h);
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| (*g as f64 / (1.0 + (-*g as f64).exp())) as f32 * u)
                .collect();
            let y = wd.apply(&act);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
    }
    let norm = vec1(w, "model.norm.weight");
    let head = if cfg.tie_word_embeddings {
        emb
    } else {
        Mat::from(&w["lm_head.weight"])
    };
    xs.iter()
        .map(|x| head.apply(&rms_norm(x, &norm, cfg.rms_norm_eps)))
        .collect()
}
