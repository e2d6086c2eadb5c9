//! The command entry points on a small Fashion-MNIST slice (needs `umbra fetch fashion-mnist`):
//! the attack report's accounting and clear errors for bad input.
use clap::Parser;
use umbra_r3elu::cli::{self, Command};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

fn parse(args: &[&str]) -> Command {
    Cli::try_parse_from(std::iter::once("r3elu").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        .cmd
}

/// A small job as arguments: `(flag, value)` pairs, `set` replacing or adding some.
fn small(set: &[(&'static str, &'static str)]) -> Vec<&'static str> {
    let mut job = vec![
        ("--data", "fashion-mnist"),
        ("--train", "1000"),
        ("--test", "200"),
        ("--aux", "500"),
        ("--epochs", "3"),
        ("--batch", "128"),
        ("--budget", "uniform"),
    ];
    for &(k, v) in set {
        match job.iter_mut().find(|(f, _)| *f == k) {
            Some(e) => e.1 = v,
            None => job.push((k, v)),
        }
    }
    // an empty value: the flag carries its own (`--epsilon=-1`)
    job.into_iter()
        .flat_map(|(k, v)| std::iter::once(k).chain((!v.is_empty()).then_some(v)))
        .collect()
}

#[test]
fn attack_json_counts_every_epoch_and_the_inference_release() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("a.json");
    let mut args = vec!["attack", "--attack", "property", "--quiet"];
    args.extend(small(&[
        ("--epsilon", "2"),
        ("--victims", "100"),
        ("--attack-epochs", "1"),
    ]));
    args.extend(["--json", json.to_str().unwrap()]);
    cli::run(&parse(&args)).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let (eps, total) = (
        v["epsilon"].as_f64().unwrap(),
        v["epsilon_total"].as_f64().unwrap(),
    );
    // no amplification: the host knows each batch's rows
    assert!(
        total >= 3.0 * eps,
        "epsilon_total {total} < 3 epochs x {eps}"
    );
    assert_eq!(v["releases"], 4);
    assert!((total - 8.0).abs() < 1e-9, "{total}");
    assert_eq!(v["composition"], "basic");
    assert!(v["property_auc"].as_f64().is_some());
}

#[test]
fn bad_input_fails_with_a_clear_error() {
    let err = |cmd: &'static str, set: &[(&'static str, &'static str)]| -> String {
        let mut args = vec![cmd, "--quiet"];
        args.extend(small(set));
        cli::run(&parse(&args)).unwrap_err().to_string()
    };
    assert!(err("train", &[("--epsilon", "0")]).contains("epsilon must be > 0"));
    assert!(err("train", &[("--epsilon=-1", "")]).contains("epsilon must be > 0"));
    assert!(err("train", &[("--epsilon-total", "0")]).contains("epsilon must be > 0"));
    assert!(err("train", &[("--train", "0")]).contains("training split is empty"));
    assert!(err("train", &[("--test", "0")]).contains("test split is empty"));
    assert!(err("train", &[("--budget", "coarse")]).contains("expected uniform or fine"));
    // the attacks need the host's auxiliary rows
    let e = err("attack", &[("--aux", "0")]);
    assert!(e.contains("auxiliary split is empty"), "{e}");
    let e = parse(&["bench", "--eps-total", "0,2"]);
    assert!(cli::run(&e)
        .unwrap_err()
        .to_string()
        .contains("--eps-total"));
}
