//! The client's [`LinearBackend`]: every linear map of the forward pass is computed by the two
//! share servers.
//!
//! Per call of a map `W` (`[n, k]`) on rows `x` (`[rows, k]` F32), [`ShareLinear::forward`]:
//! 1. encodes `x` in fixed point ([`crate::fixed::Format::encode`]: `a`, per-row exponents);
//! 2. draws a fresh mask `r` uniform over `Z_2^64^(rows x k)`: a new ChaCha20 stream under the
//!    seed server B received when its link opened (OS-seeded per connection; never reused,
//!    never derived from the input; [`ShareClient::draw_mask`]);
//! 3. sends `a - r` to server A and the stream's number to server B, which expands the same
//!    `r` (or computed its product ahead), in one round trip ([`ShareClient`]);
//! 4. sums the two products (`(a - r) W^T + r W^T = a W^T` mod 2^64), checks the sum
//!    ([`Checker`]: range + Freivalds) and decodes it to F32 (+ bias, kept by the client).
//!
//! Everything else of the pass (embedding, norms, RoPE, attention with its KV cache, SiLU,
//! residuals, sampling) is the ordinary engine: the model is a [`umbra_model::Llama`] built with
//! this backend, so generation, batching and serving run unchanged. A failed check poisons
//! the session: every later call fails, so no token computed after a wrong product is released.
use crate::check::Checker;
use crate::client::{LinkStats, ShareClient};
use crate::error::{Result, ShareError};
use crate::fixed::{decode, Format};
use crate::public::{quantize_spec, Fingerprint};
use crate::ring::{Digits, Kernel, RingMatrix};
use candle_core::Tensor;
use rand::{SeedableRng, TryRngCore};
use rand_chacha::ChaCha20Rng;
use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use umbra_model::linear::{Linear, LinearBackend, LinearId, LinearSpec};
use umbra_model::{ModelError, Weights};

/// A ChaCha20 generator seeded with 32 bytes from the operating system (an error if the OS
/// source fails: masks are never drawn from a weaker source).
pub fn os_chacha() -> Result<ChaCha20Rng> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| ShareError::Config(format!("no OS randomness for the masks: {e}")))?;
    Ok(ChaCha20Rng::from_seed(seed))
}

/// Where the products come from.
pub enum Transport {
    /// The two share servers.
    Remote(Box<ShareClient>),
    /// The same ring arithmetic in this process, on the unshared input (tests and the
    /// "arithmetic alone" fidelity runs: what the servers return summed, bit for bit).
    Local(Vec<RingMatrix>),
    /// Not connected yet.
    None,
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SessionStats {
    /// Map calls (one round trip each when remote).
    pub calls: u64,
    /// Rows sent (sum over calls).
    pub rows: u64,
    /// Seconds the client spent encoding, masking, checking and decoding.
    pub client_s: f64,
    pub link: LinkStats,
}

/// Buffers reused across calls (one call at a time holds the session lock).
#[derive(Default)]
struct Scratch {
    /// The encoded input `[rows, k]`.
    a: Vec<u64>,
    exps: Vec<i32>,
    /// The mask `r` (server B's share, sent as its stream) and `a - r` (server A's).
    r: Vec<u64>,
    am: Vec<u64>,
    za: Vec<u64>,
    zb: Vec<u64>,
    /// The summed products `[rows, n]`.
    z: Vec<u64>,
}

struct State {
    transport: Transport,
    scratch: Scratch,
    poisoned: Option<String>,
    stats: SessionStats,
    /// Test hook: every call also records `(linear, a)` (the encoded input a server would see
    /// without sharing), the attack suite's plaintext control.
    plain_log: Option<Vec<(u32, Vec<u64>)>>,
}

/// Shared state of a share-mode model (its links, the mask stream, counters).
pub struct ShareSession {
    format: Format,
    state: Mutex<State>,
}

impl std::fmt::Debug for ShareSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareSession")
            .field("format", &self.format)
            .finish()
    }
}

impl ShareSession {
    pub fn new(format: Format) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            format,
            state: Mutex::new(State {
                transport: Transport::None,
                scratch: Scratch::default(),
                poisoned: None,
                stats: SessionStats::default(),
                plain_log: None,
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn set_transport(&self, t: Transport) {
        self.lock().transport = t;
    }

    pub fn stats(&self) -> SessionStats {
        let s = self.lock();
        let mut st = s.stats;
        if let Transport::Remote(c) = &s.transport {
            st.link = c.stats();
        }
        st
    }

    /// Starts (or stops, with `false`) recording the encoded unshared inputs (tests only).
    pub fn log_plain(&self, on: bool) -> Vec<(u32, Vec<u64>)> {
        let mut s = self.lock();
        let old = s.plain_log.take().unwrap_or_default();
        if on {
            s.plain_log = Some(vec![]);
        }
        old
    }

    /// The reason the session refuses to continue, if a check failed.
    pub fn poisoned(&self) -> Option<String> {
        self.lock().poisoned.clone()
    }
}

/// One map computed on shares.
pub struct ShareLinear {
    index: u32,
    id: LinearId,
    n: usize,
    k: usize,
    scale: Vec<f32>,
    bias: Option<Vec<f32>>,
    checker: Checker,
    session: Arc<ShareSession>,
}

impl std::fmt::Debug for ShareLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShareLinear({}, [{}, {}])", self.id, self.n, self.k)
    }
}

/// Marks an error from the share servers for the OpenAI proxy, which answers it with 502.
pub fn model_error(e: ShareError) -> ModelError {
    let upstream = matches!(e, ShareError::Server { .. } | ShareError::Integrity { .. });
    let msg = if upstream {
        format!("{}{e}", umbra_serve::api::UPSTREAM_FAILURE)
    } else {
        e.to_string()
    };
    ModelError::Candle(candle_core::Error::Msg(msg))
}

impl ShareLinear {
    fn run(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, k) = x.dims2()?;
        if k != self.k {
            return Err(ShareError::Shape(format!(
                "{}: rows of {k} values for a map of {} inputs",
                self.id, self.k
            )));
        }
        let mut st = self.session.lock();
        let t0 = Instant::now();
        if let Some(p) = &st.poisoned {
            return Err(ShareError::Integrity {
                layer: self.id.to_string(),
                message: format!("this session stopped after a failed check ({p})"),
            });
        }
        let st = &mut *st;
        let sc = &mut st.scratch;
        sc.a.resize(rows * k, 0);
        sc.exps.resize(rows, 0);
        let format = self.session.format;
        match umbra_model::kernels::with_f32(x, |xs| {
            format.encode(xs, k, &mut sc.a, &mut sc.exps, &self.id)
        }) {
            Some(r) => r?,
            None => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                format.encode(&xs, k, &mut sc.a, &mut sc.exps, &self.id)?;
            }
        }
        if let Some(log) = &mut st.plain_log {
            log.push((self.index, sc.a.clone()));
        }
        sc.z.resize(rows * self.n, 0);
        let mut prep = t0.elapsed().as_secs_f64();
        match &mut st.transport {
            Transport::None => return Err(ShareError::Config("not connected".into())),
            Transport::Local(ms) => {
                let m = ms.get(self.index as usize).ok_or_else(|| {
                    ShareError::Config(format!("no local matrix for {}", self.id))
                })?;
                let d = Digits::new(&sc.a, rows, k)?;
                crate::ring::gemm(Kernel::best(), &d, m, &mut sc.z, None)?;
            }
            Transport::Remote(c) => {
                let t1 = Instant::now();
                let stream = c.draw_mask(rows * k, &mut sc.r)?;
                sc.am.resize(rows * k, 0);
                crate::lanes::sub(&sc.a, &sc.r, &mut sc.am);
                prep += t1.elapsed().as_secs_f64();
                c.round_trip(
                    self.index,
                    rows,
                    &sc.am,
                    stream,
                    self.n,
                    [&mut sc.za, &mut sc.zb],
                )?;
                let t2 = Instant::now();
                crate::lanes::add(&sc.za, &sc.zb, &mut sc.z);
                prep += t2.elapsed().as_secs_f64();
            }
        }
        let t3 = Instant::now();
        if let Err(e) = self.checker.verify(&sc.a, &sc.z, &self.id) {
            st.poisoned = Some(e.to_string());
            return Err(e);
        }
        let mut y = vec![0f32; rows * self.n];
        decode(&sc.z, &sc.exps, &self.scale, self.bias.as_deref(), &mut y);
        st.stats.calls += 1;
        st.stats.rows += rows as u64;
        st.stats.client_s += prep + t3.elapsed().as_secs_f64();
        Ok(Tensor::from_vec(y, (rows, self.n), x.device())?)
    }
}

impl Linear for ShareLinear {
    fn forward(&self, x: &Tensor) -> umbra_model::Result<Tensor> {
        self.run(x).map_err(model_error)
    }

    fn in_features(&self) -> usize {
        self.k
    }

    fn out_features(&self) -> usize {
        self.n
    }
}

/// What the backend learned while the model was built.
#[derive(Debug, Clone)]
pub struct Built {
    pub fingerprint: [u8; 32],
    /// `(in, out)` per map, in build order.
    pub table: Vec<(u32, u32)>,
    pub ids: Vec<LinearId>,
    /// Freivalds vectors per map and the bits of the integrity bound they give.
    pub check_vectors: Vec<usize>,
    pub check_bits: Vec<u32>,
    /// Largest row L1 norm of each quantized map.
    pub l1_max: Vec<u64>,
    /// The quantized weights, kept only with [`ShareBackend::keep_weights`] (local transport).
    pub matrices: Vec<RingMatrix>,
}

/// Builds [`ShareLinear`]s while [`umbra_model::Llama::with_backend`] loads a model.
pub struct ShareBackend<'w> {
    weights: &'w Weights,
    session: Arc<ShareSession>,
    checks: RefCell<ChaCha20Rng>,
    fingerprint: RefCell<Fingerprint>,
    built: RefCell<Built>,
    keep: bool,
}

impl<'w> ShareBackend<'w> {
    /// `weights`: the checkpoint; the Freivalds vectors come from a fresh OS-seeded stream.
    pub fn new(weights: &'w Weights, session: Arc<ShareSession>) -> Result<Self> {
        Ok(Self {
            weights,
            session,
            checks: RefCell::new(os_chacha()?),
            fingerprint: RefCell::new(Fingerprint::new()),
            built: RefCell::new(Built {
                fingerprint: [0; 32],
                table: vec![],
                ids: vec![],
                check_vectors: vec![],
                check_bits: vec![],
                l1_max: vec![],
                matrices: vec![],
            }),
            keep: false,
        })
    }

    /// Also keeps the quantized matrices (for [`Transport::Local`]).
    pub fn keep_weights(mut self) -> Self {
        self.keep = true;
        self
    }

    /// Everything recorded, with the final fingerprint.
    pub fn finish(self) -> Built {
        let mut b = self.built.into_inner();
        b.fingerprint = self.fingerprint.into_inner().finish();
        b
    }

    fn build_share(&self, spec: &LinearSpec) -> Result<ShareLinear> {
        let l = quantize_spec(spec, self.weights)?;
        let format = self.session.format;
        format.check_matrix(l.quant.l1_max(), &spec.id.to_string())?;
        let checker = Checker::new(&l.quant, &format, &mut *self.checks.borrow_mut());
        let mut b = self.built.borrow_mut();
        let index = b.table.len();
        self.fingerprint.borrow_mut().add(index, &l);
        b.table.push((l.quant.k as u32, l.quant.n as u32));
        b.ids.push(l.id);
        b.check_vectors.push(checker.vectors());
        b.check_bits.push(checker.bits);
        b.l1_max.push(l.quant.l1_max());
        if self.keep {
            b.matrices
                .push(RingMatrix::new(l.quant.n, l.quant.k, &l.quant.q)?);
        }
        Ok(ShareLinear {
            index: index as u32,
            id: l.id,
            n: l.quant.n,
            k: l.quant.k,
            scale: l.quant.scale,
            bias: l.bias,
            checker,
            session: self.session.clone(),
        })
    }
}

impl LinearBackend for ShareBackend<'_> {
    fn build(&self, spec: &LinearSpec) -> umbra_model::Result<Arc<dyn Linear>> {
        let l = self
            .build_share(spec)
            .map_err(|e| ModelError::Input(e.to_string()))?;
        Ok(Arc::new(l))
    }

    fn name(&self) -> &str {
        "shares"
    }
}
