//! Two parties as two processes over a real NATS server on loopback (Debian's `nats-server`,
//! started and stopped by the test itself).
use std::io::Write;
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
    if let Ok(out) = Command::new("sh")
        .arg("-c")
        .arg("command -v nats-server")
        .output()
    {
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !s.is_empty() {
            return s.into();
        }
    }
    panic!("nats-server not found: install it with `apt-get install nats-server` (or run .ci/nats.sh install)");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server(Child);

impl Server {
    fn start(port: u16) -> Server {
        let child = Command::new(nats_binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nats-server did not come up on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn party(role: &str, port: u16, job: &Path, json: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vfl_party"))
        .args([
            "party",
            "--role",
            role,
            "--broker",
            &format!("nats://127.0.0.1:{port}"),
        ])
        .arg("--job")
        .arg(job)
        .arg("--json")
        .arg(json)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start party")
}

fn wait(mut c: Child, limit: Duration) -> bool {
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

fn write_job(dir: &Path, job: &str, epochs: usize, extra: &str) -> PathBuf {
    let p = dir.join("job.toml");
    let mut f = std::fs::File::create(&p).unwrap();
    write!(
        f,
        "job = \"{job}\"\ndata = \"adult\"\nmode = \"pubsub\"\nepochs = {epochs}\nbatch = 256\nworkers_active = 2\nworkers_passive = 2\n{extra}"
    )
    .unwrap();
    p
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn auc_of(p: &Path) -> f64 {
    json(p)["auc"].as_f64().unwrap_or(0.0)
}

#[test]
fn two_processes_over_nats() {
    let port = free_port();
    let _server = Server::start(port);
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "ci-two-process", 3, "deadline_s = 5.0\n");
    let (ja, jp) = (
        dir.path().join("active.json"),
        dir.path().join("passive.json"),
    );
    let a = party("active", port, &job, &ja);
    let p = party("passive", port, &job, &jp);
    assert!(wait(p, Duration::from_secs(240)), "passive party failed");
    assert!(wait(a, Duration::from_secs(30)), "active party failed");
    let (aa, ap) = (auc_of(&ja), auc_of(&jp));
    eprintln!("two-process AUC: active {aa:.4}, passive's copy {ap:.4}");
    assert!(aa > 0.88, "AUC {aa}");
    assert_eq!(aa, ap, "the passive party got the active party's report");
}

#[test]
fn nats_restart_during_training_does_not_lose_the_run() {
    let port = free_port();
    let server = Server::start(port);
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "ci-restart", 8, "deadline_s = 1.0\n");
    let (ja, jp) = (
        dir.path().join("active.json"),
        dir.path().join("passive.json"),
    );
    let a = party("active", port, &job, &ja);
    let p = party("passive", port, &job, &jp);
    std::thread::sleep(Duration::from_millis(2500));
    drop(server);
    std::thread::sleep(Duration::from_millis(500));
    let _server = Server::start(port);
    assert!(wait(p, Duration::from_secs(240)), "passive party failed");
    assert!(wait(a, Duration::from_secs(60)), "active party failed");
    let aa = auc_of(&ja);
    assert!(aa > 0.85, "AUC after a broker restart {aa}");
    // the restart really hit the training: batch attempts were lost and reassigned
    let p = json(&jp);
    let epochs = p["per_epoch"].as_array().unwrap();
    assert_eq!(epochs.len(), 8);
    let dropped: u64 = epochs.iter().map(|e| e["dropped"].as_u64().unwrap()).sum();
    let batches: u64 = epochs.iter().map(|e| e["batches"].as_u64().unwrap()).sum();
    eprintln!("restart: {dropped} batch attempts dropped, {batches} batches trained");
    assert!(dropped >= 1, "the broker restart did not hit the training");
    assert_eq!(batches, 8 * 134, "every batch trained once in the end");
}
