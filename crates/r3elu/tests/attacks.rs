//! On a small Fashion-MNIST slice: the host's reconstruction and property attacks succeed
//! against the undefended cut layer and are weakened by R3eLU (needs `umbra fetch fashion-mnist`).
use umbra_r3elu::attacks::{self, AttackConfig};
use umbra_r3elu::config::{Defense, SplitConfig};
use umbra_r3elu::data::{self, DataKind, Sizes};
use umbra_r3elu::training;

fn cfg(defense: Defense, eps: f64) -> SplitConfig {
    let mut c = SplitConfig {
        data: DataKind::FashionMnist,
        sizes: Sizes {
            train: 4000,
            test: 1000,
            aux: 3000,
        },
        defense,
        epochs: 2,
        ..Default::default()
    };
    c.r3.eps = eps;
    c.r3.budget = umbra_r3elu::mechanism::Budget::Uniform;
    c
}

#[test]
fn attacks_succeed_undefended_and_r3elu_weakens_them() {
    let base = cfg(Defense::None, f64::INFINITY);
    let ds = data::load(base.data, base.sizes, base.seed).expect("fashion-mnist");
    let acfg = AttackConfig {
        victims: 400,
        epochs: 12,
        ..Default::default()
    };

    let plain = training::train_inproc(&base, &ds).unwrap();
    assert!(plain.report.test_acc > 0.7, "acc {}", plain.report.test_acc);
    assert!(plain.report.privacy.epsilon_total.is_none());
    let traffic = attacks::victim_traffic(&plain, &ds, &acfg).unwrap();
    let rec = attacks::reconstruction(&plain, &ds, &traffic, &acfg).unwrap();
    let (ssim, cm) = (rec.recon_ssim.unwrap(), rec.classmean_ssim.unwrap());
    // the inverse network beats the class-mean guess by a wide margin (400 images)
    assert!(
        ssim > cm + 0.08,
        "undefended recon ssim {ssim} vs class mean {cm}"
    );
    let auc = attacks::property(&plain, &ds, &traffic, &acfg).unwrap();
    assert!(auc > 0.8, "undefended property auc {auc}");

    let def = training::train_inproc(&cfg(Defense::R3elu, 2.0), &ds).unwrap();
    // 2 epochs + 1 inference release of eps 2 each
    assert!((def.report.privacy.epsilon_total.unwrap() - 6.0).abs() < 1e-9);
    let traffic = attacks::victim_traffic(&def, &ds, &acfg).unwrap();
    let rec_d = attacks::reconstruction(&def, &ds, &traffic, &acfg).unwrap();
    let ssim_d = rec_d.recon_ssim.unwrap();
    assert!(
        ssim_d < cm + 0.02,
        "r3elu recon ssim {ssim_d} vs class mean {cm}"
    );
    assert!(ssim_d < ssim - 0.1);
    let auc_d = attacks::property(&def, &ds, &traffic, &acfg).unwrap();
    // 400 victims: the AUC's standard error is ~0.03 at 0.5
    assert!(auc_d < 0.62, "r3elu property auc {auc_d}");
}

#[test]
fn fsha_hijacks_the_undefended_guest_and_r3elu_stops_it() {
    let base = cfg(Defense::None, f64::INFINITY);
    let ds = data::load(base.data, base.sizes, base.seed).expect("fashion-mnist");
    let acfg = AttackConfig {
        victims: 300,
        fsha_steps: 700,
        ..Default::default()
    };
    let plain = attacks::fsha(&base, &ds, &acfg).unwrap();
    let (s, cm) = (plain.recon_ssim.unwrap(), plain.classmean_ssim.unwrap());
    assert!(s > cm + 0.04, "undefended FSHA ssim {s} vs class mean {cm}");
    let def = attacks::fsha(&cfg(Defense::R3elu, 2.0), &ds, &acfg).unwrap();
    let sd = def.recon_ssim.unwrap();
    assert!(
        sd < cm && sd < s - 0.2,
        "r3elu FSHA ssim {sd} (undefended {s}, class mean {cm})"
    );
}
