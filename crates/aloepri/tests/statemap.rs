//! `StateMaps::regenerate`: the replayed maps match what the compiler did, checked on tiny
//! random models through the engine's taps (residual stream, attention heads) and on the
//! compiled FFN weights; a key for another vocabulary is refused.
use candle_core::{Device, Tensor};
use umbra_aloepri::compiler::compile_in_memory;
use umbra_aloepri::statemap::StateMaps;
use umbra_aloepri::{ClientKey, ObfuscationParams};
use umbra_model::llama::{Llama, TapPoint};
use umbra_model::testing::{random_weights, tiny_config};
use umbra_model::{Forward, Input, TapOptions};
use umbra_model::{LlamaConfig, Weights};

const SPECIALS: [u32; 2] = [0, 1];

fn compile(
    cfg: &LlamaConfig,
    w: &Weights,
    params: ObfuscationParams,
    seed: u64,
) -> (LlamaConfig, Weights, ClientKey) {
    let (out, c) = compile_in_memory(cfg, w.clone(), &SPECIALS, &params, seed).unwrap();
    (c.config, out, c.key)
}

/// Per layer: residual rows `[t][d]` and attention probabilities `[H][t][t]`.
type Taps = (Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<Vec<f32>>>>);

fn taps(cfg: &LlamaConfig, w: &Weights, ids: &[u32]) -> Taps {
    let m = Llama::new(cfg, w, &Device::Cpu).unwrap();
    let emb = m
        .embed(
            &Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let mut c = m.new_cache();
    let (mut layers, mut attn) = (vec![], vec![]);
    m.forward(
        Input::Embeds(&emb),
        &mut c,
        Forward::hidden().taps(TapOptions::ATTENTION, &mut |p, t| match p {
            TapPoint::Layer(_) => layers.push(t.squeeze(0).unwrap().to_vec2::<f32>().unwrap()),
            TapPoint::Attention(_) => attn.push(t.squeeze(0).unwrap().to_vec3::<f32>().unwrap()),
            _ => {}
        }),
    )
    .unwrap();
    (layers, attn)
}

#[test]
fn exact_mode_states_map_back_through_q_and_heads_are_permuted() {
    let ids: Vec<u32> = vec![0, 5, 17, 42, 3, 96, 11];
    for (cfg, h) in [
        (tiny_config(32, 4, 2, 3, 97), 8usize),
        (tiny_config(48, 6, 3, 2, 97), 0),
    ] {
        let w = random_weights(&cfg, 2);
        let (ocfg, ow, key) = compile(&cfg, &w, ObfuscationParams::exact(h), 11);
        let maps = StateMaps::regenerate(&cfg, &SPECIALS, &key).unwrap();
        assert_eq!((maps.d, maps.d_prime), (cfg.hidden_size, ocfg.hidden_size));
        let (pl, pa) = taps(&cfg, &w, &ids);
        let tau = key.permutation().unwrap();
        let (ol, oa) = taps(&ocfg, &ow, &tau.apply(&ids).unwrap());
        let mut worst = 0f32;
        for (p_rows, o_rows) in pl.iter().zip(&ol) {
            for (p, o) in p_rows.iter().zip(o_rows) {
                let back = maps.to_plain(o).unwrap();
                let scale = p.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (a, b) in p.iter().zip(&back) {
                    worst = worst.max((a - b).abs() / scale);
                }
            }
        }
        assert!(worst < 1e-4, "h={h}: x~ Q differs from x by {worst}");
        let mut moved = 0;
        for (l, (p, o)) in pa.iter().zip(&oa).enumerate() {
            for (i, head) in p.iter().enumerate() {
                let j = maps.head_perm[l][i];
                moved += (j != i) as usize;
                for (rp, ro) in head.iter().zip(&o[j]) {
                    for (a, b) in rp.iter().zip(ro) {
                        assert!((a - b).abs() < 1e-4, "layer {l} head {i}->{j}: {a} vs {b}");
                    }
                }
            }
        }
        assert!(moved > 0, "head permutations should move some heads");
    }
}

#[test]
fn ffn_map_and_q_match_the_compiled_down_projection() {
    // Row convention: Wdown~[t] = Wdown[perm[t]] P / scale[perm[t]], so Q maps it back.
    let cfg = tiny_config(32, 4, 2, 2, 97);
    let w = random_weights(&cfg, 4);
    for params in [
        ObfuscationParams::exact(4),
        ObfuscationParams {
            h: 8,
            ..ObfuscationParams::paper()
        },
    ] {
        let (_, ow, key) = compile(&cfg, &w, params, 5);
        let maps = StateMaps::regenerate(&cfg, &SPECIALS, &key).unwrap();
        for (l, f) in maps.ffn.iter().enumerate() {
            let name = format!("model.layers.{l}.mlp.down_proj.weight");
            let plain = w[&name].to_vec2::<f32>().unwrap(); // [d, ffn]
            let obf = ow[&name].t().unwrap().to_vec2::<f32>().unwrap(); // [ffn, d']
            for (t, row) in obf.iter().enumerate() {
                let back = maps.to_plain(row).unwrap();
                let old = f.perm[t] as usize;
                for (k, b) in back.iter().enumerate() {
                    let want = plain[k][old];
                    let got = b * f.scale[old];
                    assert!(
                        (want - got).abs() < 1e-4 * (1.0 + want.abs()),
                        "{params:?} layer {l} neuron {t}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_key_for_another_vocabulary_or_special_set_is_refused() {
    let cfg = tiny_config(32, 4, 2, 1, 97);
    let w = random_weights(&cfg, 1);
    let (_, _, key) = compile(&cfg, &w, ObfuscationParams::exact(4), 3);
    let err = StateMaps::regenerate(&cfg, &[0, 1, 2], &key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another checkpoint"), "{err}");
    let other = tiny_config(32, 4, 2, 1, 98);
    let err = StateMaps::regenerate(&other, &SPECIALS, &key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another checkpoint"), "{err}");
}
