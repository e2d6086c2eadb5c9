//! The command entry points the `umbra` CLI wires: bench (five modes, one JSON object per mode)
//! and plan (profile, fit, search, measure).
use umbra_vfl::cli::{self, BenchVflArgs, VflTrainArgs};
use umbra_vfl::Mode;

#[test]
fn bench_json_holds_one_object_per_mode() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let args = BenchVflArgs {
        data: "synthetic:4000x16".into(),
        epochs: 2,
        batch: 128,
        workers_active: 2,
        workers_passive: 2,
        max_rows: None,
        depth: Some(3),
        target_auc: None,
        active_machine: None,
        passive_machine: None,
        repeats: 2,
        json: Some(json.clone()),
    };
    cli::run_bench(&args).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for mode in Mode::ALL {
        let r = &v[mode.name()];
        for key in ["auc", "wall_s", "cpu_util", "wait_s", "bytes"] {
            assert!(r[key].as_f64().is_some(), "{mode}: {key} missing in {r}");
        }
        assert!(r["auc"].as_f64().unwrap() > 0.7, "{mode}: {}", r["auc"]);
        // the target defaults to the lowest final AUC, which every mode reaches
        assert!(r["time_to_target_s"].as_f64().is_some(), "{mode}");
        // both repeats are kept, fastest first; of two, the reported median is the faster
        let runs: Vec<f64> = r["wall_s_runs"]
            .as_array()
            .unwrap_or_else(|| panic!("{mode}: wall_s_runs missing"))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(runs.len(), 2, "{mode}: {runs:?}");
        assert!(runs[0] <= runs[1], "{mode}: {runs:?}");
        assert_eq!(r["wall_s"].as_f64().unwrap(), runs[0], "{mode}");
    }
}

#[test]
fn plan_fits_and_measures() {
    let r = umbra_vfl::plan::plan("synthetic:6000x16", Some(2), 512, 6000).unwrap();
    assert!([64, 128, 256, 512].contains(&r.batch), "{}", r.batch);
    assert!(r.workers_active >= 1 && r.workers_passive >= 1);
    assert!(r.predicted_epoch_s > 0.0 && r.measured_epoch_s > 0.0);
    assert!(r.active.gamma.is_finite() && r.passive.lambda > 0.0);
    assert!(r.human().contains("predicted"));
    // the shortlist holds the default and the plan, and the plan is its fastest trial
    let has = |wa, wp, b| {
        r.candidates
            .iter()
            .any(|c| (c.workers_active, c.workers_passive, c.batch) == (wa, wp, b))
    };
    assert!(has(2, 2, 256), "{:?}", r.candidates);
    assert!(has(r.workers_active, r.workers_passive, r.batch));
    assert!(r.candidates.len() >= 2 && r.candidates.len() <= 7);
    let fastest = r
        .candidates
        .iter()
        .map(|c| c.trial_epoch_s)
        .fold(f64::INFINITY, f64::min);
    assert!(r
        .candidates
        .iter()
        .any(|c| c.batch == r.batch && c.trial_epoch_s == fastest));
    assert!(r.candidates.iter().all(|c| c.trial_epoch_s > 0.0));
}

#[test]
fn plan_on_unequal_machines_models_the_slow_party_and_measures_the_default() {
    use umbra_vfl::budget::PartyMachine;
    let slow = PartyMachine {
        cores: 1,
        slowdown: 4.0,
    };
    let fast = PartyMachine {
        cores: 1,
        slowdown: 1.0,
    };
    let r = umbra_vfl::plan::plan_on(
        "synthetic:6000x16",
        Some(2),
        512,
        6000,
        (Some(fast), Some(slow)),
    )
    .unwrap();
    assert_eq!(r.machine_passive, Some(slow));
    assert!(r.default_measured_epoch_s > 0.0 && r.default_predicted_epoch_s > 0.0);
    // The search covers the default setting, so the model's best prediction (the shortlist's
    // first entry) can only be as good or better; the plan is the fastest trial, so it was at
    // least as fast as the default in the trials.
    assert!(r.candidates[0].predicted_epoch_s <= r.default_predicted_epoch_s + 1e-12);
    let trial = |wa, wp, b| {
        r.candidates
            .iter()
            .find(|c| (c.workers_active, c.workers_passive, c.batch) == (wa, wp, b))
            .map(|c| c.trial_epoch_s)
            .unwrap()
    };
    assert!(trial(r.workers_active, r.workers_passive, r.batch) <= trial(2, 2, 256));
    // A 4x slower passive party makes its side the bottleneck of the model.
    let model = umbra_vfl::plan::TimeModel {
        active: r.active,
        passive: r.passive,
        ps: (r.ps_active_s, r.ps_passive_s),
        bandwidth: r.bandwidth_bytes_per_s,
        emb: 16,
        rows: 4200,
        cores: 2,
        machines: (None, None),
    };
    let shared = model.epoch_time(r.workers_active, r.workers_passive, r.batch);
    assert!(
        r.predicted_epoch_s >= shared - 1e-12,
        "{} vs {shared}",
        r.predicted_epoch_s
    );
    let crawling = PartyMachine {
        cores: 1,
        slowdown: 1000.0,
    };
    let slowest = umbra_vfl::plan::TimeModel {
        machines: (Some(fast), Some(crawling)),
        ..model
    }
    .epoch_time(r.workers_active, r.workers_passive, r.batch);
    assert!(slowest > 10.0 * shared, "{slowest} vs {shared}");
    assert!(r.human().contains("simulated machines"));
    // Bad machines are refused up front.
    let bad = PartyMachine {
        cores: 0,
        slowdown: 1.0,
    };
    assert!(
        umbra_vfl::plan::plan_on("synthetic:600x8", Some(2), 64, 600, (Some(bad), None)).is_err()
    );
}

#[test]
fn train_args_build_the_job_and_write_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let args = VflTrainArgs {
        data: Some("synthetic:3000x12".into()),
        mode: Mode::Avfl,
        job: None,
        workers_active: None,
        workers_passive: None,
        batch: Some(128),
        epochs: Some(2),
        seed: None,
        dp_mu: Some(2.0),
        dp_clip: 1.0,
        depth: Some(2),
        max_rows: None,
        cores: Some(2),
        centralised: false,
        json: Some(json.clone()),
        quiet: true,
    };
    let cfg = args.job_config().unwrap();
    assert_eq!(
        (cfg.mode, cfg.batch, cfg.model.bottom_depth),
        (Mode::Avfl, 128, 2)
    );
    let r = cli::run_train(&args).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["mode"], "avfl");
    assert_eq!(v["cores"], 2);
    assert!(v["dp_mu"].as_f64().unwrap() <= 2.0 + 1e-9);
    assert_eq!(v["per_epoch"].as_array().unwrap().len(), 2);
    assert!(r.bytes > 0);
    let bad = VflTrainArgs {
        data: Some("nope".into()),
        ..args
    };
    assert!(bad.job_config().is_err());
}
