//! KV cache, batching, split mode and taps: every path must agree with a plain full forward.
use candle_core::{Device, Tensor};
use umbra_model::llama::{Forward, Input, KvCache, Llama, TapPoint};
use umbra_model::testing;
use umbra_model::LlamaConfig;

fn model(cfg: &LlamaConfig, seed: u64) -> Llama {
    Llama::new(cfg, &testing::random_weights(cfg, seed), &Device::Cpu).unwrap()
}

fn gqa() -> LlamaConfig {
    testing::tiny_config(48, 6, 2, 3, 64)
}

fn ids(v: &[u32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), (1, v.len()), &Device::Cpu).unwrap()
}

fn seq(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 13 + salt * 7 + 1) % 64)
        .collect()
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let s = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / s
}

fn full(m: &Llama, s: &[u32]) -> Vec<Vec<f32>> {
    m.forward(Input::Ids(&ids(s)), &mut m.new_cache(), Forward::logits())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn engine_cache_incremental_matches_full_forward() {
    let m = model(&gqa(), 1);
    let s = seq(12, 0);
    let want = full(&m, &s);
    // Chunks of 4 (prefill), 1, 1, 3 (chunked prefill with an offset mask), 1, 1, 1.
    let mut cache = m.new_cache();
    let mut pos = 0;
    for chunk in [4usize, 1, 1, 3, 1, 1, 1] {
        let got: Vec<Vec<f32>> = m
            .forward(
                Input::Ids(&ids(&s[pos..pos + chunk])),
                &mut cache,
                Forward::logits(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (i, g) in got.iter().enumerate() {
            let e = rel(g, &want[pos + i]);
            assert!(e < 1e-4, "position {}: {e:e}", pos + i);
        }
        pos += chunk;
        assert_eq!(cache.len(), pos);
    }
}

#[test]
fn engine_cache_growth_past_initial_capacity() {
    let m = model(&gqa(), 2);
    let s = seq(20, 1);
    let want = full(&m, &s);
    let mut cache = KvCache::with_capacity(m.num_layers(), 2);
    for (p, &tok) in s.iter().enumerate() {
        let got = m
            .forward(Input::Ids(&ids(&[tok])), &mut cache, Forward::last_logits())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(rel(&got, &want[p]) < 1e-4, "position {p}");
    }
}

#[test]
fn engine_cache_forward_last_is_last_row() {
    let m = model(&gqa(), 3);
    let s = seq(7, 2);
    let want = full(&m, &s);
    let got = m
        .forward(
            Input::Ids(&ids(&s)),
            &mut m.new_cache(),
            Forward::last_logits(),
        )
        .unwrap();
    assert_eq!(got.dims(), &[1, 64]);
    assert!(rel(&got.squeeze(0).unwrap().to_vec1::<f32>().unwrap(), &want[6]) < 1e-5);
}

#[test]
fn engine_cache_batched_prefill_and_decode_equal_single_runs() {
    let m = model(&gqa(), 4);
    let seqs: Vec<Vec<u32>> = (0..3).map(|i| seq(6, 10 + i)).collect();
    let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
    let mut bc = m.new_cache();
    let batched = m
        .forward(
            Input::Ids(&Tensor::from_vec(flat, (3, 6), &Device::Cpu).unwrap()),
            &mut bc,
            Forward::logits(),
        )
        .unwrap();
    assert_eq!(batched.dims(), &[3, 6, 64]);
    assert_eq!(bc.batch_size(), 3);
    let next = [5u32, 17, 33];
    let step = m
        .forward(
            Input::Ids(&Tensor::from_vec(next.to_vec(), (3, 1), &Device::Cpu).unwrap()),
            &mut bc,
            Forward::last_logits(),
        )
        .unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let mut c = m.new_cache();
        let single: Vec<Vec<f32>> = m
            .forward(Input::Ids(&ids(s)), &mut c, Forward::logits())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let b: Vec<Vec<f32>> = batched.get(i).unwrap().to_vec2().unwrap();
        for p in 0..6 {
            assert!(rel(&b[p], &single[p]) < 1e-5, "seq {i} position {p}");
        }
        let one = m
            .forward(Input::Ids(&ids(&[next[i]])), &mut c, Forward::last_logits())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            rel(&step.get(i).unwrap().to_vec1::<f32>().unwrap(), &one) < 1e-5,
            "decode seq {i}"
        );
    }
}

#[test]
fn engine_cache_reset_truncate_and_fork() {
    let m = model(&gqa(), 5);
    let s = seq(8, 3);
    let want = full(&m, &s);
    let mut c = m.new_cache();
    m.forward(Input::Ids(&ids(&seq(5, 9))), &mut c, Forward::logits())
        .unwrap();
    c.reset();
    assert!(c.is_empty());
    let got: Vec<Vec<f32>> = m
        .forward(Input::Ids(&ids(&s[..6])), &mut c, Forward::logits())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert!(rel(&got[5], &want[5]) < 1e-5);
    // Fork at 6, then roll the original back to 4 and replay.
    let mut fork = c.try_clone().unwrap();
    c.truncate(4);
    assert_eq!(c.len(), 4);
    let r = m
        .forward(Input::Ids(&ids(&s[4..7])), &mut c, Forward::last_logits())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(rel(&r, &want[6]) < 1e-4);
    let f = m
        .forward(
            Input::Ids(&ids(&s[6..7])),
            &mut fork,
            Forward::last_logits(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(rel(&f, &want[6]) < 1e-4);
}

#[test]
fn engine_split_mode_equals_forward() {
    let m = model(&gqa(), 6);
    let s = seq(5, 4);
    let want = full(&m, &s);
    let mut c = m.new_cache();
    let e = m.embed(&ids(&s)).unwrap();
    assert_eq!(e.dims(), &[1, 5, 48]);
    let h = m
        .forward(Input::Embeds(&e), &mut c, Forward::hidden())
        .unwrap();
    assert_eq!(h.dims(), &[1, 5, 48]);
    let got: Vec<Vec<f32>> = m.head(&h).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    for p in 0..5 {
        assert!(rel(&got[p], &want[p]) < 1e-6);
    }
}

#[test]
fn engine_taps_see_every_layer_and_match_outputs() {
    let m = model(&gqa(), 7);
    let s = seq(4, 5);
    let mut seen: Vec<(TapPoint, Tensor)> = vec![];
    let mut c = m.new_cache();
    let logits = m
        .forward(
            Input::Ids(&ids(&s)),
            &mut c,
            Forward::logits().tap(&mut |p, h| seen.push((p, h.clone()))),
        )
        .unwrap();
    let points: Vec<TapPoint> = seen.iter().map(|x| x.0).collect();
    let mut want = vec![TapPoint::Embeddings];
    want.extend((0..3).map(TapPoint::Layer));
    want.push(TapPoint::FinalNorm);
    assert_eq!(points, want);
    for (_, h) in &seen {
        assert_eq!(h.dims(), &[1, 4, 48]);
    }
    // Layer outputs differ from each other, and the last one is what forward_embeds returns.
    let l0 = seen[1].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let l1 = seen[2].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(rel(&l0, &l1) > 1e-3);
    let mut c2 = m.new_cache();
    let h = m
        .forward(
            Input::Embeds(&m.embed(&ids(&s)).unwrap()),
            &mut c2,
            Forward::hidden(),
        )
        .unwrap();
    assert!(
        rel(
            &seen[3].1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        ) < 1e-7
    );
    let want_logits = full(&m, &s);
    let got: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
    assert!(rel(&got[3], &want_logits[3]) < 1e-6);
}

#[test]
fn engine_cache_retain_drops_batch_rows() {
    let m = model(&gqa(), 8);
    let seqs: Vec<Vec<u32>> = (0..3).map(|i| seq(5, 20 + i)).collect();
    let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
    let mut bc = m.new_cache();
    m.forward(
        Input::Ids(&Tensor::from_vec(flat, (3, 5), &Device::Cpu).unwrap()),
        &mut bc,
        Forward::logits(),
    )
    .unwrap();
    assert!(bc.retain(&[true, false]).is_err());
    bc.retain(&[true, false, true]).unwrap();
    assert_eq!(bc.batch_size(), 2);
    let step = m
        .forward(
            Input::Ids(&Tensor::new(&[[7u32], [9]], &Device::Cpu).unwrap()),
            &mut bc,
            Forward::last_logits(),
        )
        .unwrap();
    for (row, (i, tok)) in [(0usize, 7u32), (2, 9)].into_iter().enumerate() {
        let mut c = m.new_cache();
        m.forward(Input::Ids(&ids(&seqs[i])), &mut c, Forward::logits())
            .unwrap();
        let one = m
            .forward(Input::Ids(&ids(&[tok])), &mut c, Forward::last_logits())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let got = step.get(row).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            rel(&got, &one.to_vec1::<f32>().unwrap()) < 1e-5,
            "row {row}"
        );
    }
    bc.retain(&[false, false]).unwrap();
    assert!(bc.is_empty());
}

#[test]
fn engine_decode_groups_of_different_lengths_equal_separate_steps() {
    let m = model(&gqa(), 9);
    // Groups at positions 3, 7 and 11 (one with 2 rows, 12 rows in all: past the small-row path),
    // decoded for 3 steps together; each must equal its own forward_last steps.
    let shapes: [(usize, usize); 4] = [(1, 3), (2, 7), (1, 11), (8, 5)];
    let mut prompts = vec![];
    let mut caches = vec![];
    let mut refs = vec![];
    for (g, &(b, len)) in shapes.iter().enumerate() {
        let rows: Vec<Vec<u32>> = (0..b).map(|r| seq(len, (g * 10 + r) as u32)).collect();
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (b, len), &Device::Cpu).unwrap();
        let mut c = m.new_cache();
        m.forward(Input::Ids(&t), &mut c, Forward::last_logits())
            .unwrap();
        let mut r = m.new_cache();
        m.forward(Input::Ids(&t), &mut r, Forward::last_logits())
            .unwrap();
        prompts.push(rows);
        caches.push(c);
        refs.push(r);
    }
    for step in 0..3u32 {
        let next: Vec<Vec<u32>> = shapes
            .iter()
            .enumerate()
            .map(|(g, &(b, _))| {
                (0..b as u32)
                    .map(|r| (g as u32 * 5 + r * 3 + step * 11) % 64)
                    .collect()
            })
            .collect();
        let next_t: Vec<Tensor> = shapes
            .iter()
            .zip(&next)
            .map(|(&(b, _), v)| Tensor::from_vec(v.clone(), (b, 1), &Device::Cpu).unwrap())
            .collect();
        let mut groups: Vec<(Input, &mut KvCache)> = next_t
            .iter()
            .map(Input::Ids)
            .zip(caches.iter_mut())
            .collect();
        // With taps (serving's hallucination probe) the pass must give the same logits, and
        // per layer the same residual rows as each group's own tapped step.
        let mut taps: Vec<Tensor> = vec![];
        let mut keep = |pt: TapPoint, t: &Tensor| {
            if let TapPoint::Layer(_) = pt {
                taps.push(t.clone());
            }
        };
        let out = m
            .forward_groups(&mut groups, Forward::last_logits().tap(&mut keep))
            .unwrap();
        assert_eq!(out.len(), shapes.len());
        assert_eq!(taps.len(), m.num_layers());
        let mut r0 = 0;
        for (g, &(b, len)) in shapes.iter().enumerate() {
            let t = Tensor::from_vec(next[g].clone(), (b, 1), &Device::Cpu).unwrap();
            let mut want_taps: Vec<Tensor> = vec![];
            let want: Vec<Vec<f32>> = m
                .forward(
                    Input::Ids(&t),
                    &mut refs[g],
                    Forward::last_logits().tap(&mut |pt, x| {
                        if let TapPoint::Layer(_) = pt {
                            want_taps.push(x.clone());
                        }
                    }),
                )
                .unwrap()
                .to_vec2()
                .unwrap();
            for (l, (got_l, want_l)) in taps.iter().zip(&want_taps).enumerate() {
                // Groups' rows stacked `[P, d]`; the group alone taps `[b, 1, d]`.
                let got_l: Vec<Vec<f32>> = got_l.narrow(0, r0, b).unwrap().to_vec2().unwrap();
                let want_l: Vec<Vec<f32>> = want_l.squeeze(1).unwrap().to_vec2().unwrap();
                for r in 0..b {
                    assert!(
                        rel(&got_l[r], &want_l[r]) < 1e-5,
                        "tap layer {l} group {g} row {r}"
                    );
                }
            }
            r0 += b;
            let got: Vec<Vec<f32>> = out[g].to_vec2().unwrap();
            assert_eq!(got.len(), b);
            for r in 0..b {
                assert!(
                    rel(&got[r], &want[r]) < 1e-5,
                    "group {g} row {r} step {step}"
                );
            }
            assert_eq!(caches[g].len(), len + 1 + step as usize);
        }
    }
    // A group with an empty cache is a one-token prompt, batched with the others.
    let mut empty = m.new_cache();
    let one = ids(&[1]);
    let got = m
        .forward_groups(
            &mut [(Input::Ids(&one), &mut empty)],
            Forward::last_logits(),
        )
        .unwrap();
    let want = m
        .forward(Input::Ids(&one), &mut m.new_cache(), Forward::last_logits())
        .unwrap();
    assert_eq!(
        got[0].to_vec2::<f32>().unwrap(),
        want.to_vec2::<f32>().unwrap()
    );
    assert_eq!(empty.len(), 1);
}

/// Split mode's batched server step: decode rows given as embeddings, blocks only, for groups at
/// different positions, equal each group's own `forward_embeds` step.
#[test]
fn engine_decode_groups_from_embeddings_equal_separate_steps() {
    let m = model(&gqa(), 4);
    let lens = [2usize, 6, 9];
    let embed = |v: &[u32]| m.embed(&ids(v)).unwrap();
    let mut caches = vec![];
    let mut refs = vec![];
    for (g, &len) in lens.iter().enumerate() {
        let x = embed(&seq(len, g as u32));
        let mut c = m.new_cache();
        m.forward(Input::Embeds(&x), &mut c, Forward::hidden())
            .unwrap();
        let mut r = m.new_cache();
        m.forward(Input::Embeds(&x), &mut r, Forward::hidden())
            .unwrap();
        caches.push(c);
        refs.push(r);
    }
    for step in 0..3u32 {
        let xs: Vec<Tensor> = (0..lens.len() as u32)
            .map(|g| embed(&[(g * 7 + step * 13) % 64]))
            .collect();
        let mut groups: Vec<(Input, &mut KvCache)> = xs
            .iter()
            .map(Input::Embeds)
            .zip(caches.iter_mut())
            .collect();
        let got = m.forward_groups(&mut groups, Forward::hidden()).unwrap();
        assert_eq!(got.len(), lens.len());
        for (g, h) in got.iter().enumerate() {
            assert_eq!(h.dims(), &[1, 1, m.config().hidden_size]);
            let want = m
                .forward(Input::Embeds(&xs[g]), &mut refs[g], Forward::hidden())
                .unwrap();
            let (a, b) = (
                h.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(rel(&a, &b) < 1e-5, "group {g} step {step}: {}", rel(&a, &b));
            assert_eq!(caches[g].len(), refs[g].len());
        }
    }
    // Wrong widths are refused; a cache at its model's context limit too.
    let bad = Tensor::zeros(
        (1, 1, m.config().hidden_size + 1),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(m
        .forward_groups(
            &mut [(Input::Embeds(&bad), &mut caches[0])],
            Forward::hidden()
        )
        .is_err());
    let one = embed(&[1]);
    let mut other = umbra_model::KvCache::new(m.num_layers() + 1);
    assert!(m
        .forward_groups(&mut [(Input::Embeds(&one), &mut other)], Forward::hidden())
        .is_err());
}

/// One pass mixing a prompt chunk (8 positions after 5 cached) with two other sequences'
/// decode steps (chunked prefill beside continuous batching): each group's logits equal its
/// own full forward, and every cache advances by its own length.
#[test]
fn engine_groups_mix_a_prompt_chunk_with_decode_steps() {
    let m = model(&gqa(), 12);
    let long = seq(13, 1);
    let (a, b) = (seq(6, 2), seq(9, 3));
    let mut cl = m.new_cache();
    m.forward(
        Input::Ids(&ids(&long[..5])),
        &mut cl,
        Forward::last_logits(),
    )
    .unwrap();
    let mut ca = m.new_cache();
    m.forward(Input::Ids(&ids(&a[..5])), &mut ca, Forward::last_logits())
        .unwrap();
    let mut cb = m.new_cache();
    m.forward(Input::Ids(&ids(&b[..8])), &mut cb, Forward::last_logits())
        .unwrap();
    let (chunk, na, nb) = (ids(&long[5..]), ids(&a[5..]), ids(&b[8..]));
    let mut groups = [
        (Input::Ids(&na), &mut ca),
        (Input::Ids(&chunk), &mut cl),
        (Input::Ids(&nb), &mut cb),
    ];
    let got = m.forward_groups(&mut groups, Forward::logits()).unwrap();
    for (g, (s, len)) in [(&a, 1usize), (&long, 8), (&b, 1)].iter().enumerate() {
        let want = full(&m, s);
        let rows: Vec<Vec<f32>> = got[g].squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(rows.len(), *len);
        for (i, r) in rows.iter().enumerate() {
            let e = rel(r, &want[s.len() - len + i]);
            assert!(e < 1e-4, "group {g} position {i}: {e:e}");
        }
    }
    assert_eq!((ca.len(), cl.len(), cb.len()), (6, 13, 9));
}

/// A pass over blocks 0..1 then one over 1..3 (the residual stream handed on as embeddings)
/// equals the whole pass, also for the cached decode step after it; ranges that cannot give
/// logits, or skip a block the cache has not seen, are refused.
#[test]
fn engine_block_ranges_compose_to_the_whole_pass() {
    let m = model(&gqa(), 13);
    let s = seq(7, 4);
    let want = full(&m, &s);
    let mut c = m.new_cache();
    for (lo, hi) in [(0usize, 6usize), (6, 7)] {
        let part = ids(&s[lo..hi]);
        let h = m
            .forward(Input::Ids(&part), &mut c, Forward::hidden().blocks(0..1))
            .unwrap();
        assert_eq!(c.len(), lo, "the last layer has not run yet");
        let got = m
            .forward(
                Input::Embeds(&h),
                &mut c,
                Forward::last_logits().blocks(1..3),
            )
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(rel(&got[0], &want[hi - 1]) < 1e-4, "positions {lo}..{hi}");
        assert_eq!(c.len(), hi);
    }
    let x = m.embed(&ids(&s[..1])).unwrap();
    let mut fresh = m.new_cache();
    assert!(m
        .forward(
            Input::Embeds(&x),
            &mut fresh,
            Forward::logits().blocks(0..2)
        )
        .is_err());
    assert!(m
        .forward(
            Input::Ids(&ids(&s[..1])),
            &mut fresh,
            Forward::hidden().blocks(1..3)
        )
        .is_err());
    m.forward(
        Input::Embeds(&x),
        &mut fresh,
        Forward::hidden().blocks(0..1),
    )
    .unwrap();
    let err = m
        .forward(
            Input::Embeds(&x),
            &mut fresh,
            Forward::hidden().blocks(0..3),
        )
        .unwrap_err();
    assert!(err.to_string().contains("disagree"), "{err}");
    assert!(m
        .forward(
            Input::Embeds(&x),
            &mut fresh,
            Forward::hidden().blocks(2..5)
        )
        .is_err());
}
