//! The SAP protocol between the two roles of [`crate::roles`] (the two-party training loop).
//!
//! - [`run_customer`] / [`run_vendor`]: the protocol over any [`Transport`] (in-process threads
//!   or NATS): `Hello` -> `Ready`; per training batch `Train` -> `Ack` (a window of 4 batches in
//!   flight); per evaluation batch `Eval` -> `Logits`; `Done` -> `Report`.
//! - [`run_centralized`]: the baseline where the customer fine-tunes everything itself.
use crate::encoder::Encoder;
use crate::error::{Result, SapError};
use crate::privacy::Privatizer;
use crate::roles::{accuracy, correct, sortish_batches, TrainConfig, Vendor};
use crate::wire::{Ctrl, Header, Kind, Msg};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use umbra_common::progress::Progress;
use umbra_vfl::transport::Transport;

/// Topic customer -> vendor.
pub const UP: &str = "sap.up";
/// Topic vendor -> customer.
pub const DOWN: &str = "sap.down";
/// Training batches in flight before the customer waits for an `Ack`.
pub const WINDOW: u64 = 4;

/// What the customer hands the run: its private data, already through its bottom part.
pub struct CustomerData<'a> {
    /// Token ids per example (used for CTI budgets; never sent).
    pub train_ids: &'a [Vec<u32>],
    pub train_cut: &'a [Vec<f32>],
    pub train_labels: &'a [usize],
    pub test_ids: &'a [Vec<u32>],
    pub test_cut: &'a [Vec<f32>],
    pub test_labels: &'a [usize],
    pub classes: usize,
    pub hidden: usize,
}

/// The customer's result of a run.
#[derive(Debug, Clone, Default)]
pub struct CustomerResult {
    pub test_acc: f64,
    /// Per test example, whether the vendor's prediction was right.
    pub correct: Vec<bool>,
    pub train_s: f64,
    pub eval_s: f64,
    pub bytes: u64,
    pub messages: u64,
    pub final_loss: f64,
}

fn privatize(
    p: &Privatizer,
    ids: &[Vec<u32>],
    cut: &[Vec<f32>],
    idx: &[usize],
    d: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let mut rows = Vec::new();
    let mut lengths = Vec::with_capacity(idx.len());
    for &i in idx {
        let mut r = cut[i].clone();
        p.apply(&mut r, &ids[i], d, rng)?;
        rows.extend_from_slice(&r);
        lengths.push(ids[i].len() as u32);
    }
    Ok((rows, lengths))
}

fn recv_msg(
    sub: &mut Box<dyn umbra_vfl::transport::Subscription>,
    timeout: Duration,
    what: &str,
    bytes: &mut u64,
) -> Result<Msg> {
    match sub.recv_timeout(timeout)? {
        Some(b) => {
            *bytes += b.len() as u64;
            Msg::decode(&b)
        }
        None => Err(SapError::Message(format!(
            "timed out after {:?} waiting for {what}",
            timeout
        ))),
    }
}

/// Customer role: sends privatized training batches and evaluation batches, collects the
/// vendor's logits and computes test accuracy.
pub fn run_customer(
    t: &Arc<dyn Transport>,
    data: &CustomerData,
    privatizer: &Privatizer,
    cfg: &TrainConfig,
    timeout: Duration,
) -> Result<CustomerResult> {
    let d = data.hidden;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xc057);
    let mut down = t.subscribe(DOWN)?;
    let mut res = CustomerResult::default();
    let send = |m: Msg, res: &mut CustomerResult| -> Result<()> {
        let b = m.encode()?;
        res.bytes += b.len() as u64;
        res.messages += 1;
        t.publish(UP, b)?;
        Ok(())
    };
    // handshake: repeat Hello until the vendor answers
    let hello = Ctrl::Hello {
        classes: data.classes as u32,
        split_at: cfg.split_at as u32,
        hidden: d as u32,
        lora_rank: cfg.lora_rank as u32,
        lr: cfg.lr,
        seed: cfg.seed,
    };
    let t0 = Instant::now();
    loop {
        send(Msg::control(hello.clone()), &mut res)?;
        t.flush()?;
        if let Some(b) = down.recv_timeout(Duration::from_millis(500))? {
            res.bytes += b.len() as u64;
            if matches!(Msg::decode(&b)?.header.ctrl, Some(Ctrl::Ready)) {
                break;
            }
        }
        if t0.elapsed() > timeout {
            return Err(SapError::Message("vendor did not answer Hello".into()));
        }
    }
    let n = data.train_cut.len();
    let steps_per_epoch = n.div_ceil(cfg.batch.max(1));
    let pb = Progress::new((steps_per_epoch * cfg.epochs) as u64, "split fine-tuning");
    let start = Instant::now();
    let mut sent = 0u64;
    let mut acked = 0u64;
    let lens: Vec<usize> = data.train_ids.iter().map(Vec::len).collect();
    let mut wait_ack = |acked: &mut u64, res: &mut CustomerResult| -> Result<()> {
        let m = recv_msg(&mut down, timeout, "Ack", &mut res.bytes)?;
        match m.header.ctrl {
            Some(Ctrl::Ack { loss, .. }) => {
                *acked += 1;
                res.final_loss = loss;
                pb.inc(1);
                Ok(())
            }
            Some(Ctrl::Ready) => Ok(()),
            other => Err(SapError::Message(format!("expected Ack, got {other:?}"))),
        }
    };
    for epoch in 0..cfg.epochs {
        for (b, idx) in sortish_batches(&lens, cfg.batch, &mut rng)
            .iter()
            .enumerate()
        {
            let (rows, lengths) =
                privatize(privatizer, data.train_ids, data.train_cut, idx, d, &mut rng)?;
            let labels: Vec<u32> = idx.iter().map(|&i| data.train_labels[i] as u32).collect();
            let parts = Msg::activation_parts(
                Kind::Train,
                epoch as u32,
                b as u64,
                d,
                &lengths,
                &labels,
                &rows,
            );
            for m in parts {
                send(m, &mut res)?;
            }
            sent += 1;
            while sent - acked >= WINDOW {
                wait_ack(&mut acked, &mut res)?;
            }
        }
    }
    while acked < sent {
        wait_ack(&mut acked, &mut res)?;
    }
    pb.finish();
    res.train_s = start.elapsed().as_secs_f64();
    // inference through the same path
    let e0 = Instant::now();
    let test_idx: Vec<usize> = (0..data.test_cut.len()).collect();
    let chunks: Vec<&[usize]> = test_idx.chunks(cfg.batch.max(1)).collect();
    let mut logits: Vec<Option<Vec<f32>>> = vec![None; chunks.len()];
    let mut next = 0usize;
    let mut got = 0usize;
    while got < chunks.len() {
        while next < chunks.len() && next - got < WINDOW as usize {
            let (rows, lengths) = privatize(
                privatizer,
                data.test_ids,
                data.test_cut,
                chunks[next],
                d,
                &mut rng,
            )?;
            let parts = Msg::activation_parts(
                Kind::Eval,
                cfg.epochs as u32,
                next as u64,
                d,
                &lengths,
                &[],
                &rows,
            );
            for m in parts {
                send(m, &mut res)?;
            }
            next += 1;
        }
        let m = recv_msg(&mut down, timeout, "Logits", &mut res.bytes)?;
        if m.kind != Kind::Logits {
            continue;
        }
        let b = m.header.batch as usize;
        if b >= chunks.len() || m.payload.len() != chunks[b].len() * data.classes {
            return Err(SapError::Message(format!("bad logits for batch {b}")));
        }
        if logits[b].is_none() {
            logits[b] = Some(m.payload);
            got += 1;
        }
    }
    let flat: Vec<f32> = logits.into_iter().flatten().flatten().collect();
    res.correct = correct(&flat, data.classes, data.test_labels);
    res.test_acc = accuracy(&flat, data.classes, data.test_labels);
    res.eval_s = e0.elapsed().as_secs_f64();
    send(Msg::control(Ctrl::Done), &mut res)?;
    t.flush()?;
    // the report is informational; do not fail the run when it is lost
    if let Ok(Some(b)) = down.recv_timeout(Duration::from_secs(5)) {
        res.bytes += b.len() as u64;
    }
    Ok(res)
}

/// Reassembles a batch sent in parts: returns the whole message once its last part arrived in
/// order; a part out of order (a lost message) drops the partial batch.
fn assemble(pending: &mut Option<Msg>, m: Msg) -> Option<Msg> {
    let h = &m.header;
    if !matches!(m.kind, Kind::Train | Kind::Eval) || h.parts <= 1 {
        return Some(m);
    }
    let continues = pending.as_ref().is_some_and(|p| {
        p.kind == m.kind
            && p.header.epoch == h.epoch
            && p.header.batch == h.batch
            && p.header.parts == h.parts
            && p.header.part + 1 == h.part
    });
    if h.part == 0 {
        *pending = Some(m);
    } else if continues {
        if let Some(p) = pending.as_mut() {
            p.header.part = m.header.part;
            p.header.lengths.extend(m.header.lengths);
            p.header.labels.extend(m.header.labels);
            p.payload.extend(m.payload);
        }
    } else {
        *pending = None;
        return None;
    }
    if pending
        .as_ref()
        .is_some_and(|p| p.header.part + 1 == p.header.parts)
    {
        return pending.take();
    }
    None
}

/// The vendor's result: what it saw (for the attacks) and its counters.
#[derive(Debug, Clone, Default)]
pub struct VendorResult {
    pub steps: u64,
    pub bytes_in: u64,
    pub vendor_s: f64,
    /// Privatized evaluation rows as received, in test order: `(lengths, rows)`.
    pub observed_eval: Vec<(Vec<u32>, Vec<f32>)>,
}

/// Vendor role: builds its top on `Hello`, trains on `Train`, answers `Eval` with logits, ends
/// on `Done`.
pub fn run_vendor(
    t: &Arc<dyn Transport>,
    enc: &Encoder,
    record: bool,
    timeout: Duration,
) -> Result<VendorResult> {
    let mut up = t.subscribe(UP)?;
    let mut res = VendorResult::default();
    let mut vendor: Option<(Vendor, usize)> = None;
    let mut busy = Duration::ZERO;
    let mut observed: Vec<(u64, Vec<u32>, Vec<f32>)> = Vec::new();
    let mut pending: Option<Msg> = None;
    loop {
        let m = recv_msg(&mut up, timeout, "a customer message", &mut res.bytes_in)?;
        let Some(m) = assemble(&mut pending, m) else {
            continue;
        };
        let t0 = Instant::now();
        match (m.kind, m.header.ctrl.clone()) {
            (
                Kind::Control,
                Some(Ctrl::Hello {
                    classes,
                    split_at,
                    hidden,
                    lora_rank,
                    lr,
                    seed,
                }),
            ) => {
                if hidden as usize != enc.hidden() {
                    return Err(SapError::Message(format!(
                        "customer width {hidden} != model width {}",
                        enc.hidden()
                    )));
                }
                if vendor.is_none() {
                    let cfg = TrainConfig {
                        split_at: split_at as usize,
                        lora_rank: lora_rank as usize,
                        lr,
                        seed,
                        ..Default::default()
                    };
                    vendor = Some((Vendor::new(enc, classes as usize, &cfg)?, classes as usize));
                }
                t.publish(DOWN, Msg::control(Ctrl::Ready).encode()?)?;
                t.flush()?;
            }
            (Kind::Control, Some(Ctrl::Done)) => {
                let r = Ctrl::Report {
                    steps: res.steps,
                    bytes_in: res.bytes_in,
                    vendor_s: busy.as_secs_f64(),
                };
                t.publish(DOWN, Msg::control(r).encode()?)?;
                t.flush()?;
                break;
            }
            (Kind::Train, _) => {
                let (v, _) = vendor
                    .as_mut()
                    .ok_or_else(|| SapError::Message("Train before Hello".into()))?;
                let loss = v.train_step(&m.payload, &m.header.lengths, &m.header.labels)?;
                res.steps += 1;
                let ack = Ctrl::Ack {
                    batch: m.header.batch,
                    loss,
                };
                t.publish(DOWN, Msg::control(ack).encode()?)?;
            }
            (Kind::Eval, _) => {
                let (v, c) = vendor
                    .as_ref()
                    .ok_or_else(|| SapError::Message("Eval before Hello".into()))?;
                let out = v.predict(&m.payload, &m.header.lengths)?;
                let reply = Msg {
                    kind: Kind::Logits,
                    header: Header {
                        batch: m.header.batch,
                        cols: *c as u32,
                        ..Default::default()
                    },
                    payload: out,
                };
                t.publish(DOWN, reply.encode()?)?;
                if record {
                    observed.push((m.header.batch, m.header.lengths, m.payload));
                }
            }
            (k, c) => {
                return Err(SapError::Message(format!(
                    "unexpected {k:?} message ({c:?}) at the vendor"
                )))
            }
        }
        busy += t0.elapsed();
    }
    observed.sort_by_key(|o| o.0);
    observed.dedup_by_key(|o| o.0);
    res.observed_eval = observed.into_iter().map(|(_, l, r)| (l, r)).collect();
    res.vendor_s = busy.as_secs_f64();
    Ok(res)
}

/// Both roles in one process over the in-process transport (two threads).
pub fn run_split_inproc(
    enc: &Encoder,
    data: &CustomerData,
    privatizer: &Privatizer,
    cfg: &TrainConfig,
) -> Result<(CustomerResult, VendorResult)> {
    let t: Arc<dyn Transport> = Arc::new(umbra_vfl::transport::InProcHandle(
        umbra_vfl::transport::InProc::new(Default::default()),
    ));
    let timeout = Duration::from_secs(600);
    // the customer repeats Hello until the vendor has subscribed and answered
    let tv = t.clone();
    let encv = enc.clone();
    let vendor = std::thread::spawn(move || run_vendor(&tv, &encv, true, timeout));
    let c = run_customer(&t, data, privatizer, cfg, timeout);
    let v = vendor
        .join()
        .map_err(|_| SapError::Message("vendor thread panicked".into()))?;
    Ok((c?, v?))
}

/// Centralized baseline: the customer fine-tunes LoRA on all blocks and the head itself, on
/// clean embedding-layer outputs (`cut` computed with `k = 0`), no wire.
pub fn run_centralized(
    enc: &Encoder,
    data: &CustomerData,
    cfg: &TrainConfig,
) -> Result<CustomerResult> {
    let cfg0 = TrainConfig {
        split_at: 0,
        ..cfg.clone()
    };
    let mut v = Vendor::new(enc, data.classes, &cfg0)?;
    let d = data.hidden;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xc057);
    let n = data.train_cut.len();
    let lens: Vec<usize> = data.train_ids.iter().map(Vec::len).collect();
    let none = Privatizer::new(crate::privacy::Privacy::None, 1.0, None)?;
    let pb = Progress::new(
        (n.div_ceil(cfg.batch.max(1)) * cfg.epochs) as u64,
        "centralized fine-tuning",
    );
    let start = Instant::now();
    for _ in 0..cfg.epochs {
        for idx in sortish_batches(&lens, cfg.batch, &mut rng).iter() {
            let (rows, lengths) =
                privatize(&none, data.train_ids, data.train_cut, idx, d, &mut rng)?;
            let labels: Vec<u32> = idx.iter().map(|&i| data.train_labels[i] as u32).collect();
            v.train_step(&rows, &lengths, &labels)?;
            pb.inc(1);
        }
    }
    pb.finish();
    let train_s = start.elapsed().as_secs_f64();
    let mut flat = Vec::new();
    let idx: Vec<usize> = (0..data.test_cut.len()).collect();
    for c in idx.chunks(cfg.batch.max(1)) {
        let (rows, lengths) = privatize(&none, data.test_ids, data.test_cut, c, d, &mut rng)?;
        flat.extend(v.predict(&rows, &lengths)?);
    }
    Ok(CustomerResult {
        test_acc: accuracy(&flat, data.classes, data.test_labels),
        correct: correct(&flat, data.classes, data.test_labels),
        train_s,
        ..Default::default()
    })
}
