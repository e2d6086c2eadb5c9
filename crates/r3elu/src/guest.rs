//! The guest: features and the bottom model; it publishes its rows through the cut layer and
//! trains the bottom on the gradients the host sends back.
//!
//! Shapes: the bottom maps `[B, d] -> [B, N]` (`relu(MLP(x))`), the cut layer publishes
//! `[B, N]`.
use crate::config::{make_cut, SharedCut, SplitConfig};
use crate::error::{R3Error, Result};
use crate::host::HostReport;
use crate::wire::{recv, tensor_msg, EVAL_CHUNK};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use umbra_common::progress::Progress;
use umbra_vfl::cut::CutLayer;
use umbra_vfl::message::{Envelope, Kind};
use umbra_vfl::model::{grads_of, Adam, Mlp};
use umbra_vfl::party::Batches;
use umbra_vfl::transport::Transport;

/// The guest's bottom model: `relu(MLP(x))`, two layers `d -> hidden -> N`.
#[derive(Debug, Clone)]
pub struct Bottom {
    pub mlp: Mlp,
}

impl Bottom {
    pub fn new(d: usize, cfg: &SplitConfig) -> Result<Self> {
        Ok(Bottom {
            mlp: Mlp::new(d, cfg.hidden, cfg.cut, 2, cfg.seed ^ 0xB0)?,
        })
    }

    /// `[B, d] -> [B, N]`, non-negative.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.mlp.forward(x)?.relu()?)
    }
}

/// What the guest publishes for rows `x` (`[rows, d]` row-major): `[rows, N]`, no graph kept.
/// Each call is one release of every row in `x`.
pub fn smash(
    bottom: &Bottom,
    cut: &dyn CutLayer,
    x: &[f32],
    d: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for chunk in x.chunks(512 * d.max(1)) {
        let r = chunk.len() / d.max(1);
        let t = Tensor::from_slice(chunk, (r, d), &Device::Cpu)?;
        let v = bottom.forward(&t)?.detach();
        let p = cut.forward(&v, rng)?;
        out.extend(p.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The guest: trains its bottom through the host's gradients, then publishes the test rows.
/// Returns the trained bottom, its cut layer and the host's report.
pub fn run_guest(
    t: &dyn Transport,
    cfg: &SplitConfig,
    train_x: &[f32],
    test_x: &[f32],
    d: usize,
) -> Result<(Bottom, SharedCut, HostReport)> {
    cfg.validate()?;
    let n = train_x.len() / d.max(1);
    if n != cfg.sizes.train || test_x.len() / d.max(1) != cfg.sizes.test {
        return Err(R3Error::Config(
            "guest data does not match the sizes of the job".into(),
        ));
    }
    let (cut, r3) = make_cut(cfg)?;
    let mut grad_sub = t.subscribe("grad")?;
    let mut ctrl = t.subscribe("ctrl.guest")?;
    // wait for the host, then say hello
    loop {
        let m = recv(&mut ctrl, "ready")?;
        if m.kind == Kind::Ready && m.job == cfg.job {
            break;
        }
    }
    t.publish(
        "ctrl.host",
        Envelope::control(Kind::Ready, &cfg.job, 0, 0, "hello").encode(),
    )?;
    let bottom = Bottom::new(d, cfg)?;
    let vars = bottom.mlp.vars();
    let mut opt = Adam::new(&vars, cfg.lr)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6E57);
    let batches = Batches::new(n, cfg.batch, cfg.seed);
    let pb = Progress::maybe(
        !cfg.progress,
        cfg.steps() as u64,
        &format!("split {} {}", cfg.defense, cfg.data),
    );
    for e in 0..cfg.epochs as u32 {
        for b in 0..batches.count() as u64 {
            let rows = batches.rows(e, b).unwrap_or_default();
            let mut xb = Vec::with_capacity(rows.len() * d);
            for &i in &rows {
                xb.extend_from_slice(&train_x[i * d..(i + 1) * d]);
            }
            let x = Tensor::from_vec(xb, (rows.len(), d), &Device::Cpu)?;
            let v = bottom.forward(&x)?;
            let p = cut.forward(&v, &mut rng)?;
            let pv: Vec<f32> = p.flatten_all()?.to_vec1()?;
            t.publish(
                "emb",
                tensor_msg(Kind::Embedding, &cfg.job, e, b, rows.len(), cfg.cut, &pv),
            )?;
            let g = loop {
                let m = recv(&mut grad_sub, "gradient")?;
                if m.kind == Kind::Gradient && m.epoch == e && m.batch == b {
                    break m.validated_tensor(&cfg.job, Kind::Gradient, rows.len(), cfg.cut)?;
                }
                tracing::debug!("guest: skipping stale {:?} {}/{}", m.kind, m.epoch, m.batch);
            };
            if let Some(r) = &r3 {
                let a: Vec<f32> = v.flatten_all()?.to_vec1()?;
                r.observe(&a, &g, cfg.cut);
            }
            let gt = Tensor::from_vec(g, (rows.len(), cfg.cut), &Device::Cpu)?;
            let store = (p * gt)?.sum_all()?.backward()?;
            opt.step(&vars, &grads_of(&store, &vars)?)?;
            pb.inc(1);
        }
    }
    pb.finish();
    // inference: the test rows go through the same cut layer
    let nt = test_x.len() / d.max(1);
    let mut sent = 0u64;
    for (c, xs) in test_x.chunks(EVAL_CHUNK * d).enumerate() {
        let r = xs.len() / d;
        let pv = smash(&bottom, cut.as_ref(), xs, d, &mut rng)?;
        t.publish(
            "ctrl.host",
            tensor_msg(Kind::Eval, &cfg.job, 0, c as u64, r, cfg.cut, &pv),
        )?;
        sent += 1;
    }
    t.publish(
        "ctrl.host",
        Envelope::control(Kind::EpochEnd, &cfg.job, 0, sent, &nt.to_string()).encode(),
    )?;
    let report = loop {
        let m = recv(&mut ctrl, "report")?;
        if m.kind == Kind::Report && m.job == cfg.job {
            break serde_json::from_str::<HostReport>(&m.text())?;
        }
    };
    t.publish(
        "ctrl.host",
        Envelope::control(Kind::Done, &cfg.job, 0, 0, "").encode(),
    )?;
    t.flush()?;
    Ok((bottom, cut, report))
}
