//! Labels of own answers against gold aliases, and the consistency of an answer with samples.
//!
//! Normalization is the standard one of SQuAD / NQ-open evaluation: lower case, punctuation
//! removed, the articles `a`, `an`, `the` removed, whitespace collapsed. An answer is
//! **correct** when some alias's normalized tokens occur as a contiguous run in the answer's
//! normalized tokens (the "alias contained in the answer" match of open-domain QA, on token
//! boundaries so that `1` does not match `1990`); otherwise it is **hallucinated** (label 1).
//! Token F1 (SQuAD) against the best alias is reported beside it.
use std::collections::HashMap;

/// Normalized tokens of `s`: lower case, punctuation dropped (Unicode punctuation and
/// symbols become spaces), articles dropped.
pub fn normalize_tokens(s: &str) -> Vec<String> {
    let lower = s.to_lowercase();
    let cleaned: String = lower
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else if c == '\'' || c == '’' {
                // SQuAD drops apostrophes without splitting ("don't" -> "dont").
                '\u{0}'
            } else {
                ' '
            }
        })
        .filter(|&c| c != '\u{0}')
        .collect();
    cleaned
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(str::to_string)
        .collect()
}

/// The normalized text of `s` (tokens joined by one space).
pub fn normalize(s: &str) -> String {
    normalize_tokens(s).join(" ")
}

/// Whether `needle` occurs as a contiguous run in `hay` (an empty needle never matches).
fn contains_run(hay: &[String], needle: &[String]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// SQuAD token F1 of normalized token lists.
pub fn token_f1(pred: &[String], gold: &[String]) -> f64 {
    if pred.is_empty() || gold.is_empty() {
        return if pred.is_empty() && gold.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for g in gold {
        *counts.entry(g.as_str()).or_default() += 1;
    }
    let mut common = 0i64;
    for p in pred {
        if let Some(c) = counts.get_mut(p.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let prec = common as f64 / pred.len() as f64;
    let rec = common as f64 / gold.len() as f64;
    2.0 * prec * rec / (prec + rec)
}

/// An answer judged against its gold aliases.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Judgement {
    /// Some alias is contained in the answer (after normalization).
    pub correct: bool,
    /// Best token F1 over the aliases.
    pub f1: f64,
}

impl Judgement {
    /// The probe's label: 1 = hallucinated (no alias matched), 0 = correct.
    pub fn label(&self) -> f32 {
        if self.correct {
            0.0
        } else {
            1.0
        }
    }
}

/// Judges `answer` against `aliases` (see the module docs). Aliases that normalize to nothing
/// are ignored.
pub fn judge(answer: &str, aliases: &[String]) -> Judgement {
    let a = normalize_tokens(answer);
    let mut out = Judgement {
        correct: false,
        f1: 0.0,
    };
    for g in aliases {
        let g = normalize_tokens(g);
        if g.is_empty() {
            continue;
        }
        out.correct |= contains_run(&a, &g);
        out.f1 = out.f1.max(token_f1(&a, &g));
    }
    out
}

/// Consistency of a greedy answer with `K` sampled answers (the sampling baseline,
/// [`crate::keys::SAMPLING_NAMES`]): mean token F1 between the normalized answer and each
/// sample, the share of samples equal to it after normalization, and the share of distinct
/// normalized samples. `None` without samples.
pub fn consistency(answer: &str, samples: &[String]) -> Option<[f32; 3]> {
    if samples.is_empty() {
        return None;
    }
    let a = normalize_tokens(answer);
    let norm: Vec<Vec<String>> = samples.iter().map(|s| normalize_tokens(s)).collect();
    let k = samples.len() as f64;
    let overlap = norm.iter().map(|s| token_f1(&a, s)).sum::<f64>() / k;
    let agree = norm.iter().filter(|s| **s == a).count() as f64 / k;
    let mut distinct: Vec<&Vec<String>> = norm.iter().collect();
    distinct.sort();
    distinct.dedup();
    Some([
        overlap as f32,
        agree as f32,
        (distinct.len() as f64 / k) as f32,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn normalization_drops_case_punctuation_and_articles() {
        assert_eq!(
            normalize("The  Eiffel-Tower, in PARIS!"),
            "eiffel tower in paris"
        );
        assert_eq!(normalize("An apple a day"), "apple day");
        assert_eq!(normalize("Don't"), "dont");
        assert_eq!(normalize("Säo Paulo."), "säo paulo");
    }

    #[test]
    fn match_is_an_alias_contained_on_token_boundaries() {
        let g = v(&["Paris", "City of Light"]);
        assert!(judge("It is Paris.", &g).correct);
        assert!(judge("the city of light", &g).correct);
        assert!(!judge("Parisian food", &g).correct);
        assert!(!judge("", &g).correct);
        assert!(!judge("1990", &v(&["1"])).correct);
        assert!(judge("in 1 day", &v(&["1"])).correct);
        // Aliases that normalize to nothing never match.
        assert!(!judge("the", &v(&["The"])).correct);
        assert_eq!(judge("x", &g).label(), 1.0);
        assert_eq!(judge("Paris", &g).label(), 0.0);
    }

    #[test]
    fn token_f1_is_squads() {
        let p = normalize_tokens("the cat sat on the mat");
        let g = normalize_tokens("a cat on a mat");
        // pred: cat sat on mat (4); gold: cat on mat (3); common 3.
        let want = 2.0 * (3.0 / 4.0) * (3.0 / 3.0) / (3.0 / 4.0 + 1.0);
        assert!((token_f1(&p, &g) - want).abs() < 1e-12);
        assert!(
            (judge("cat sat on the mat", &v(&["a cat on a mat", "dog"])).f1 - want).abs() < 1e-12
        );
    }

    #[test]
    fn consistency_scores() {
        let s = v(&["Paris.", "paris", "Lyon", "The Paris"]);
        let c = consistency("Paris", &s).unwrap();
        assert!((c[0] - 0.75).abs() < 1e-6, "{c:?}");
        assert!((c[1] - 0.75).abs() < 1e-6);
        assert!((c[2] - 0.5).abs() < 1e-6);
        assert!(consistency("x", &[]).is_none());
    }
}
