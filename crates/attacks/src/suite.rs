//! Running attacks by name and scoring them against the key.
use crate::error::{AttackError, Result};
use crate::hat::HatConfig;
use crate::ia::IaConfig;
use crate::ima::ImaConfig;
use crate::isa::IsaConfig;
use crate::score::{
    bleu4, pool_positions, position_recovery, score, seen_recovery, token_recovery, Recovery, Score,
};
use crate::sda::SdaConfig;
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
    Sda,
    Ima,
    Isa,
    BlockKey,
}

impl AttackKind {
    pub const ALL: [AttackKind; 9] = [
        Self::Nn,
        Self::Tfma,
        Self::Sda,
        Self::Ima,
        Self::Isa,
        Self::Ia,
        Self::Vma,
        Self::Hat,
        Self::BlockKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Vma => "vma",
            Self::Ia => "ia",
            Self::Nn => "nn",
            Self::Hat => "hat",
            Self::Tfma => "tfma",
            Self::Sda => "sda",
            Self::Ima => "ima",
            Self::Isa => "isa",
            Self::BlockKey => "blockkey",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                AttackError::Input(format!(
                    "unknown attack `{s}` (vma, ia, nn, hat, tfma, sda, ima, isa, blockkey)"
                ))
            })
    }
}

/// Knobs of every attack.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    pub vma: VmaConfig,
    pub hat: HatConfig,
    pub ia: IaConfig,
    pub sda: SdaConfig,
    pub ima: ImaConfig,
    pub isa: IsaConfig,
    /// IMA/ISA: victim prompts whose states are attacked, and public texts the attacker runs
    /// through its models; both cut to `max_len` tokens.
    pub victims: usize,
    pub ref_texts: usize,
    pub max_len: usize,
    /// Candidates kept per obfuscated id (top-k recovery).
    pub k: usize,
    /// Seed of the attacks' own randomness (block-key mixes).
    pub seed: u64,
}

impl SuiteConfig {
    /// Default knobs with `ia_layers` for IA and `k` candidates.
    pub fn with_defaults(ia_layers: Vec<usize>, k: usize) -> Self {
        Self {
            vma: crate::vma::VmaConfig {
                k,
                ..Default::default()
            },
            hat: HatConfig {
                k,
                ..Default::default()
            },
            ia: IaConfig {
                layers: ia_layers,
                k,
            },
            sda: SdaConfig {
                k,
                ..Default::default()
            },
            ima: ImaConfig {
                k,
                ..Default::default()
            },
            isa: IsaConfig {
                k,
                ..Default::default()
            },
            victims: 64,
            ref_texts: 256,
            max_len: 128,
            k,
            seed: 0,
        }
    }
}

/// The id streams TFMA/SDA work on: what the server logged (`traffic`, obfuscated ids) and the
/// attacker's own public text (`public`, plaintext ids); per request for IMA/ISA
/// (`client_seqs`: obfuscated ids of each victim prompt; `public_seqs`: plaintext passages).
#[derive(Debug, Clone, Default)]
pub struct Streams {
    pub traffic: Vec<u32>,
    pub public: Vec<u32>,
    pub client_seqs: Vec<Vec<u32>>,
    pub public_seqs: Vec<Vec<u32>>,
    /// Per plaintext id: whether it is PII-like (see [`pii_mask`]); empty = not scored.
    pub pii: Vec<bool>,
}

impl Streams {
    /// Simulates the server's log: the client's texts `client` (plaintext ids) pass through tau.
    /// This is the harness, not the attack: the attack only ever sees the result.
    pub fn simulate(
        client: &[Vec<u32>],
        public: &[Vec<u32>],
        tau: &TokenPermutation,
    ) -> Result<Self> {
        let client_seqs = client
            .iter()
            .map(|s| tau.apply(s))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self {
            traffic: client_seqs.iter().flatten().copied().collect(),
            public: public.iter().flatten().copied().collect(),
            client_seqs,
            public_seqs: public.to_vec(),
            pii: vec![],
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
    /// Attack-specific numbers (TFMA/SDA: `token_ttrsr`, `seen_ttrsr`, `top100`, `bleu4`;
    /// IMA/ISA: `token_ttrsr`, `token_top10`, `seen_ttrsr`, `bleu4`; hat: `anchors`,
    /// `anchor_precision`).
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
        AttackKind::BlockKey => {
            let (rec, rep) = crate::blockkey::run(target, cfg.k, cfg.seed)?;
            rep.record(&mut extra);
            rec
        }
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
            stream_metrics(&rec, s, tau, &mut extra);
            rec
        }
        AttackKind::Sda => {
            let s = streams.ok_or_else(|| {
                AttackError::Input("SDA needs traffic and public text (a corpus)".into())
            })?;
            let out = crate::sda::run(&s.traffic, &s.public, target.vocab(), &cfg.sda);
            stream_metrics(&out.recovery, s, tau, &mut extra);
            extra.insert("lm_start".into(), out.start_score);
            extra.insert("lm_final".into(), out.final_score);
            extra.insert("moves".into(), out.moves as f64);
            extra.insert("sweeps".into(), out.sweeps as f64);
            out.recovery
        }
        AttackKind::Ima | AttackKind::Isa => {
            let s = streams.ok_or_else(|| {
                AttackError::Input(format!(
                    "{} needs victim prompts and public text (a corpus)",
                    kind.name()
                ))
            })?;
            let cut = |v: &[Vec<u32>], n: usize| -> Vec<Vec<u32>> {
                v.iter()
                    .filter(|x| !x.is_empty())
                    .take(n)
                    .map(|x| x[..x.len().min(cfg.max_len)].to_vec())
                    .collect()
            };
            let victims = cut(&s.client_seqs, cfg.victims);
            let public = cut(&s.public_seqs, cfg.ref_texts);
            let guesses = if kind == AttackKind::Ima {
                crate::ima::run(target, &victims, &public, &cfg.ima)?
            } else {
                crate::isa::run(target, &victims, &public, &cfg.isa)?
            };
            position_metrics(&victims, &guesses, tau, &s.pii, target.vocab(), &mut extra)
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

/// Token-level numbers of an attack that guesses every position of `victims` (obfuscated ids;
/// `guesses[p]` = candidate plaintext ids, best first, for position `p` of the concatenation):
/// `token_ttrsr`, `token_top10`, `seen_ttrsr`, `bleu4`, PII recovery and `victim_tokens`.
/// Returns the guesses pooled per obfuscated id (for the vocabulary-level score).
pub fn position_metrics(
    victims: &[Vec<u32>],
    guesses: &[Vec<u32>],
    tau: &TokenPermutation,
    pii: &[bool],
    vocab: usize,
    extra: &mut BTreeMap<String, f64>,
) -> Recovery {
    let inv = tau.inverse_table();
    let stream: Vec<u32> = victims.iter().flatten().copied().collect();
    let truth: Vec<u32> = stream
        .iter()
        .map(|&t| inv.get(t as usize).copied().unwrap_or(u32::MAX))
        .collect();
    let rec = pool_positions(&stream, guesses, vocab);
    extra.insert("token_ttrsr".into(), position_recovery(guesses, &truth, 1));
    extra.insert("token_top10".into(), position_recovery(guesses, &truth, 10));
    extra.insert("seen_ttrsr".into(), seen_recovery(&rec, &stream, inv));
    let (mut hyp, mut refs, mut at) = (vec![], vec![], 0);
    for v in victims {
        hyp.push(
            guesses[at..at + v.len()]
                .iter()
                .map(|g| g.first().copied().unwrap_or(u32::MAX))
                .collect(),
        );
        refs.push(truth[at..at + v.len()].to_vec());
        at += v.len();
    }
    extra.insert("bleu4".into(), bleu4(&hyp, &refs));
    let best: Vec<u32> = hyp.into_iter().flatten().collect();
    pii_metrics(&best, &truth, pii, extra);
    extra.insert("victim_tokens".into(), stream.len() as f64);
    rec
}

/// Token-level numbers of a stream attack (TFMA, SDA) on the simulated traffic: `token_ttrsr`,
/// `seen_ttrsr`, `top100`, `bleu4` of the decoded client texts, `traffic_tokens`.
fn stream_metrics(
    rec: &Recovery,
    s: &Streams,
    tau: &TokenPermutation,
    extra: &mut BTreeMap<String, f64>,
) {
    let inv = tau.inverse_table();
    extra.insert("token_ttrsr".into(), token_recovery(rec, &s.traffic, inv));
    extra.insert("seen_ttrsr".into(), seen_recovery(rec, &s.traffic, inv));
    extra.insert(
        "top100".into(),
        crate::tfma::top_n_recovery(rec, &s.traffic, inv, 100),
    );
    let hyp: Vec<Vec<u32>> = s
        .client_seqs
        .iter()
        .map(|q| q.iter().map(|&t| rec.best(t).unwrap_or(u32::MAX)).collect())
        .collect();
    let refs: Vec<Vec<u32>> = s
        .client_seqs
        .iter()
        .map(|q| {
            q.iter()
                .map(|&t| inv.get(t as usize).copied().unwrap_or(u32::MAX))
                .collect()
        })
        .collect();
    extra.insert("bleu4".into(), bleu4(&hyp, &refs));
    let best: Vec<u32> = hyp.into_iter().flatten().collect();
    let truth: Vec<u32> = refs.into_iter().flatten().collect();
    pii_metrics(&best, &truth, &s.pii, extra);
    extra.insert("traffic_tokens".into(), s.traffic.len() as f64);
}

/// Whether a token (its vocabulary string, BPE space marker `Ġ`/`▁` stripped) is PII-like: it
/// holds a digit or `@`, or starts with a capital letter (names, places; also sentence starts).
pub fn is_pii_token(token: &str) -> bool {
    let t = token.trim_start_matches(['Ġ', '▁', ' ']);
    t.chars().any(|c| c.is_ascii_digit() || c == '@')
        || t.chars().next().is_some_and(|c| c.is_uppercase())
}

/// [`is_pii_token`] for every id of a vocabulary (`token(id)` = its string, if any).
pub fn pii_mask(vocab: usize, token: impl Fn(u32) -> Option<String>) -> Vec<bool> {
    (0..vocab as u32)
        .map(|i| token(i).is_some_and(|t| is_pii_token(&t)))
        .collect()
}

/// `pii_ttrsr` (share of PII-like true tokens recovered at top-1) and `pii_tokens`.
fn pii_metrics(best: &[u32], truth: &[u32], pii: &[bool], extra: &mut BTreeMap<String, f64>) {
    if pii.is_empty() {
        return;
    }
    let (mut n, mut ok) = (0usize, 0usize);
    for (&b, &t) in best.iter().zip(truth) {
        if pii.get(t as usize).copied().unwrap_or(false) {
            n += 1;
            ok += usize::from(b == t);
        }
    }
    extra.insert("pii_tokens".into(), n as f64);
    extra.insert("pii_ttrsr".into(), ok as f64 / n.max(1) as f64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pii_like_tokens() {
        for t in ["Ġ1987", "john@", "ĠLondon", "Alice", "▁42"] {
            assert!(is_pii_token(t), "{t}");
        }
        for t in ["Ġthe", "ing", ",", "Ġ"] {
            assert!(!is_pii_token(t), "{t}");
        }
        let mask = vec![false, true, true];
        let mut e = BTreeMap::new();
        pii_metrics(&[0, 1, 0, 2], &[0, 1, 2, 2], &mask, &mut e);
        assert_eq!(e["pii_tokens"], 3.0);
        assert_eq!(e["pii_ttrsr"], 2.0 / 3.0);
    }
}
