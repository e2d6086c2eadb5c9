//! `umbra attack shares`: the attack suite's hidden-state and embedding attacks pointed at one
//! share server's recorded view.
//!
//! Threat model: one server (A or B) that holds the public checkpoint and public text, records
//! every PRODUCT it receives ([`crate::transcript`]) and tries to read the client's tokens from
//! the rows of one linear map's input (default: block 0's q/k/v input, the normed token
//! embeddings, where a plaintext row identifies its token exactly). It reads each received share
//! as a signed 64-bit number (what the fixed-point format would give if it were not masked) and
//! runs, with `umbra-attacks`' building blocks:
//! - **NN**: nearest neighbour (cosine) among the rows the map would receive for each token
//!   (block 0: every vocabulary entry's normed embedding; deeper maps: per-token means over the
//!   attacker's public text);
//! - **IMA**: a ridge inverter from rows to token embeddings trained on the attacker's own
//!   labelled rows (public text through the public model), decoded by nearest embedding;
//! - **ISA**: per-token centroids of the attacker's rows, an alignment fitted by iterative
//!   closest points and orthogonal Procrustes, decoded by nearest centroid.
//!
//! Each attack also runs on the *control* view, the same rows unmasked (the encoded inputs the
//! client recorded), which shows that the attacks work. Scores are top-1 token accuracy; chance is
//! the best constant guess (the victims' most frequent token).
use crate::error::{Result, ShareError};
use crate::inputs::TappedModel;
use crate::secrecy::{bits_chi_square, bytes_chi_square, ChiSquare};
use crate::transcript::Transcript;
use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use serde::Serialize;
use umbra_attacks::isa::centroids;
use umbra_attacks::linalg::{from_dmatrix, nearest_k, procrustes, select_rows, to_dmatrix};
use umbra_attacks::states::unit_rows;
use umbra_model::{LlamaConfig, Weights};

/// What the attacker holds besides the view.
pub struct Attacker<'a> {
    pub cfg: &'a LlamaConfig,
    pub weights: &'a Weights,
    /// Public text it runs through the public model (token ids).
    pub public: &'a [Vec<u32>],
    /// ICP rounds of ISA.
    pub isa_rounds: usize,
}

/// One attack on one view.
#[derive(Debug, Clone, Serialize)]
pub struct AttackScore {
    pub attack: String,
    /// `shares` (what the server received) or `plaintext control`.
    pub view: String,
    pub tokens: usize,
    pub top1: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct SharesReport {
    pub map: String,
    pub victim_tokens: usize,
    /// The victims' most frequent token's share (best constant guess).
    pub chance: f64,
    /// A binomial 99.9% upper bound on what a guesser at `chance` scores on this many tokens.
    pub chance_upper: f64,
    pub scores: Vec<AttackScore>,
    pub bytes: ChiSquare,
    pub bits: ChiSquare,
}

/// Rows of map `map` from a transcript, as F32 (each share read as a signed number).
pub fn view_rows(t: &Transcript, map: u32) -> Result<(Tensor, usize)> {
    let k = t
        .table
        .get(map as usize)
        .ok_or_else(|| ShareError::Config(format!("the transcript has no map {map}")))?
        .0 as usize;
    let data: Vec<f32> = t
        .of(map)
        .flat_map(|r| r.shares.iter().map(|&v| v as i64 as f32))
        .collect();
    let rows = data.len() / k;
    Ok((Tensor::from_vec(data, (rows, k), &Device::Cpu)?, rows))
}

/// Block 0's q/k/v input for every vocabulary entry: `rmsnorm(E[v]) * g`.
fn block0_table(cfg: &LlamaConfig, w: &Weights) -> Result<Tensor> {
    let e = w
        .get("model.embed_tokens.weight")
        .ok_or_else(|| ShareError::Config("no embedding".into()))?
        .to_dtype(DType::F32)?;
    let g = w
        .get("model.layers.0.input_layernorm.weight")
        .ok_or_else(|| ShareError::Config("no block 0 norm".into()))?
        .to_dtype(DType::F32)?;
    let ms = e.sqr()?.mean_keepdim(1)?;
    Ok(e.broadcast_div(&(ms + cfg.rms_norm_eps)?.sqrt()?)?
        .broadcast_mul(&g)?)
}

fn top1(lists: &[Vec<(u32, f32)>], map: impl Fn(u32) -> u32) -> Vec<u32> {
    lists
        .iter()
        .map(|l| l.first().map_or(u32::MAX, |p| map(p.0)))
        .collect()
}

fn accuracy(guess: &[u32], truth: &[u32]) -> f64 {
    let n = guess.len().min(truth.len());
    guess[..n]
        .iter()
        .zip(&truth[..n])
        .filter(|(a, b)| a == b)
        .count() as f64
        / n.max(1) as f64
}

/// Runs NN, IMA and ISA on `views` (`(name, rows [n, k])`) of map `map` whose tokens are `truth`.
pub fn run(
    a: &Attacker<'_>,
    map: u32,
    views: &[(&str, Tensor)],
    truth: &[u32],
) -> Result<Vec<AttackScore>> {
    let layer = map as usize / 4;
    let tm = TappedModel::new(a.cfg, a.weights, Some(map as usize))?;
    for s in a.public.iter().filter(|s| !s.is_empty()) {
        let ids = Tensor::new(s.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let mut cache = tm.llama.new_cache();
        tm.llama.forward(
            umbra_model::Input::Ids(&ids),
            &mut cache,
            umbra_model::Forward::hidden().blocks(0..layer + 1),
        )?;
    }
    let rows = tm.take_rows();
    let labels: Vec<u32> = a.public.iter().flatten().copied().collect();
    let k = views
        .first()
        .map(|v| v.1.dims2().map(|d| d.1))
        .transpose()?
        .unwrap_or(0);
    if k == 0 || rows.len() != labels.len() * k {
        return Err(ShareError::Config(format!(
            "reference rows ({} values) do not match {} public tokens of width {k}",
            rows.len(),
            labels.len()
        )));
    }
    let reference = unit_rows(&Tensor::from_vec(rows, (labels.len(), k), &Device::Cpu)?)?;
    let (cent, cent_tokens) = centroids(&reference, &labels)?;
    let cent = unit_rows(&cent)?;
    // NN table: every vocabulary entry for block 0's q/k/v input, else the centroids.
    let (nn_table, nn_tokens): (Tensor, Option<Vec<u32>>) = if map == 0 {
        (unit_rows(&block0_table(a.cfg, a.weights)?)?, None)
    } else {
        (cent.clone(), Some(cent_tokens.clone()))
    };
    let embed = a
        .weights
        .get("model.embed_tokens.weight")
        .ok_or_else(|| ShareError::Config("no embedding".into()))?
        .to_dtype(DType::F32)?;
    let ridge = umbra_attacks::ima::ridge_map(&reference, &select_rows(&embed, &labels)?, 1e-3)?;
    let embed_unit = unit_rows(&embed)?;
    let mut out = vec![];
    for (name, v) in views {
        let v = unit_rows(v)?;
        let n = v.dims2()?.0;
        let nn = nearest_k(&v, &nn_table, 1, &|_| {})?;
        let g = top1(&nn, |i| nn_tokens.as_ref().map_or(i, |t| t[i as usize]));
        out.push(score("NN", name, &g, truth));
        let pred = unit_rows(&v.matmul(&ridge)?)?;
        let g = top1(&nearest_k(&pred, &embed_unit, 1, &|_| {})?, |i| i);
        out.push(score("IMA", name, &g, truth));
        // ISA: ICP from the identity alignment.
        let vd = to_dmatrix(&v)?;
        let mut al = DMatrix::<f64>::identity(k, k);
        for _ in 0..a.isa_rounds {
            let q = unit_rows(&v.matmul(&from_dmatrix(&al)?)?)?;
            let assign = top1(&nearest_k(&q, &cent, 1, &|_| {})?, |i| i);
            let target = to_dmatrix(&select_rows(&cent, &assign)?)?;
            al = procrustes(&vd, &target)?;
        }
        let q = unit_rows(&v.matmul(&from_dmatrix(&al)?)?)?;
        let g = top1(&nearest_k(&q, &cent, 1, &|_| {})?, |i| {
            cent_tokens[i as usize]
        });
        out.push(score("ISA", name, &g, truth));
        tracing::info!("attack shares: {name}: {n} rows attacked");
    }
    Ok(out)
}

fn score(attack: &str, view: &str, guess: &[u32], truth: &[u32]) -> AttackScore {
    AttackScore {
        attack: attack.into(),
        view: view.into(),
        tokens: guess.len().min(truth.len()),
        top1: accuracy(guess, truth),
    }
}

/// The best constant guess's accuracy and a 99.9% binomial upper bound for it on `n` tokens.
pub fn chance(truth: &[u32]) -> (f64, f64) {
    let mut counts = std::collections::HashMap::new();
    for t in truth {
        *counts.entry(*t).or_insert(0usize) += 1;
    }
    let n = truth.len().max(1) as f64;
    let p = counts.values().copied().max().unwrap_or(0) as f64 / n;
    (p, p + 3.1 * (p * (1.0 - p) / n).sqrt() + 1.0 / n)
}

/// Scores a transcript (and, when given, the unmasked control in the same format).
pub fn report(
    a: &Attacker<'_>,
    shares: &Transcript,
    control: Option<&Transcript>,
    map: u32,
    truth: &[u32],
) -> Result<SharesReport> {
    let (v, rows) = view_rows(shares, map)?;
    if rows != truth.len() {
        return Err(ShareError::Config(format!(
            "the transcript has {rows} rows of map {map}, the truth {} tokens",
            truth.len()
        )));
    }
    let mut views = vec![("shares", v)];
    if let Some(c) = control {
        views.push(("plaintext control", view_rows(c, map)?.0));
    }
    let words: Vec<u64> = shares
        .records
        .iter()
        .flat_map(|r| r.shares.iter().copied())
        .collect();
    let (chance, chance_upper) = chance(truth);
    Ok(SharesReport {
        map: format!("map {map}"),
        victim_tokens: truth.len(),
        chance,
        chance_upper,
        scores: run(a, map, &views, truth)?,
        bytes: bytes_chi_square(&words),
        bits: bits_chi_square(&words),
    })
}

/// Files written by [`record_victims`] next to the transcript `t`: the unmasked control
/// (`t.plain.bin`) and the victims' token ids (`t.truth.json`).
pub fn companion(t: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut s = t.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

/// Sends `victims` (prefill only, one prompt per step) through a share client to two servers
/// started in this process, server A recording its view to `transcript`; also writes the
/// unmasked control and the truth (see [`companion`]).
pub fn record_victims(
    model: &std::path::Path,
    victims: &[Vec<u32>],
    transcript: &std::path::Path,
    format: crate::fixed::Format,
) -> Result<()> {
    use crate::model::{Remote, ShareModel};
    use crate::server::{spawn, PublicWeights, ServerConfig};
    use crate::tls::{ServerIdentity, Trust};
    let weights = std::sync::Arc::new(PublicWeights::load(model)?);
    let names = ["localhost".to_string(), "127.0.0.1".to_string()];
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut ca = ServerConfig::new(addr, ServerIdentity::generate(&names)?);
    ca.record = Some(transcript.to_path_buf());
    let a = spawn(weights.clone(), ca)?;
    let b = spawn(
        weights,
        ServerConfig::new(addr, ServerIdentity::generate(&names)?),
    )?;
    let remote = Remote {
        servers: crate::client::parse_pair(&[a.url(), b.url()])?,
        trust: [Trust::pin(&a.pin)?, Trust::pin(&b.pin)?],
        timeout: std::time::Duration::from_secs(120),
    };
    let m = ShareModel::open(model, format, Some(&remote))?;
    m.session.log_plain(true);
    for v in victims.iter().filter(|v| !v.is_empty()) {
        let ids = Tensor::new(v.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let mut cache = m.llama.new_cache();
        m.llama.forward(
            umbra_model::Input::Ids(&ids),
            &mut cache,
            umbra_model::Forward::last_logits(),
        )?;
    }
    let plain = m.session.log_plain(false);
    let rec = crate::transcript::Recorder::create(
        &companion(transcript, ".plain.bin"),
        &m.built.fingerprint,
        &m.built.table,
    )?;
    for (linear, xs) in plain {
        let k = m.built.table[linear as usize].0 as usize;
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        rec.record(0, linear, (xs.len() / k) as u32, &bytes)?;
    }
    umbra_common::fs::write_json(
        &companion(transcript, ".truth.json"),
        &serde_json::json!({ "prompts": victims }),
    )?;
    a.stop();
    b.stop();
    Ok(())
}
