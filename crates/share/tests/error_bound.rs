//! Every output of every linear map of SmolLM2-135M (`umbra fetch smollm2`), computed on shares
//! by two TLS servers, is within the fixed-point error bound documented in `umbra_share::fixed`
//! of the exact product of the same input with the checkpoint's F32 weights; and the logits of
//! the whole pass stay close to the plaintext F32 model's.
use candle_core::{Device, Tensor};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::{generate, GenerateParams};
use umbra_model::linear::{Linear, LinearBackend, LinearSpec};
use umbra_model::sampling::SamplingParams;
use umbra_model::tokenizer::ChatMessage;
use umbra_model::{Forward, Input, Llama, Weights};
use umbra_share::backend::{ShareBackend, ShareSession, Transport};
use umbra_share::client::{parse_pair, Expect, ShareClient};
use umbra_share::fixed::Format;
use umbra_share::server::{spawn, PublicWeights, ServerConfig};
use umbra_share::tls::{ServerIdentity, Trust};

/// Largest |logit difference| allowed between share mode and the plaintext F32 model on the
/// prompt below (measured 0.0065 over 36 positions, logits spanning about +-30; the per-map
/// bound is rigorous, this end-to-end one is empirical: errors pass through norms, softmax
/// and SiLU, which the documented bound does not cover).
const LOGIT_TOLERANCE: f32 = 0.05;

#[derive(Default)]
struct Log {
    outputs: u64,
    calls: u64,
    maps: std::collections::BTreeSet<String>,
    /// Largest `|y^ - y| / bound` and where.
    worst: f64,
    worst_at: String,
    /// Largest absolute error.
    max_err: f64,
    violations: Vec<String>,
}

/// A share map and the F32 weight it stands for.
struct Checked {
    share: Arc<dyn Linear>,
    what: String,
    n: usize,
    k: usize,
    w: Vec<f32>,
    w_l1: Vec<f64>,
    w_max: Vec<f64>,
    bias: Option<Vec<f32>>,
    format: Format,
    log: Arc<Mutex<Log>>,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checked({})", self.what)
    }
}

/// `sum a[i] b[i]` in f64 with four accumulators (exact enough: 2^-53 relative per step).
fn dot64(x: &[f64], w: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let (xc, wc) = (x.chunks_exact(4), w.chunks_exact(4));
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        for i in 0..4 {
            acc[i] += a[i] * b[i] as f64;
        }
    }
    let tail: f64 = xr.iter().zip(wr).map(|(a, b)| a * *b as f64).sum();
    acc.iter().sum::<f64>() + tail
}

impl Linear for Checked {
    fn forward(&self, x: &Tensor) -> umbra_model::Result<Tensor> {
        let y = self.share.forward(x)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ys = y.flatten_all()?.to_vec1::<f32>()?;
        let mut log = self.log.lock().unwrap();
        log.calls += 1;
        log.maps.insert(self.what.clone());
        for (r, (xr, yr)) in xs
            .chunks_exact(self.k)
            .zip(ys.chunks_exact(self.n))
            .enumerate()
        {
            let x64: Vec<f64> = xr.iter().map(|v| *v as f64).collect();
            let x_max = x64.iter().fold(0f64, |m, v| m.max(v.abs()));
            let x_l1: f64 = x64.iter().map(|v| v.abs()).sum();
            for j in 0..self.n {
                let exact = dot64(&x64, &self.w[j * self.k..(j + 1) * self.k])
                    + self.bias.as_ref().map_or(0.0, |b| b[j] as f64);
                let bound = self.format.error_bound(
                    x_max,
                    x_l1,
                    self.w_l1[j],
                    self.w_max[j],
                    self.k,
                    exact,
                );
                let err = (yr[j] as f64 - exact).abs();
                log.outputs += 1;
                log.max_err = log.max_err.max(err);
                if err / bound > log.worst {
                    log.worst = err / bound;
                    log.worst_at =
                        format!("{} row {r} output {j}: {err:.3e} of {bound:.3e}", self.what);
                }
                // NaN (a broken decode) counts as outside the bound.
                let inside = err <= bound;
                if !inside && log.violations.len() < 10 {
                    log.violations.push(format!(
                        "{} row {r} output {j}: {err:e} > {bound:e}",
                        self.what
                    ));
                }
            }
        }
        Ok(y)
    }

    fn in_features(&self) -> usize {
        self.k
    }

    fn out_features(&self) -> usize {
        self.n
    }
}

struct CheckedBackend<'w> {
    inner: ShareBackend<'w>,
    weights: &'w Weights,
    format: Format,
    log: Arc<Mutex<Log>>,
}

impl LinearBackend for CheckedBackend<'_> {
    fn build(&self, spec: &LinearSpec) -> umbra_model::Result<Arc<dyn Linear>> {
        let share = self.inner.build(spec)?;
        let (w, b) = spec.dense(self.weights, &Device::Cpu)?;
        let (n, k) = w.dims2()?;
        let w = w.flatten_all()?.to_vec1::<f32>()?;
        let rows = w.chunks_exact(k);
        let w_l1 = rows
            .clone()
            .map(|r| r.iter().map(|v| v.abs() as f64).sum())
            .collect();
        let w_max = rows
            .map(|r| r.iter().fold(0f64, |m, v| m.max(v.abs() as f64)))
            .collect();
        Ok(Arc::new(Checked {
            share,
            what: spec.id.to_string(),
            n,
            k,
            w,
            w_l1,
            w_max,
            bias: b.map(|b| b.to_vec1::<f32>()).transpose()?,
            format: self.format,
            log: self.log.clone(),
        }))
    }

    fn name(&self) -> &str {
        "shares, checked against f32"
    }
}

#[test]
fn smollm2_every_map_through_two_servers_is_within_the_documented_error_bound() {
    let path = umbra_assets::Cache::from_env().unwrap().smollm2_hf_dir();
    assert!(
        path.join("model.safetensors").is_file(),
        "SmolLM2 is missing from the cache: run `umbra fetch smollm2` ({})",
        path.display()
    );
    let ck = Checkpoint::open(&path).unwrap();
    let tok = ck.tokenizer.clone().unwrap();
    let plain = Llama::new(&ck.config, &ck.weights, &Device::Cpu).unwrap();

    // Two share servers over TLS on this host.
    let pw = Arc::new(PublicWeights::load(&path).unwrap());
    let names = ["localhost".to_string(), "127.0.0.1".to_string()];
    let mk = || {
        let id = ServerIdentity::generate(&names).unwrap();
        spawn(
            pw.clone(),
            ServerConfig::new(([127, 0, 0, 1], 0).into(), id),
        )
        .unwrap()
    };
    let (a, b) = (mk(), mk());

    let format = Format::default();
    let session = ShareSession::new(format).unwrap();
    let log = Arc::new(Mutex::new(Log::default()));
    let backend = CheckedBackend {
        inner: ShareBackend::new(&ck.weights, session.clone()).unwrap(),
        weights: &ck.weights,
        format,
        log: log.clone(),
    };
    let share = Llama::with_backend(&ck.config, &ck.weights, &Device::Cpu, &backend).unwrap();
    let built = backend.inner.finish();
    let client = ShareClient::connect(
        &parse_pair(&[a.url(), b.url()]).unwrap(),
        &[Trust::pin(&a.pin).unwrap(), Trust::pin(&b.pin).unwrap()],
        Expect {
            fingerprint: built.fingerprint,
            table: built.table.clone(),
        },
        Duration::from_secs(300),
    )
    .unwrap();
    session.set_transport(Transport::Remote(Box::new(client)));

    // Prefill of a chat prompt (all rows, all logits), then greedy decode steps (one row).
    let text = tok
        .apply_chat_template(&[ChatMessage::user("Name three rivers in Europe.")], true)
        .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = |m: &Llama| {
        m.forward(Input::Ids(&t), &mut m.new_cache(), Forward::logits())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (ys, yp) = (logits(&share), logits(&plain));
    let params = GenerateParams {
        max_tokens: 6,
        sampling: SamplingParams::greedy(),
        stop_ids: ck.eos_token_ids(),
    };
    let gs = generate(&share, &ids, &params, |_| true).unwrap().ids;
    let gp = generate(&plain, &ids, &params, |_| true).unwrap().ids;

    let log = log.lock().unwrap();
    eprintln!(
        "{} outputs of {} calls over {} maps; worst |err|/bound {:.4} ({}); max |err| {:.3e}",
        log.outputs,
        log.calls,
        log.maps.len(),
        log.worst,
        log.worst_at,
        log.max_err
    );
    assert!(log.violations.is_empty(), "{:#?}", log.violations);
    // 30 blocks x (qkv, o, gate_up, down) + the head, all through the servers.
    assert_eq!(
        log.maps.len(),
        4 * ck.config.num_hidden_layers + 1,
        "{:?}",
        log.maps
    );
    assert!(log.worst > 1e-4, "the bound is vacuous: {}", log.worst);

    let v = ck.config.vocab_size;
    let mut max_diff = 0f32;
    let mut top1 = 0usize;
    for (rs, rp) in ys.chunks_exact(v).zip(yp.chunks_exact(v)) {
        for (s, p) in rs.iter().zip(rp) {
            max_diff = max_diff.max((s - p).abs());
        }
        let arg = |r: &[f32]| {
            r.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                .0
        };
        top1 += (arg(rs) == arg(rp)) as usize;
    }
    let positions = ys.len() / v;
    eprintln!(
        "logits of {positions} positions: max |share - plaintext| {max_diff:.4}, top-1 agrees at {top1}"
    );
    assert!(
        max_diff <= LOGIT_TOLERANCE,
        "{max_diff} > {LOGIT_TOLERANCE}"
    );
    assert_eq!(top1, positions);
    assert_eq!(gs, gp, "greedy tokens through the servers vs plaintext");
    a.stop();
    b.stop();
}
