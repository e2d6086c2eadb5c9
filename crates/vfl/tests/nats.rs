//! Two parties as two processes over a real NATS server on loopback (Debian's `nats-server`,
//! started and stopped by the test itself).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;
use umbra_vfl::testing::{free_port, party_process, wait_exit, NatsServer};

fn party(role: &str, port: u16, job: &Path, json: &Path) -> Child {
    party_process(env!("CARGO_BIN_EXE_vfl_party"), role, port, job, json)
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
    let _server = NatsServer::start_on(port);
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "ci-two-process", 3, "deadline_s = 5.0\n");
    let (ja, jp) = (
        dir.path().join("active.json"),
        dir.path().join("passive.json"),
    );
    let a = party("active", port, &job, &ja);
    let p = party("passive", port, &job, &jp);
    assert!(
        wait_exit(p, Duration::from_secs(240)),
        "passive party failed"
    );
    assert!(wait_exit(a, Duration::from_secs(30)), "active party failed");
    let (aa, ap) = (auc_of(&ja), auc_of(&jp));
    eprintln!("two-process AUC: active {aa:.4}, passive's copy {ap:.4}");
    assert!(aa > 0.88, "AUC {aa}");
    assert_eq!(aa, ap, "the passive party got the active party's report");
}

#[test]
fn nats_restart_during_training_does_not_lose_the_run() {
    let port = free_port();
    let server = NatsServer::start_monitored(port);
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "ci-restart", 8, "deadline_s = 1.0\n");
    let (ja, jp) = (
        dir.path().join("active.json"),
        dir.path().join("passive.json"),
    );
    let a = party("active", port, &job, &ja);
    let p = party("passive", port, &job, &jp);
    // Restart once training is under way (about one epoch of embeddings and gradients has
    // passed: 134 batches, 2+ messages each), not at a fixed time that a slow start may miss.
    assert!(
        server.wait_for_messages(300, Duration::from_secs(120)),
        "no training traffic reached the broker"
    );
    drop(server);
    std::thread::sleep(Duration::from_millis(500));
    let _server = NatsServer::start_on(port);
    assert!(
        wait_exit(p, Duration::from_secs(240)),
        "passive party failed"
    );
    assert!(wait_exit(a, Duration::from_secs(60)), "active party failed");
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
