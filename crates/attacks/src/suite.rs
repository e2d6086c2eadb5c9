//! Running attacks by name and scoring them against the key.
use crate::error::{AttackError, Result};
use crate::hat::HatConfig;
use crate::ia::IaConfig;
use crate::score::{score, token_recovery, Score};
use crate::target::Target;
use crate::vma::VmaConfig;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Instant;
use umbra_aloepri::TokenPermutation;

/// The attacks this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttackKind {
    Vma,
    Ia,
    Nn,
    Hat,
    Tfma,
}

impl AttackKind {
    pub const ALL: [AttackKind; 5] = [Self::Nn, Self::Tfma, Self::Ia, Self::Vma, Self::Hat];

    pub fn name(self) -> &'static str {
        match self {
            Self::Vma => "vma",
            Self::Ia => "ia",
            Self::Nn => "nn",
            Self::Hat => "hat",
            Self::Tfma => "tfma",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                AttackError::Input(format!("unknown attack `{s}` (vma, ia, nn, hat, tfma)"))
            })
    }
}

/// Knobs of every attack.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    pub vma: VmaConfig,
    pub hat: HatConfig,
    pub ia: IaConfig,
    /// Candidates kept per obfuscated id (top-k recovery).
    pub k: usize,
}

/// The id streams TFMA works on: what the server logged (`traffic`, obfuscated ids) and the
/// attacker's own public text (`public`, plaintext ids).
#[derive(Debug, Clone, Default)]
pub struct Streams {
    pub traffic: Vec<u32>,
    pub public: Vec<u32>,
}

impl Streams {
    /// Simulates the server's log: the client's texts `client` (plaintext ids) pass through tau.
    /// This is the harness, not the attack: the attack only ever sees the result.
    pub fn simulate(
        client: &[Vec<u32>],
        public: &[Vec<u32>],
        tau: &TokenPermutation,
    ) -> Result<Self> {
        let mut traffic = vec![];
        for s in client {
            traffic.extend(tau.apply(s)?);
        }
        Ok(Self {
            traffic,
            public: public.iter().flatten().copied().collect(),
        })
    }
}

/// Score and cost of one attack (fractions, seconds). Serialises flat:
/// `{"ttrsr", "top10", "coverage", "seconds", ...extra}`.
#[derive(Debug, Clone, Serialize)]
pub struct AttackResult {
    #[serde(skip)]
    pub kind: Option<AttackKind>,
    #[serde(flatten)]
    pub score: Score,
    pub seconds: f64,
    /// Attack-specific numbers (TFMA: `token_ttrsr`, `top100`; hat: `anchors`, `anchor_precision`).
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

/// Runs one attack and scores it against `tau` (used for scoring only).
pub fn run_one(
    kind: AttackKind,
    target: &Target,
    streams: Option<&Streams>,
    tau: &TokenPermutation,
    cfg: &SuiteConfig,
) -> Result<AttackResult> {
    let start = Instant::now();
    let fwd = tau.forward_table();
    let mut extra = BTreeMap::new();
    let rec = match kind {
        AttackKind::Vma => crate::vma::run(target, &cfg.vma)?,
        AttackKind::Nn => crate::nn::run(target, cfg.k)?,
        AttackKind::Ia => crate::ia::run(target, &cfg.ia)?,
        AttackKind::Hat => {
            let out = crate::hat::run(target, &cfg.hat)?;
            let inv = tau.inverse_table();
            let ok = out
                .anchors
                .iter()
                .filter(|&&(t, p)| inv.get(t as usize) == Some(&p))
                .count();
            extra.insert("anchors".into(), out.anchors.len() as f64);
            extra.insert(
                "anchor_precision".into(),
                ok as f64 / out.anchors.len().max(1) as f64,
            );
            out.recovery
        }
        AttackKind::Tfma => {
            let s = streams.ok_or_else(|| {
                AttackError::Input("TFMA needs traffic and public text (a corpus)".into())
            })?;
            let rec = crate::tfma::run(&s.traffic, &s.public, target.vocab(), cfg.k);
            let inv = tau.inverse_table();
            extra.insert("token_ttrsr".into(), token_recovery(&rec, &s.traffic, inv));
            extra.insert(
                "top100".into(),
                crate::tfma::top_n_recovery(&rec, &s.traffic, inv, 100),
            );
            extra.insert("traffic_tokens".into(), s.traffic.len() as f64);
            rec
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    let score = score(&rec, fwd);
    tracing::info!("{}: ttrsr {:.4} in {seconds:.1}s", kind.name(), score.ttrsr);
    Ok(AttackResult {
        kind: Some(kind),
        score,
        seconds,
        extra,
    })
}

/// Passages: lines of `corpus`, or the HaluEval QA `knowledge` fields from the asset cache.
pub fn load_texts(corpus: Option<&Path>, n: usize) -> Result<Vec<String>> {
    let path = match corpus {
        Some(p) => p.to_path_buf(),
        None => umbra_assets::Cache::from_env()?.require(umbra_assets::Asset::HaluEvalQa)?,
    };
    let f = std::fs::File::open(&path).map_err(|e| AttackError::io(&path, e))?;
    let mut out = vec![];
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| AttackError::io(&path, e))?;
        let text = if corpus.is_some() {
            line
        } else {
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
                AttackError::Input(format!("{}: malformed JSONL line ({e})", path.display()))
            })?;
            v["knowledge"].as_str().unwrap_or_default().to_string()
        };
        if !text.trim().is_empty() {
            out.push(text);
        }
        if out.len() == n {
            break;
        }
    }
    if out.len() < 2 {
        return Err(AttackError::Input(format!(
            "{}: need at least 2 passages",
            path.display()
        )));
    }
    Ok(out)
}
