//! Guest and host as two processes over a real NATS server on loopback (Debian's `nats-server`,
//! started and stopped by the test; `.ci/nats.sh install` provides it).
use std::process::{Command, Stdio};
use std::time::Duration;
use umbra_vfl::testing::{wait_child, NatsServer};

#[test]
fn guest_and_host_train_over_nats() {
    let server = NatsServer::start();
    let port = server.port();
    let dir = tempfile::tempdir().unwrap();
    let party = |role: &str| {
        Command::new(env!("CARGO_BIN_EXE_r3elu_party"))
            .args([
                "party",
                "--role",
                role,
                "--broker",
                &format!("nats://127.0.0.1:{port}"),
                "--data",
                "fashion-mnist",
                "--defense",
                "r3elu",
                "--epsilon",
                "inf",
                "--budget",
                "uniform",
                "--train",
                "2000",
                "--test",
                "500",
                "--aux",
                "0",
                "--epochs",
                "2",
                "--quiet",
                "--json",
            ])
            .arg(dir.path().join(format!("{role}.json")))
            .stdout(Stdio::null())
            .spawn()
            .expect("start party")
    };
    // the host first, then the guest: the handshake tolerates either order
    let mut host = party("host");
    let mut guest = party("guest");
    assert!(
        wait_child(&mut guest, Duration::from_secs(180)),
        "guest failed"
    );
    assert!(
        wait_child(&mut host, Duration::from_secs(30)),
        "host failed"
    );
    let read = |r: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("{r}.json"))).unwrap(),
        )
        .unwrap()
    };
    let (h, g) = (read("host"), read("guest"));
    let acc = h["test_acc"].as_f64().unwrap();
    assert!(acc > 0.6, "test accuracy over NATS {acc}");
    // the guest learned the host's number through the report message
    assert_eq!(g["test_acc"].as_f64().unwrap(), acc);
    assert_eq!(h["defense"], "r3elu");
}
