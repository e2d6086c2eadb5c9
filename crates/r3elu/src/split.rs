//! Private SplitNN between a guest (features, bottom model) and a host (labels, top model),
//! talking through `umbra-vfl`'s [`Transport`] (in-process channels or NATS) in lock step.
//!
//! Shapes: the guest's bottom maps `[B, d] -> [B, N]` (`relu(MLP(x))`), the cut layer publishes
//! `[B, N]`, the host's top maps `[B, N] -> [B, classes]` (logits, cross-entropy).
//!
//! Topics: `emb` (guest -> host: training smashed data), `grad` (host -> guest: gradients),
//! `ctrl.host` (guest -> host: hello, eval chunks, end), `ctrl.guest` (host -> guest: ready,
//! report). The batch layout comes from the shared seed (`umbra_vfl::party::Batches`), so only
//! batch ids cross the wire.
use crate::accountant;
use crate::data::{DataKind, Dataset, Sizes};
use crate::error::{R3Error, Result};
use crate::mechanism::{Budget, R3elu, R3eluConfig};
use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use umbra_vfl::cut::{CutLayer, GaussianDp, Identity};
use umbra_vfl::message::{Envelope, Kind};
use umbra_vfl::model::{grads_of, Adam, Mlp};
use umbra_vfl::party::Batches;
use umbra_vfl::transport::{Buffers, InProc, InProcHandle, Subscription, Transport};

/// The defense on the cut layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Defense {
    None,
    R3elu,
    GaussianDp,
}

impl std::fmt::Display for Defense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Defense::None => "none",
            Defense::R3elu => "r3elu",
            Defense::GaussianDp => "gaussian-dp",
        })
    }
}

/// Everything both parties agree on before training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitConfig {
    pub job: String,
    pub data: DataKind,
    pub sizes: Sizes,
    pub defense: Defense,
    /// R3eLU parameters; `r3.eps` is also the per-release epsilon of the Gaussian baseline and
    /// `r3.clip` its L2 row clip.
    pub r3: R3eluConfig,
    /// Target delta of the composed guarantee.
    pub delta: f64,
    /// Per-release delta of the Gaussian baseline.
    pub delta0: f64,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Cut width `N`.
    pub cut: usize,
    pub hidden: usize,
    pub top_hidden: usize,
    pub seed: u64,
    #[serde(skip)]
    pub progress: bool,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            job: "r3elu".into(),
            data: DataKind::FashionMnist,
            sizes: Sizes {
                train: 10_000,
                test: 2_000,
                aux: 5_000,
            },
            defense: Defense::R3elu,
            r3: R3eluConfig::default(),
            delta: 1e-5,
            delta0: 1e-6,
            epochs: 5,
            batch: 64,
            lr: 1e-3,
            cut: 64,
            hidden: 256,
            top_hidden: 128,
            seed: 7,
            progress: false,
        }
    }
}

impl SplitConfig {
    pub fn validate(&self) -> Result<()> {
        if self.defense != Defense::None {
            self.r3.validate()?;
        }
        if self.epochs == 0 || self.batch == 0 || self.cut < 2 || self.hidden == 0 {
            return Err(R3Error::Config(
                "epochs, batch and hidden must be >= 1 and the cut width >= 2".into(),
            ));
        }
        let unit = |d: f64| d > 0.0 && d < 1.0;
        if !unit(self.delta) || !unit(self.delta0) {
            return Err(R3Error::Config("delta must be in (0, 1)".into()));
        }
        Ok(())
    }
    pub fn steps(&self) -> usize {
        self.epochs * self.sizes.train.div_ceil(self.batch)
    }
}

/// A cut layer shared by the threads of a party.
pub type SharedCut = Arc<dyn CutLayer>;

/// The cut layer of a configuration (each party builds its own from the shared config) and,
/// for R3eLU, the handle that tracks the Taylor importance.
pub fn make_cut(cfg: &SplitConfig) -> Result<(SharedCut, Option<Arc<R3elu>>)> {
    Ok(match cfg.defense {
        Defense::None => (Arc::new(Identity), None),
        Defense::R3elu => {
            let r = Arc::new(R3elu::new(cfg.r3)?);
            (r.clone(), Some(r))
        }
        Defense::GaussianDp => (
            Arc::new(GaussianDp {
                clip: cfg.r3.clip,
                sigma: accountant::gaussian_sigma(cfg.r3.eps, cfg.delta0),
            }),
            None,
        ),
    })
}

/// Accounted privacy of a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Privacy {
    /// Per-release epsilon of one record's smashed row.
    pub eps_release: f64,
    /// Strong composition over all training steps (null in JSON when unbounded).
    pub epsilon_total: f64,
    pub delta_total: f64,
    /// Gaussian baseline only: noise multiplier and the vfl mu-GDP CLT accountant's mu.
    pub gaussian_sigma: f64,
    pub mu_clt: f64,
}

pub fn privacy(cfg: &SplitConfig) -> Privacy {
    let gamma = cfg.batch.min(cfg.sizes.train) as f64 / cfg.sizes.train.max(1) as f64;
    let t = cfg.steps();
    match cfg.defense {
        Defense::None => Privacy {
            eps_release: f64::INFINITY,
            epsilon_total: f64::INFINITY,
            delta_total: 0.0,
            gaussian_sigma: 0.0,
            mu_clt: f64::INFINITY,
        },
        Defense::R3elu => Privacy {
            eps_release: cfg.r3.eps,
            epsilon_total: accountant::strong_composition(cfg.r3.eps, gamma, t, cfg.delta),
            delta_total: cfg.delta,
            gaussian_sigma: 0.0,
            mu_clt: f64::INFINITY,
        },
        Defense::GaussianDp => {
            let sigma = accountant::gaussian_sigma(cfg.r3.eps, cfg.delta0);
            // vfl's accountant assumes sensitivity `clip` (add/remove); ours is replace-one (2 clip)
            let mu = umbra_vfl::dp::mu_clt(gamma, t, sigma / 2.0);
            Privacy {
                eps_release: cfg.r3.eps,
                epsilon_total: accountant::strong_composition(cfg.r3.eps, gamma, t, cfg.delta),
                delta_total: cfg.delta + t as f64 * gamma * cfg.delta0,
                gaussian_sigma: sigma,
                mu_clt: mu,
            }
        }
    }
}

/// What the host reports at the end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostReport {
    pub test_acc: f64,
    pub train_loss: f64,
    pub steps: usize,
}

/// Flat JSON of `umbra split train`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub data: String,
    pub defense: String,
    /// Per-release epsilon (null = inf).
    pub epsilon: Option<f64>,
    pub k: f64,
    pub clip: f64,
    pub budget: String,
    pub n_train: usize,
    pub n_test: usize,
    pub epochs: usize,
    pub batch: usize,
    pub cut: usize,
    pub test_acc: f64,
    pub train_loss: f64,
    /// Accounted epsilon over training (null = unbounded).
    pub epsilon_total: Option<f64>,
    pub delta_total: f64,
    pub gaussian_sigma: f64,
    pub mu_clt: Option<f64>,
    pub wall_s: f64,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

impl TrainReport {
    pub fn new(cfg: &SplitConfig, host: &HostReport, wall_s: f64) -> Self {
        let p = privacy(cfg);
        TrainReport {
            data: cfg.data.to_string(),
            defense: cfg.defense.to_string(),
            epsilon: if cfg.defense == Defense::None {
                None
            } else {
                finite(cfg.r3.eps)
            },
            k: cfg.r3.k_frac,
            clip: cfg.r3.clip,
            budget: match cfg.r3.budget {
                Budget::Fine => "fine".into(),
                Budget::Uniform => "uniform".into(),
            },
            n_train: cfg.sizes.train,
            n_test: cfg.sizes.test,
            epochs: cfg.epochs,
            batch: cfg.batch,
            cut: cfg.cut,
            test_acc: host.test_acc,
            train_loss: host.train_loss,
            epsilon_total: finite(p.epsilon_total),
            delta_total: p.delta_total,
            gaussian_sigma: p.gaussian_sigma,
            mu_clt: finite(p.mu_clt),
            wall_s,
        }
    }
}

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

const TIMEOUT: Duration = Duration::from_secs(120);

fn recv(sub: &mut Box<dyn Subscription>, what: &str) -> Result<Envelope> {
    match sub.recv_timeout(TIMEOUT)? {
        Some(b) => Ok(Envelope::decode(&b)?),
        None => Err(R3Error::Protocol(format!(
            "no {what} from the peer within {} s",
            TIMEOUT.as_secs()
        ))),
    }
}

fn tensor_msg(
    kind: Kind,
    job: &str,
    epoch: u32,
    batch: u64,
    r: usize,
    c: usize,
    d: &[f32],
) -> Vec<u8> {
    Envelope::tensor(kind, job, epoch, batch, 0, r, c, d).encode()
}

fn progress(cfg: &SplitConfig, steps: u64, msg: &str) -> indicatif::ProgressBar {
    if !cfg.progress {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(steps);
    pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(s) = indicatif::ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {bar:30} {pos}/{len} ({eta})",
    ) {
        pb.set_style(s);
    }
    pb.set_message(msg.to_string());
    pb
}

/// The guest: trains its bottom through the host's gradients, then publishes the test rows.
/// Returns the trained bottom and the host's report.
pub fn run_guest(
    t: &dyn Transport,
    cfg: &SplitConfig,
    train_x: &[f32],
    test_x: &[f32],
    d: usize,
) -> Result<(Bottom, Arc<dyn CutLayer>, HostReport)> {
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
    let pb = progress(
        cfg,
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
    pb.finish_and_clear();
    // inference: the test rows go through the same cut layer
    let chunk = 500usize;
    let nt = test_x.len() / d.max(1);
    let mut sent = 0u64;
    for (c, xs) in test_x.chunks(chunk * d).enumerate() {
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
    // announce until the guest says hello
    let t0 = Instant::now();
    loop {
        t.publish(
            "ctrl.guest",
            Envelope::control(Kind::Ready, &cfg.job, 0, 0, "ready").encode(),
        )?;
        t.flush()?;
        if let Some(b) = ctrl.recv_timeout(Duration::from_millis(200))? {
            let m = Envelope::decode(&b)?;
            if m.kind == Kind::Ready && m.job == cfg.job {
                break;
            }
        }
        if t0.elapsed() > TIMEOUT {
            return Err(R3Error::Protocol("the guest never said hello".into()));
        }
    }
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
    // evaluation chunks
    let mut correct = 0usize;
    let mut seen = 0usize;
    loop {
        let m = recv(&mut ctrl, "evaluation")?;
        match m.kind {
            Kind::Eval => {
                let r = (m.rows as usize).min(y_test.len().saturating_sub(m.batch as usize * 500));
                let z = m.validated_tensor(&cfg.job, Kind::Eval, r, cfg.cut)?;
                let logits = top.forward(&Tensor::from_vec(z, (r, cfg.cut), &Device::Cpu)?)?;
                let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
                let off = m.batch as usize * 500;
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
    let report = HostReport {
        test_acc: correct as f64 / seen.max(1) as f64,
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
        match ctrl.recv_timeout(Duration::from_millis(500))? {
            Some(b)
                if Envelope::decode(&b)
                    .map(|m| m.kind == Kind::Done)
                    .unwrap_or(false) =>
            {
                break
            }
            Some(_) => {}
            None => {}
        }
    }
    Ok((top, report))
}

/// A trained split model with everything an attacker simulation needs.
pub struct Trained {
    pub cfg: SplitConfig,
    pub bottom: Bottom,
    pub top: Mlp,
    pub cut: Arc<dyn CutLayer>,
    pub report: TrainReport,
}

/// Train both parties in one process (two threads over in-process channels).
pub fn train_inproc(cfg: &SplitConfig, ds: &Dataset) -> Result<Trained> {
    cfg.validate()?;
    let t0 = Instant::now();
    let bus = InProcHandle(InProc::new(Buffers::default()));
    let d = ds.train.d;
    let (host_bus, guest_bus) = (bus.clone(), bus);
    let (bottom, cut, top, host) = std::thread::scope(|s| {
        let h = s.spawn(|| run_host(&host_bus, cfg, &ds.train.y, &ds.test.y, ds.classes));
        let g = run_guest(&guest_bus, cfg, &ds.train.x, &ds.test.x, d);
        let h = h
            .join()
            .map_err(|_| R3Error::Protocol("host thread panicked".into()))?;
        let (top, host) = h?;
        let (bottom, cut, _) = g?;
        Ok::<_, R3Error>((bottom, cut, top, host))
    })?;
    let report = TrainReport::new(cfg, &host, t0.elapsed().as_secs_f64());
    Ok(Trained {
        cfg: cfg.clone(),
        bottom,
        top,
        cut,
        report,
    })
}
