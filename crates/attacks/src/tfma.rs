//! TFMA, token-frequency matching on the permuted id stream.
//!
//! Assumption: the server logs the obfuscated ids of many requests (`traffic`) and holds public
//! text of its own (`public`, plaintext ids from the public tokenizer). Ids are ranked by count
//! on both sides and matched rank to rank; the `k` candidates of an obfuscated id are the
//! plaintext ids at the nearest ranks. Ids never seen in traffic get no guess. Cost: linear in
//! the token counts.
use crate::score::Recovery;

fn ranked(ids: &[u32], vocab: usize) -> Vec<u32> {
    let mut counts = vec![0u64; vocab];
    for &i in ids {
        if let Some(c) = counts.get_mut(i as usize) {
            *c += 1;
        }
    }
    let mut order: Vec<u32> = (0..vocab as u32)
        .filter(|&i| counts[i as usize] > 0)
        .collect();
    order.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
    order
}

/// Runs TFMA. `traffic`: obfuscated ids seen by the server; `public`: the attacker's plaintext ids.
pub fn run(traffic: &[u32], public: &[u32], vocab: usize, k: usize) -> Recovery {
    let obf = ranked(traffic, vocab);
    let plain = ranked(public, vocab);
    let mut rec = Recovery::new(vocab);
    if plain.is_empty() {
        return rec;
    }
    for (r, &t) in obf.iter().enumerate() {
        let mut c = vec![];
        let r = r.min(plain.len() - 1) as isize;
        let mut off = 0isize;
        while c.len() < k.min(plain.len()) {
            for cand in [r + off, r - off] {
                if off == 0 && cand != r {
                    continue;
                }
                if cand >= 0 && (cand as usize) < plain.len() && c.len() < k {
                    let id = plain[cand as usize];
                    if !c.contains(&id) {
                        c.push(id);
                    }
                }
            }
            off += 1;
            if off as usize > plain.len() {
                break;
            }
        }
        rec.candidates[t as usize] = c;
    }
    rec
}

/// Share of the `n` most frequent obfuscated ids of `traffic` whose best guess is right.
pub fn top_n_recovery(rec: &Recovery, traffic: &[u32], tau_inv: &[u32], n: usize) -> f64 {
    let top: Vec<u32> = ranked(traffic, tau_inv.len()).into_iter().take(n).collect();
    if top.is_empty() {
        return 0.0;
    }
    let ok = top
        .iter()
        .filter(|&&t| rec.best(t).is_some() && rec.best(t) == tau_inv.get(t as usize).copied())
        .count();
    ok as f64 / top.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_frequencies_are_matched_exactly() {
        // Plaintext id i appears 20 - i times; traffic is the same stream under tau = reverse.
        let vocab = 20;
        let public: Vec<u32> = (0..vocab as u32)
            .flat_map(|i| std::iter::repeat_n(i, 20 - i as usize))
            .collect();
        let tau: Vec<u32> = (0..vocab as u32).rev().collect();
        let traffic: Vec<u32> = public.iter().map(|&i| tau[i as usize]).collect();
        let rec = run(&traffic, &public, vocab, 3);
        let s = crate::score::score(&rec, &tau);
        assert_eq!(s.ttrsr, 1.0);
        let tau_inv: Vec<u32> = (0..vocab as u32).rev().collect();
        assert_eq!(top_n_recovery(&rec, &traffic, &tau_inv, 5), 1.0);
        assert_eq!(rec.candidates[19].len(), 3);
        // An attacker with the wrong frequency profile recovers little.
        let flipped: Vec<u32> = public.iter().map(|&i| 19 - i).collect();
        assert!(crate::score::score(&run(&traffic, &flipped, vocab, 1), &tau).ttrsr < 0.2);
    }
}
