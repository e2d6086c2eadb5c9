//! The two roles of SAP and the training loop between them.
//!
//! - [`Customer`]: embedding layer + blocks `0..k`, frozen. Its clean cut-layer outputs are
//!   computed once per example ([`Customer::cut_outputs`], `len_i x d` values each) and
//!   privatized afresh every time they are sent.
//! - [`Vendor`]: blocks `k..L` with LoRA on query/value, mean pooling over real tokens, linear
//!   head, cross-entropy, AdamW on the LoRA and head parameters only.
//! - [`run_customer`] / [`run_vendor`]: the protocol over any [`Transport`] (in-process threads
//!   or NATS): `Hello` -> `Ready`; per training batch `Train` -> `Ack` (a window of 4 batches in
//!   flight); per evaluation batch `Eval` -> `Logits`; `Done` -> `Report`.
//! - [`run_centralized`]: the baseline where the customer fine-tunes everything itself.
use crate::bert::{mean_pool, BertEncoder, Head};
use crate::error::{Result, SapError};
use crate::privacy::Privatizer;
use crate::wire::{Ctrl, Header, Kind, Msg};
use candle_core::{Device, Module, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use umbra_vfl::transport::Transport;

/// Topic customer -> vendor.
pub const UP: &str = "sap.up";
/// Topic vendor -> customer.
pub const DOWN: &str = "sap.down";
/// Training batches in flight before the customer waits for an `Ack`.
pub const WINDOW: u64 = 4;

/// Training hyper-parameters shared by both roles.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub split_at: usize,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lr: f64,
    pub epochs: usize,
    pub batch: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            split_at: 2,
            lora_rank: 8,
            lora_alpha: 16.0,
            lr: 2e-3,
            epochs: 2,
            batch: 32,
            seed: 0,
        }
    }
}

/// Length-bucketed batches for one epoch ("sortish" sampling): shuffle, sort each window of
/// `16 * batch` examples by length, cut into batches, shuffle the batches. Cuts padding on the
/// vendor without making batches deterministic.
pub fn sortish_batches(lens: &[usize], batch: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let batch = batch.max(1);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.shuffle(rng);
    let mut out = Vec::new();
    for w in order.chunks_mut(batch * 16) {
        w.sort_by_key(|&i| lens[i]);
        out.extend(w.chunks(batch).map(|c| c.to_vec()));
    }
    out.shuffle(rng);
    out
}

/// Pads ragged rows into `[b, tmax, d]` plus a `[b, tmax]` mask.
pub fn pad_rows(rows: &[&[f32]], d: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let b = rows.len();
    let tmax = rows.iter().map(|r| r.len() / d).max().unwrap_or(1).max(1);
    let mut x = vec![0f32; b * tmax * d];
    let mut m = vec![0f32; b * tmax];
    for (i, r) in rows.iter().enumerate() {
        let t = r.len() / d;
        x[i * tmax * d..i * tmax * d + t * d].copy_from_slice(&r[..t * d]);
        m[i * tmax..i * tmax + t].iter_mut().for_each(|v| *v = 1.0);
    }
    Ok((
        Tensor::from_vec(x, (b, tmax, d), dev)?,
        Tensor::from_vec(m, (b, tmax), dev)?,
    ))
}

/// The customer's frozen bottom: embedding layer and blocks `0..k`.
#[derive(Debug, Clone)]
pub struct Customer {
    enc: BertEncoder,
    pub k: usize,
}

impl Customer {
    pub fn new(enc: &BertEncoder, k: usize) -> Result<Self> {
        if k > enc.num_blocks() {
            return Err(SapError::Config(format!(
                "--split-at {k} exceeds the model's {} blocks",
                enc.num_blocks()
            )));
        }
        let mut enc = enc.clone();
        enc.blocks.truncate(k);
        Ok(Customer { enc, k })
    }

    pub fn hidden(&self) -> usize {
        self.enc.hidden()
    }

    /// Clean cut-layer outputs, one `len_i * d` vector per sequence (real tokens only).
    pub fn cut_outputs(&self, seqs: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
        let mut all = self.cut_outputs_at(seqs, batch, &[self.k])?;
        Ok(all.pop().unwrap_or_default())
    }

    /// Clean outputs after the embedding layer and `k` blocks for each `k` in `ks` (all
    /// `<= self.k`), in one pass: `out[j][i]` is sequence `i` at split `ks[j]`.
    /// Sequences are batched by similar length; padding never reaches the output.
    pub fn cut_outputs_at(
        &self,
        seqs: &[Vec<u32>],
        batch: usize,
        ks: &[usize],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        if let Some(k) = ks.iter().find(|&&k| k > self.k) {
            return Err(SapError::Config(format!(
                "split {k} > customer blocks {}",
                self.k
            )));
        }
        let d = self.hidden();
        let dev = Device::Cpu;
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let mut out = vec![vec![Vec::new(); seqs.len()]; ks.len()];
        let pb = crate::progress::bar(seqs.len() as u64, "customer cut layer");
        for chunk in order.chunks(batch.max(1)) {
            let tmax = chunk.iter().map(|&i| seqs[i].len()).max().unwrap_or(1);
            if tmax == 0 {
                return Err(SapError::Data("empty token sequence".into()));
            }
            let mut ids = vec![0u32; chunk.len() * tmax];
            let mut mask = vec![0f32; chunk.len() * tmax];
            for (r, &i) in chunk.iter().enumerate() {
                let s = &seqs[i];
                ids[r * tmax..r * tmax + s.len()].copy_from_slice(s);
                mask[r * tmax..r * tmax + s.len()]
                    .iter_mut()
                    .for_each(|v| *v = 1.0);
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), tmax), &dev)?;
            let mask = Tensor::from_vec(mask, (chunk.len(), tmax), &dev)?;
            let mut h = self.enc.embeddings.forward(&ids)?;
            let bias = BertEncoder::attention_bias(&mask)?;
            let kmax = ks.iter().copied().max().unwrap_or(0);
            for k in 0..=kmax {
                if k > 0 {
                    h = self.enc.forward_blocks(&h, &bias, k - 1..k, false)?;
                }
                for (j, _) in ks.iter().enumerate().filter(|(_, &kk)| kk == k) {
                    let flat: Vec<f32> = h.flatten_all()?.to_vec1()?;
                    for (r, &i) in chunk.iter().enumerate() {
                        let n = seqs[i].len();
                        out[j][i] = flat[r * tmax * d..(r * tmax + n) * d].to_vec();
                    }
                }
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        Ok(out)
    }
}

/// The vendor's top: blocks `k..L` with LoRA, pooling and the head, plus its optimiser.
pub struct Vendor {
    enc: BertEncoder,
    pub k: usize,
    head: Head,
    vars: Vec<Var>,
    opt: AdamW,
}

impl Vendor {
    pub fn new(enc: &BertEncoder, classes: usize, cfg: &TrainConfig) -> Result<Self> {
        let k = cfg.split_at;
        let l = enc.num_blocks();
        if k > l {
            return Err(SapError::Config(format!("split_at {k} exceeds {l} blocks")));
        }
        if classes < 2 {
            return Err(SapError::Config(format!("{classes} classes")));
        }
        let mut enc = enc.clone();
        let mut vars = enc.attach_lora(k..l, cfg.lora_rank, cfg.lora_alpha, cfg.seed ^ 0x10a)?;
        let head = Head::new(enc.hidden(), classes, cfg.seed ^ 0x4ead, &Device::Cpu)?;
        vars.extend(head.vars());
        let opt = AdamW::new(
            vars.clone(),
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        Ok(Vendor {
            enc,
            k,
            head,
            vars,
            opt,
        })
    }

    /// Number of trainable parameters.
    pub fn trainable(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Logits `[b, C]` of rows `[sum(lengths), d]`.
    pub fn logits(&self, rows: &[f32], lengths: &[u32], grad: bool) -> Result<Tensor> {
        let d = self.enc.hidden();
        let mut parts = Vec::with_capacity(lengths.len());
        let mut off = 0usize;
        for &l in lengths {
            let n = l as usize * d;
            let p = rows
                .get(off..off + n)
                .ok_or_else(|| SapError::Message("rows shorter than lengths".into()))?;
            parts.push(p);
            off += n;
        }
        if off != rows.len() {
            return Err(SapError::Message("rows longer than lengths".into()));
        }
        let (x, mask) = pad_rows(&parts, d, &Device::Cpu)?;
        let bias = BertEncoder::attention_bias(&mask)?;
        let h = self
            .enc
            .forward_blocks(&x, &bias, self.k..self.enc.num_blocks(), grad)?;
        Ok(self.head.forward(&mean_pool(&h, &mask)?)?)
    }

    /// One AdamW step on a batch; returns the loss.
    pub fn train_step(&mut self, rows: &[f32], lengths: &[u32], labels: &[u32]) -> Result<f64> {
        let logits = self.logits(rows, lengths, true)?;
        let classes = logits.dim(1)? as u32;
        if labels.iter().any(|&l| l >= classes) {
            return Err(SapError::Message(format!("label out of 0..{classes}")));
        }
        let y = Tensor::from_vec(labels.to_vec(), labels.len(), &Device::Cpu)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        self.opt.backward_step(&loss)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }

    /// Logits as a flat `[b * C]` vector (no gradients).
    pub fn predict(&self, rows: &[f32], lengths: &[u32]) -> Result<Vec<f32>> {
        Ok(self
            .logits(rows, lengths, false)?
            .flatten_all()?
            .to_vec1()?)
    }
}

/// Accuracy of flat logits `[n * c]` against labels.
pub fn accuracy(logits: &[f32], c: usize, labels: &[usize]) -> f64 {
    let n = labels.len();
    if n == 0 || c == 0 {
        return 0.0;
    }
    let correct = logits
        .chunks(c)
        .zip(labels)
        .filter(|(row, &y)| {
            let mut best = 0;
            for j in 1..row.len() {
                if row[j] > row[best] {
                    best = j;
                }
            }
            best == y
        })
        .count();
    correct as f64 / n as f64
}

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
    let pb = crate::progress::bar((steps_per_epoch * cfg.epochs) as u64, "split fine-tuning");
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
    pb.finish_and_clear();
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
    enc: &BertEncoder,
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
    enc: &BertEncoder,
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
/// clean embedding-layer outputs (`cut` computed with `k = 0`), no wire. Returns
/// `(test_acc, train_s)`.
pub fn run_centralized(
    enc: &BertEncoder,
    data: &CustomerData,
    cfg: &TrainConfig,
) -> Result<(f64, f64)> {
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
    let pb = crate::progress::bar(
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
    pb.finish_and_clear();
    let train_s = start.elapsed().as_secs_f64();
    let mut flat = Vec::new();
    let idx: Vec<usize> = (0..data.test_cut.len()).collect();
    for c in idx.chunks(cfg.batch.max(1)) {
        let (rows, lengths) = privatize(&none, data.test_ids, data.test_cut, c, d, &mut rng)?;
        flat.extend(v.predict(&rows, &lengths)?);
    }
    Ok((accuracy(&flat, data.classes, data.test_labels), train_s))
}
