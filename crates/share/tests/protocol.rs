//! The share protocol end to end on a tiny random model: two TLS servers in this process, the
//! client backend, exactness, integrity, faults, bad frames, batching and the servers' view.
use candle_core::{Device, Tensor};
use rustls::{ClientConnection, StreamOwned};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use umbra_model::generate::{generate, GenerateParams};
use umbra_model::sampling::SamplingParams;
use umbra_model::testing::{random_weights, tiny_config};
use umbra_model::{Forward, Input, Llama, LlamaConfig, Weights};
use umbra_share::backend::ShareSession;
use umbra_share::client::parse_pair;
use umbra_share::fixed::Format;
use umbra_share::frame;
use umbra_share::model::{Remote, ShareModel};
use umbra_share::secrecy::{bits_chi_square, bytes_chi_square, compare};
use umbra_share::server::{spawn, Faults, PublicWeights, RunningServer, ServerConfig};
use umbra_share::tls::{ServerIdentity, Trust};
use umbra_share::transcript::Transcript;

fn model(seed: u64) -> (LlamaConfig, Weights) {
    let cfg = tiny_config(64, 4, 2, 2, 300);
    let w = random_weights(&cfg, seed);
    (cfg, w)
}

fn server(
    w: &Arc<PublicWeights>,
    faults: Faults,
    record: Option<std::path::PathBuf>,
) -> RunningServer {
    let names = ["localhost".to_string(), "127.0.0.1".to_string()];
    let mut c = ServerConfig::new(
        ([127, 0, 0, 1], 0).into(),
        ServerIdentity::generate(&names).unwrap(),
    );
    c.faults = faults;
    c.record = record;
    c.io_timeout = Duration::from_secs(5);
    // Work ahead at normal priority: on a busy test machine an idle-priority thread may never run.
    c.prepare_idle = false;
    spawn(w.clone(), c).unwrap()
}

fn remote(a: &RunningServer, b: &RunningServer) -> Remote {
    Remote {
        servers: parse_pair(&[a.url(), b.url()]).unwrap(),
        trust: [Trust::pin(&a.pin).unwrap(), Trust::pin(&b.pin).unwrap()],
        timeout: Duration::from_secs(30),
    }
}

/// The client model connected to `a` and `b`.
fn client(
    cfg: &LlamaConfig,
    w: &Weights,
    a: &RunningServer,
    b: &RunningServer,
) -> (Llama, Arc<ShareSession>) {
    let (llama, session, built) = ShareModel::build(cfg, w, Format::default(), false).unwrap();
    let mut m = ShareModel {
        llama,
        tokenizer: None,
        eos_ids: vec![],
        session,
        built,
        name: "tiny".into(),
    };
    m.connect(&remote(a, b)).unwrap();
    (m.llama, m.session)
}

fn logits(m: &Llama, ids: &[u32]) -> umbra_model::Result<Vec<f32>> {
    let t = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let l = m.forward(Input::Ids(&t), &mut m.new_cache(), Forward::logits())?;
    Ok(l.flatten_all()?.to_vec1::<f32>()?)
}

fn greedy(n: usize) -> GenerateParams {
    GenerateParams {
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    }
}

const PROMPT: [u32; 7] = [1, 17, 42, 99, 3, 250, 7];

#[test]
fn shares_give_the_local_ring_result_bit_for_bit_and_track_f32() {
    let (cfg, w) = model(1);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let (a, b) = (
        server(&pw, Faults::default(), None),
        server(&pw, Faults::default(), None),
    );
    let (share, session) = client(&cfg, &w, &a, &b);
    let (local_llama, local_session, built) =
        ShareModel::build(&cfg, &w, Format::default(), true).unwrap();
    local_session.set_transport(umbra_share::backend::Transport::Local(built.matrices));
    assert_eq!(built.fingerprint, pw.fingerprint);
    let plain = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let s = logits(&share, &PROMPT).unwrap();
    assert_eq!(
        s,
        logits(&local_llama, &PROMPT).unwrap(),
        "shares must sum to the ring product exactly"
    );
    let p = logits(&plain, &PROMPT).unwrap();
    let scale = p.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = s
        .iter()
        .zip(&p)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff < 2e-3 * scale, "share vs f32: {diff} of {scale}");
    // One round trip per map per step, all prompt rows together.
    let maps = 4 * cfg.num_hidden_layers as u64 + 1;
    assert_eq!(session.stats().link.round_trips, maps);
    let g1 = generate(&share, &PROMPT, &greedy(12), |_| true)
        .unwrap()
        .ids;
    let g2 = generate(&plain, &PROMPT, &greedy(12), |_| true)
        .unwrap()
        .ids;
    assert_eq!(g1, g2);
    assert_eq!(session.stats().link.round_trips, maps * 13);
    assert!(a.stats.jobs.load(std::sync::atomic::Ordering::Relaxed) >= maps * 13);
}

#[test]
fn a_server_with_another_model_is_refused_at_connect() {
    let (cfg, w) = model(1);
    let (_, other) = model(2);
    let ours = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let theirs = Arc::new(PublicWeights::from_weights(&cfg, &other, "other".into()).unwrap());
    let (a, b) = (
        server(&ours, Faults::default(), None),
        server(&theirs, Faults::default(), None),
    );
    let (llama, session, built) = ShareModel::build(&cfg, &w, Format::default(), false).unwrap();
    let mut m = ShareModel {
        llama,
        tokenizer: None,
        eos_ids: vec![],
        session,
        built,
        name: "t".into(),
    };
    let e = m.connect(&remote(&a, &b)).unwrap_err().to_string();
    assert!(
        e.contains(&format!("B {}", b.url())) && e.contains("another model"),
        "{e}"
    );
}

/// A raw TLS connection that has done HELLO/WELCOME.
fn raw(s: &RunningServer, fp: &[u8; 32]) -> StreamOwned<ClientConnection, TcpStream> {
    let cfg = Trust::pin(&s.pin).unwrap().client_config().unwrap();
    let tcp = TcpStream::connect(s.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = ClientConnection::new(cfg, "127.0.0.1".try_into().unwrap()).unwrap();
    let mut t = StreamOwned::new(conn, tcp);
    t.write_all(&frame::hello(fp)).unwrap();
    t.flush().unwrap();
    let (kind, _) = read(&mut t).unwrap();
    assert_eq!(kind, frame::WELCOME);
    t
}

fn read(t: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; frame::HEADER];
    t.read_exact(&mut h)?;
    let (len, kind) = frame::parse_header(h).unwrap();
    let mut b = vec![0u8; len];
    t.read_exact(&mut b)?;
    Ok((kind, b))
}

fn expect_error(t: &mut StreamOwned<ClientConnection, TcpStream>, needle: &str) {
    let (kind, body) = read(t).unwrap();
    assert_eq!(kind, frame::ERROR);
    let (_, m) = frame::parse_error(&body);
    assert!(m.contains(needle), "`{m}` lacks `{needle}`");
    // ... and the server closed the connection.
    assert!(read(t).is_err());
}

#[test]
fn bad_frames_get_clear_errors_and_the_server_keeps_serving() {
    let (cfg, w) = model(1);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let s = server(&pw, Faults::default(), None);
    let fp = pw.fingerprint;
    let k = pw.table[0].0 as usize;
    let mut buf = vec![];
    // Unknown layer id.
    let mut t = raw(&s, &fp);
    frame::product(&mut buf, 0, 999, 1, &vec![0; k]);
    t.write_all(&buf).unwrap();
    expect_error(&mut t, "unknown layer id 999");
    // Wrong width.
    let mut t = raw(&s, &fp);
    frame::product(&mut buf, 0, 0, 2, &vec![0; 2 * k - 1]);
    t.write_all(&buf).unwrap();
    expect_error(&mut t, "wrong width");
    // No rows.
    let mut t = raw(&s, &fp);
    frame::product(&mut buf, 0, 0, 0, &[]);
    t.write_all(&buf).unwrap();
    expect_error(&mut t, "0 rows");
    // Oversized: refused from the header alone.
    let mut t = raw(&s, &fp);
    t.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
    t.write_all(&[frame::PRODUCT]).unwrap();
    t.flush().unwrap();
    expect_error(&mut t, "exceeds");
    // Server B's frames: MASKED or PREPARE before the SEED, a second SEED, too many rows.
    let mut t = raw(&s, &fp);
    buf.clear();
    frame::masked(&mut buf, 0, 0, 1, 0);
    t.write_all(&buf).unwrap();
    expect_error(&mut t, "before the connection's SEED");
    let mut t = raw(&s, &fp);
    t.write_all(&frame::seed(&[1; 32])).unwrap();
    t.write_all(&frame::seed(&[2; 32])).unwrap();
    expect_error(&mut t, "a second SEED");
    let mut t = raw(&s, &fp);
    t.write_all(&frame::seed(&[1; 32])).unwrap();
    buf.clear();
    frame::prepare(&mut buf, 0, 8192, &[1, 2]);
    t.write_all(&buf).unwrap();
    expect_error(&mut t, "PREPARE of 2 streams x 8192 rows");
    let mut t = raw(&s, &fp);
    t.write_all(&frame::seed(&[1; 32])).unwrap();
    buf.clear();
    frame::masked(&mut buf, 0, 999, 1, 0);
    t.write_all(&buf).unwrap();
    expect_error(&mut t, "unknown layer id 999");
    // A MASKED request is answered with the product of the mask the seed gives.
    let mut t = raw(&s, &fp);
    t.write_all(&frame::seed(&[4; 32])).unwrap();
    buf.clear();
    frame::masked(&mut buf, 3, 0, 2, 77);
    t.write_all(&buf).unwrap();
    let (kind, body) = read(&mut t).unwrap();
    assert_eq!(kind, frame::RESULT);
    let mut r = vec![0u64; 2 * k];
    umbra_share::prepare::mask(&[4; 32], 77, &mut r);
    let n = pw.table[0].1 as usize;
    let mut y = vec![];
    frame::get_u64s(&body[frame::RESULT_HEAD..], &mut y);
    let d = umbra_share::ring::Digits::new(&r, 2, k).unwrap();
    let mut want = vec![0u64; 2 * n];
    umbra_share::ring::gemm(
        umbra_share::ring::Kernel::Portable,
        &d,
        &pw.matrices[0],
        &mut want,
        None,
    )
    .unwrap();
    assert_eq!(y, want);
    // Not a client: bad HELLO.
    let cfg_tls = Trust::pin(&s.pin).unwrap().client_config().unwrap();
    let tcp = TcpStream::connect(s.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut t = StreamOwned::new(
        ClientConnection::new(cfg_tls, "127.0.0.1".try_into().unwrap()).unwrap(),
        tcp,
    );
    let mut h = frame::hello(&fp);
    h[5] = b'X';
    t.write_all(&h).unwrap();
    expect_error(&mut t, "bad HELLO");
    // Truncated: a header announcing more than is sent, then the client disappears.
    let mut t = raw(&s, &fp);
    frame::product(&mut buf, 0, 0, 1, &vec![0; k]);
    t.write_all(&buf[..buf.len() / 2]).unwrap();
    t.flush().unwrap();
    drop(t);
    // The server still answers a well-formed request on a new connection.
    let mut t = raw(&s, &fp);
    frame::product(&mut buf, 5, 0, 1, &vec![1; k]);
    t.write_all(&buf).unwrap();
    let (kind, body) = read(&mut t).unwrap();
    assert_eq!(kind, frame::RESULT);
    assert_eq!(frame::parse_result_head(&body).unwrap(), (5, 1));
    assert_eq!(body.len(), frame::RESULT_HEAD + pw.table[0].1 as usize * 8);
}

#[test]
fn server_b_answers_decode_steps_from_products_computed_ahead_bit_for_bit() {
    use std::sync::atomic::Ordering::Relaxed;
    let (cfg, w) = model(2);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    // A is slow, so B's work ahead has time to run.
    let slow = Faults {
        delay: Duration::from_millis(2),
        ..Faults::default()
    };
    let (a, b) = (
        server(&pw, slow, None),
        server(&pw, Faults::default(), None),
    );
    let (share, session) = client(&cfg, &w, &a, &b);
    let (local, local_session, built) =
        ShareModel::build(&cfg, &w, Format::default(), true).unwrap();
    local_session.set_transport(umbra_share::backend::Transport::Local(built.matrices));
    let steps = 24;
    let mut got = vec![];
    let mut want = vec![];
    for (m, out) in [(&share, &mut got), (&local, &mut want)] {
        let mut cache = m.new_cache();
        let mut ids = PROMPT.to_vec();
        let mut pos = 0;
        for _ in 0..steps {
            let t = Tensor::new(&ids[pos..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let l = m
                .forward(Input::Ids(&t), &mut cache, Forward::last_logits())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            pos = ids.len();
            let next = (0..l.len()).max_by(|&i, &j| l[i].total_cmp(&l[j])).unwrap();
            ids.push(next as u32);
            out.push(l);
        }
    }
    assert_eq!(
        got, want,
        "products computed ahead must be the same ring products"
    );
    let maps = 4 * cfg.num_hidden_layers as u64 + 1;
    let (hits, misses) = (
        b.stats.prepared_hits.load(Relaxed),
        b.stats.prepared_misses.load(Relaxed),
    );
    assert_eq!(
        hits + misses,
        maps * steps as u64,
        "every request of B is MASKED"
    );
    // Nothing is prepared for the prefill and the first decode step, except the head: in the
    // prefill it sees the last row only, so its call at the first step was announced.
    assert!(
        misses >= 2 * maps - 1,
        "{hits} hits, {misses} misses, {maps} maps"
    );
    assert!(
        hits > 0,
        "no decode step was answered from work ahead ({misses} misses)"
    );
    assert!(b.stats.prepared_rows.load(Relaxed) >= hits);
    assert_eq!(
        a.stats.prepared_hits.load(Relaxed) + a.stats.prepared_misses.load(Relaxed),
        0
    );
    // B never received a mask: the client sent A the shares, B stream numbers only.
    let link = session.stats().link;
    let a_shares: u64 = PROMPT.len() as u64 * built.table.iter().map(|t| t.0 as u64).sum::<u64>()
        + (steps as u64 - 1) * built.table.iter().map(|t| t.0 as u64).sum::<u64>();
    assert!(
        link.bytes_sent < a_shares * 8 + maps * steps as u64 * 256,
        "sent {} bytes, A's shares alone are {}",
        link.bytes_sent,
        a_shares * 8
    );
}

#[test]
fn a_corrupted_product_computed_ahead_is_caught() {
    let (cfg, w) = model(1);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let slow = Faults {
        delay: Duration::from_millis(2),
        ..Faults::default()
    };
    let bad = Faults {
        corrupt_prepared: true,
        ..Faults::default()
    };
    let (a, b) = (server(&pw, slow, None), server(&pw, bad, None));
    let (share, session) = client(&cfg, &w, &a, &b);
    let mut seen = 0;
    let e = generate(&share, &PROMPT, &greedy(24), |_| {
        seen += 1;
        true
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("integrity check failed"), "{e}");
    assert!(seen < 24, "all {seen} tokens released");
    assert!(
        b.stats
            .prepared_hits
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert!(session.poisoned().is_some());
}

#[test]
fn a_corrupted_product_is_caught_on_that_step() {
    let (cfg, w) = model(1);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let maps = 4 * cfg.num_hidden_layers as u64 + 1;
    // Job maps + 5 is decode step 1's map 5 (block 1's o projection): one element, +1.
    let bad = Faults {
        corrupt: Some((maps + 5, 3)),
        ..Faults::default()
    };
    let (a, b) = (server(&pw, bad, None), server(&pw, Faults::default(), None));
    let (share, session) = client(&cfg, &w, &a, &b);
    let mut seen = vec![];
    let e = generate(&share, &PROMPT, &greedy(8), |t| {
        seen.push(t);
        true
    })
    .unwrap_err()
    .to_string();
    assert_eq!(seen.len(), 1, "only the prefill's token is released");
    assert!(e.contains("integrity check failed at layer 1 o"), "{e}");
    assert!(session.poisoned().is_some());
    // The session refuses to go on with these servers.
    let e2 = logits(&share, &PROMPT).unwrap_err().to_string();
    assert!(e2.contains("stopped after a failed check"), "{e2}");
}

#[test]
fn a_server_that_stops_mid_generation_ends_the_request_naming_it() {
    let (cfg, w) = model(1);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let stop = Faults {
        stop_after: Some(20),
        ..Faults::default()
    };
    let (a, b) = (
        server(&pw, Faults::default(), None),
        server(&pw, stop, None),
    );
    let (share, _) = client(&cfg, &w, &a, &b);
    let t0 = Instant::now();
    let e = generate(&share, &PROMPT, &greedy(8), |_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("share server B {}", b.url())), "{e}");
    assert!(e.contains("closed") || e.contains("connect"), "{e}");
    assert!(e.contains(umbra_serve::api::UPSTREAM_FAILURE), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    // Later calls fail fast too (the server is gone; reconnecting is refused).
    let t1 = Instant::now();
    assert!(logits(&share, &PROMPT).is_err());
    assert!(t1.elapsed() < Duration::from_secs(10));
}

#[test]
fn concurrent_clients_rows_go_through_one_gemm() {
    let (cfg, w) = model(1);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let slow = Faults {
        delay: Duration::from_millis(30),
        ..Faults::default()
    };
    let (a, b) = (server(&pw, slow.clone(), None), server(&pw, slow, None));
    let clients: Vec<_> = (0..3).map(|_| client(&cfg, &w, &a, &b)).collect();
    let plain = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let want = generate(&plain, &PROMPT, &greedy(4), |_| true).unwrap().ids;
    std::thread::scope(|s| {
        for (m, _) in &clients {
            let want = want.clone();
            s.spawn(move || {
                assert_eq!(
                    generate(m, &PROMPT, &greedy(4), |_| true).unwrap().ids,
                    want
                );
            });
        }
    });
    let most = a
        .stats
        .max_connections_per_gemm
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(most >= 2, "no GEMM covered two clients' rows ({most})");
}

#[test]
fn a_transcript_of_the_same_prompt_twice_shares_no_structure() {
    let (cfg, w) = model(1);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.bin");
    let (a, b) = (
        server(&pw, Faults::default(), Some(path.clone())),
        server(&pw, Faults::default(), None),
    );
    let (share, session) = client(&cfg, &w, &a, &b);
    let long: Vec<u32> = (0..64).map(|i| (i * 37 % 300) as u32).collect();
    session.log_plain(true);
    let l1 = logits(&share, &long).unwrap();
    let l2 = logits(&share, &long).unwrap();
    assert_eq!(l1, l2, "same prompt, same result");
    let plain = session.log_plain(false);
    drop(share);
    a.stop();
    let t = Transcript::read(&path).unwrap();
    let maps = t.table.len();
    assert_eq!(t.records.len(), 2 * maps);
    for m in 0..maps {
        let (r1, r2) = (&t.records[m], &t.records[maps + m]);
        assert_eq!((r1.linear, r1.rows), (r2.linear, r2.rows));
        let c = compare(&r1.shares, &r2.shares);
        let n = c.words as f64;
        assert_eq!(c.equal, 0.0, "map {m}: equal words");
        assert!(
            c.correlation.abs() < 5.0 / n.sqrt(),
            "map {m}: correlation {}",
            c.correlation
        );
        assert!(
            (c.hamming_bits - 32.0).abs() < 8.0 * (16.0 / n).sqrt() + 0.1,
            "map {m}: {}",
            c.hamming_bits
        );
        assert!(c.difference.p_value > 1e-4, "map {m}: {:?}", c.difference);
        // Control: unmasked, the two runs are the same words.
        assert_eq!(compare(&plain[m].1, &plain[maps + m].1).equal, 1.0);
    }
    let words: Vec<u64> = t
        .records
        .iter()
        .flat_map(|r| r.shares.iter().copied())
        .collect();
    assert!(
        bytes_chi_square(&words).p_value > 1e-4,
        "{:?}",
        bytes_chi_square(&words)
    );
    assert!(
        bits_chi_square(&words).p_value > 1e-4,
        "{:?}",
        bits_chi_square(&words)
    );
    let unmasked: Vec<u64> = plain.iter().flat_map(|(_, x)| x.iter().copied()).collect();
    assert!(bytes_chi_square(&unmasked).p_value < 1e-12);
    assert!(bits_chi_square(&unmasked).p_value < 1e-12);
}

#[test]
fn ca_trust_works_and_a_wrong_pin_is_refused() {
    let (cfg, w) = model(1);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let names = ["localhost".to_string(), "127.0.0.1".to_string()];
    let id = ServerIdentity::generate(&names).unwrap();
    let ca = id.ca_pem.clone().unwrap();
    let a = spawn(
        pw.clone(),
        ServerConfig::new(([127, 0, 0, 1], 0).into(), id),
    )
    .unwrap();
    let b = server(&pw, Faults::default(), None);
    let (llama, session, built) = ShareModel::build(&cfg, &w, Format::default(), false).unwrap();
    let mut m = ShareModel {
        llama,
        tokenizer: None,
        eos_ids: vec![],
        session,
        built,
        name: "t".into(),
    };
    let mut r = remote(&a, &b);
    r.trust[0] = Trust::ca_pem(&ca).unwrap();
    m.connect(&r).unwrap();
    assert!(logits(&m.llama, &PROMPT).is_ok());
    r.trust[1] = Trust::pin(&a.pin).unwrap(); // A's pin for B
    let e = m.connect(&r).unwrap_err().to_string();
    assert!(
        e.contains(&format!("B {}", b.url())) && e.contains("pin mismatch"),
        "{e}"
    );
    // A CA that did not sign the server's certificate is refused as well.
    let other = ServerIdentity::generate(&names).unwrap();
    r.trust = [
        Trust::ca_pem(other.ca_pem.as_deref().unwrap()).unwrap(),
        Trust::pin(&b.pin).unwrap(),
    ];
    let e = m.connect(&r).unwrap_err().to_string();
    assert!(e.contains(&format!("A {}", a.url())), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_answers_502_naming_a_server_that_stopped() {
    let (cfg, w) = model(1);
    let pw = Arc::new(PublicWeights::from_weights(&cfg, &w, "tiny".into()).unwrap());
    let (a, b) = (
        server(&pw, Faults::default(), None),
        server(&pw, Faults::default(), None),
    );
    let (llama, _) = client(&cfg, &w, &a, &b);
    let sc = umbra_serve::server::ServeConfig::new(
        umbra_serve::server::ModelSource::Loaded {
            model: Box::new(llama),
            tokenizer: None,
            eos_ids: vec![],
        },
        ([127, 0, 0, 1], 0).into(),
    );
    let proxy = umbra_serve::server::start(sc).await.unwrap();
    let url = format!("{}/v1/completions", proxy.url());
    let body = serde_json::json!({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "return_text": false});
    let http = reqwest::Client::new();
    let r = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let b_url = b.url();
    tokio::task::spawn_blocking(move || b.stop()).await.unwrap();
    let t0 = Instant::now();
    let r = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains(&format!("share server B {b_url}")), "{m}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    proxy.stop().await;
}
