//! The host: labels and the top model; it trains on the guest's smashed data and sends back
//! gradients through the cut layer's backward mechanism.
//!
//! Shapes: the top maps `[B, N] -> [B, classes]` (logits, cross-entropy).
use crate::config::{make_cut, SplitConfig};
use crate::error::{R3Error, Result};
use crate::wire::{recv, tensor_msg, EVAL_CHUNK, TIMEOUT};
use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use umbra_vfl::message::{Envelope, Kind};
use umbra_vfl::model::{grads_of, Adam, Mlp};
use umbra_vfl::party::Batches;
use umbra_vfl::transport::{Subscription, Transport};

/// What the host reports at the end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostReport {
    pub test_acc: f64,
    pub train_loss: f64,
    pub steps: usize,
}

/// The top model: two layers `N -> top_hidden -> classes`.
pub fn new_top(cfg: &SplitConfig, classes: usize) -> Result<Mlp> {
    Ok(Mlp::new(
        cfg.cut,
        cfg.top_hidden,
        classes,
        2,
        cfg.seed ^ 0x70,
    )?)
}

/// Mean cross-entropy of logits `[B, C]` against classes `y: [B]`.
pub fn cross_entropy(logits: &Tensor, y: &[u32]) -> Result<Tensor> {
    let t = Tensor::from_slice(y, y.len(), logits.device())?;
    Ok(candle_nn::loss::cross_entropy(logits, &t)?)
}

/// Announces itself until the guest says hello (at most [`TIMEOUT`]).
fn handshake(t: &dyn Transport, ctrl: &mut Box<dyn Subscription>, job: &str) -> Result<()> {
    let t0 = Instant::now();
    loop {
        t.publish(
            "ctrl.guest",
            Envelope::control(Kind::Ready, job, 0, 0, "ready").encode(),
        )?;
        t.flush()?;
        if let Some(b) = ctrl.recv_timeout(Duration::from_millis(200))? {
            let m = Envelope::decode(&b)?;
            if m.kind == Kind::Ready && m.job == job {
                return Ok(());
            }
        }
        if t0.elapsed() > TIMEOUT {
            return Err(R3Error::Protocol("the guest never said hello".into()));
        }
    }
}

/// The host: trains the top model on the guest's smashed data, returns gradients through the
/// cut layer's backward mechanism, and evaluates on the published test rows.
pub fn run_host(
    t: &dyn Transport,
    cfg: &SplitConfig,
    y_train: &[u32],
    y_test: &[u32],
    classes: usize,
) -> Result<(Mlp, HostReport)> {
    cfg.validate()?;
    if y_train.len() != cfg.sizes.train || y_test.len() != cfg.sizes.test {
        return Err(R3Error::Config(
            "host labels do not match the sizes of the job".into(),
        ));
    }
    if y_train.iter().chain(y_test).any(|&c| c as usize >= classes) {
        return Err(R3Error::Data("label out of range".into()));
    }
    let (cut, _) = make_cut(cfg)?;
    let mut emb = t.subscribe("emb")?;
    let mut ctrl = t.subscribe("ctrl.host")?;
    handshake(t, &mut ctrl, &cfg.job)?;
    let top = new_top(cfg, classes)?;
    let vars = top.vars();
    let mut opt = Adam::new(&vars, cfg.lr)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x4057);
    let batches = Batches::new(y_train.len(), cfg.batch, cfg.seed);
    let mut last_loss = 0.0;
    let mut steps = 0usize;
    for e in 0..cfg.epochs as u32 {
        let (mut sum, mut cnt) = (0.0f64, 0usize);
        for b in 0..batches.count() as u64 {
            let rows = batches.rows(e, b).unwrap_or_default();
            let m = recv(&mut emb, "smashed data")?;
            if m.kind != Kind::Embedding || m.epoch != e || m.batch != b {
                return Err(R3Error::Protocol(format!(
                    "expected batch {e}/{b}, got {:?} {}/{}",
                    m.kind, m.epoch, m.batch
                )));
            }
            let z = m.validated_tensor(&cfg.job, Kind::Embedding, rows.len(), cfg.cut)?;
            let z = Var::from_tensor(&Tensor::from_vec(z, (rows.len(), cfg.cut), &Device::Cpu)?)?;
            let yb: Vec<u32> = rows.iter().map(|&i| y_train[i]).collect();
            let loss = cross_entropy(&top.forward(z.as_tensor())?, &yb)?;
            let store = loss.backward()?;
            opt.step(&vars, &grads_of(&store, &vars)?)?;
            let gz = store
                .get(z.as_tensor())
                .cloned()
                .unwrap_or(z.as_tensor().zeros_like()?);
            // per-example gradients through the backward mechanism, then back to the mean's scale
            let bsz = rows.len() as f64;
            let gz = (cut.backward(&(gz * bsz)?, &mut rng)? / bsz)?;
            let gv: Vec<f32> = gz.flatten_all()?.to_vec1()?;
            t.publish(
                "grad",
                tensor_msg(Kind::Gradient, &cfg.job, e, b, rows.len(), cfg.cut, &gv),
            )?;
            sum += loss.to_scalar::<f32>()? as f64;
            cnt += 1;
            steps += 1;
        }
        last_loss = sum / cnt.max(1) as f64;
        tracing::info!("host: epoch {e} train loss {last_loss:.4}");
    }
    let test_acc = evaluate(&mut ctrl, cfg, &top, y_test)?;
    let report = HostReport {
        test_acc,
        train_loss: last_loss,
        steps,
    };
    t.publish(
        "ctrl.guest",
        Envelope::control(
            Kind::Report,
            &cfg.job,
            0,
            0,
            &serde_json::to_string(&report)?,
        )
        .encode(),
    )?;
    t.flush()?;
    // wait for the guest's goodbye so nothing is cut off (best effort)
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(10) {
        if let Some(b) = ctrl.recv_timeout(Duration::from_millis(500))? {
            if Envelope::decode(&b).is_ok_and(|m| m.kind == Kind::Done) {
                break;
            }
        }
    }
    Ok((top, report))
}

/// Test accuracy over the evaluation chunks the guest publishes (until `EpochEnd`); every
/// test row must arrive.
fn evaluate(
    ctrl: &mut Box<dyn Subscription>,
    cfg: &SplitConfig,
    top: &Mlp,
    y_test: &[u32],
) -> Result<f64> {
    let (mut correct, mut seen) = (0usize, 0usize);
    loop {
        let m = recv(ctrl, "evaluation")?;
        match m.kind {
            Kind::Eval => {
                let off = (m.batch as usize).saturating_mul(EVAL_CHUNK);
                let r = (m.rows as usize).min(y_test.len().saturating_sub(off));
                let z = m.validated_tensor(&cfg.job, Kind::Eval, r, cfg.cut)?;
                let logits = top.forward(&Tensor::from_vec(z, (r, cfg.cut), &Device::Cpu)?)?;
                let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
                correct += pred
                    .iter()
                    .enumerate()
                    .filter(|(i, &p)| y_test.get(off + i) == Some(&p))
                    .count();
                seen += r;
            }
            Kind::EpochEnd => break,
            _ => {}
        }
    }
    if seen != y_test.len() {
        return Err(R3Error::Protocol(format!(
            "got {seen} test rows, expected {}",
            y_test.len()
        )));
    }
    Ok(correct as f64 / seen.max(1) as f64)
}
