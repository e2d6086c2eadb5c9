//! Sampler: determinism, greedy equivalences, and empirical frequencies vs softmax.
use umbra_model::sampling::{argmax, Sampler, SamplingParams};
use umbra_model::ModelError;

fn logits(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| (((i * 2654435761u32) ^ seed) % 1000) as f32 / 100.0 - 5.0)
        .collect()
}

#[test]
fn engine_sampling_greedy_is_argmax_ties_lowest() {
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0]), 1);
    assert_eq!(s.sample(&[f32::NAN, -1.0, -2.0]), 1);
    assert_eq!(argmax(&[2.0, 2.0]), 0);
}

#[test]
fn engine_sampling_same_seed_same_sequence() {
    let p = SamplingParams {
        temperature: 0.9,
        top_k: Some(50),
        top_p: Some(0.95),
        seed: 42,
    };
    let run = |p: &SamplingParams| {
        let mut s = Sampler::new(p.clone()).unwrap();
        (0..200)
            .map(|i| s.sample(&logits(500, i)))
            .collect::<Vec<u32>>()
    };
    let a = run(&p);
    assert_eq!(a, run(&p));
    let b = run(&SamplingParams {
        seed: 43,
        ..p.clone()
    });
    assert_ne!(a, b, "a different seed should change the sequence");
    assert!(
        a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
        "should not be constant"
    );
}

#[test]
fn engine_sampling_top_k1_and_tiny_top_p_are_greedy() {
    let mut k1 = Sampler::new(SamplingParams {
        temperature: 1.5,
        top_k: Some(1),
        top_p: None,
        seed: 1,
    })
    .unwrap();
    let mut p0 = Sampler::new(SamplingParams {
        temperature: 1.5,
        top_k: None,
        top_p: Some(1e-6),
        seed: 2,
    })
    .unwrap();
    for i in 0..100 {
        let l = logits(300, i);
        let g = argmax(&l);
        assert_eq!(k1.sample(&l), g);
        assert_eq!(p0.sample(&l), g);
    }
    // Ties go to the lowest id for top_k=1 too.
    assert_eq!(k1.sample(&[1.0, 4.0, 4.0, 0.0]), 1);
}

fn freqs(p: SamplingParams, l: &[f32], n: usize) -> Vec<f64> {
    let mut s = Sampler::new(p).unwrap();
    let mut c = vec![0usize; l.len()];
    for _ in 0..n {
        c[s.sample(l) as usize] += 1;
    }
    c.into_iter().map(|x| x as f64 / n as f64).collect()
}

fn softmax(l: &[f32], t: f64) -> Vec<f64> {
    let e: Vec<f64> = l.iter().map(|&x| (x as f64 / t).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

#[test]
fn engine_sampling_frequencies_match_softmax() {
    let l = [1.0f32, 0.0, -1.0, 2.0];
    let n = 40_000;
    let f = freqs(SamplingParams::with_temperature(1.0, 7), &l, n);
    for (i, (got, want)) in f.iter().zip(softmax(&l, 1.0)).enumerate() {
        let sd = (want * (1.0 - want) / n as f64).sqrt();
        assert!((got - want).abs() < 5.0 * sd, "token {i}: {got} vs {want}");
    }
    // Temperature 2 flattens the distribution as softmax(l / 2).
    let f = freqs(SamplingParams::with_temperature(2.0, 8), &l, n);
    for (got, want) in f.iter().zip(softmax(&l, 2.0)) {
        assert!((got - want).abs() < 5.0 * (want * (1.0 - want) / n as f64).sqrt());
    }
}

#[test]
fn engine_sampling_top_k_and_top_p_truncate_and_renormalize() {
    let l = [1.0f32, 0.0, -1.0, 2.0]; // probs ~ .237 .087 .032 .644
    let n = 20_000;
    let f = freqs(
        SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            top_p: None,
            seed: 9,
        },
        &l,
        n,
    );
    assert_eq!(f[1] + f[2], 0.0);
    let w = softmax(&[2.0, 1.0], 1.0); // renormalized over {3, 0}
    assert!(
        (f[3] - w[0]).abs() < 0.02 && (f[0] - w[1]).abs() < 0.02,
        "{f:?}"
    );
    // top_p 0.85: .644 < .85 <= .644 + .237, so {3, 0} survive.
    let f = freqs(
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.85),
            seed: 10,
        },
        &l,
        n,
    );
    assert_eq!(f[1] + f[2], 0.0, "{f:?}");
    assert!((f[3] - w[0]).abs() < 0.02);
    // top_p 0.9 keeps three.
    let f = freqs(
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.9),
            seed: 11,
        },
        &l,
        n,
    );
    assert_eq!(f[2], 0.0);
    assert!(f[1] > 0.05);
}

#[test]
fn engine_sampling_rejects_bad_params() {
    let bad = [
        SamplingParams {
            temperature: -0.1,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: Some(0),
            top_p: None,
            seed: 0,
        },
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.0),
            seed: 0,
        },
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(1.5),
            seed: 0,
        },
    ];
    for p in bad {
        assert!(
            matches!(Sampler::new(p.clone()), Err(ModelError::Input(_))),
            "{p:?} accepted"
        );
    }
    Sampler::new(SamplingParams {
        temperature: 1.0,
        top_k: Some(1),
        top_p: Some(1.0),
        seed: 0,
    })
    .unwrap();
}
