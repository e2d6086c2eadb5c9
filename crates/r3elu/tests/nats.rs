//! Guest and host as two processes over a real NATS server on loopback (Debian's `nats-server`,
//! started and stopped by the test; `.ci/nats.sh install` provides it).
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn nats_binary() -> PathBuf {
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("nats-server not found: install it with `bash .ci/nats.sh install`");
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait(c: &mut Child, limit: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.success();
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn guest_and_host_train_over_nats() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Killed(
        Command::new(nats_binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server"),
    );
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nats-server did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = tempfile::tempdir().unwrap();
    let party = |role: &str| {
        Command::new(env!("CARGO_BIN_EXE_r3elu_party"))
            .args([
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
    assert!(wait(&mut guest, Duration::from_secs(180)), "guest failed");
    assert!(wait(&mut host, Duration::from_secs(30)), "host failed");
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
