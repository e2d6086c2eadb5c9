//! Open-domain QA sets with gold aliases, for own answers: NQ-open and TriviaQA (Anserini's
//! `topics.*.txt`: a question TAB a Python-literal list of answer aliases), WebQuestions and
//! SQuAD-open (JSONL `{"question", "answer": [...]}`).
//!
//! The TSV files are written by Python's `csv` module: a field holding a `"` is quoted and its
//! quotes doubled (1,801 lines of TriviaQA's test split), so they are read with a real TSV
//! reader, and the alias list is parsed as a Python literal (single- or double-quoted strings
//! with backslash escapes such as `\x83` or `\uf8ff`). Every malformed line is an error that
//! names the file and the line.
use crate::error::{HaluError, Result};
use std::path::Path;

/// One question with its gold answer aliases (and, for HaluEval QA, its knowledge passage).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QaItem {
    pub question: String,
    pub aliases: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knowledge: Option<String>,
}

fn malformed(path: &Path, what: &'static str, line: u64, msg: impl std::fmt::Display) -> HaluError {
    HaluError::Malformed {
        path: path.into(),
        what,
        msg: format!("line {line}: {msg}"),
    }
}

/// Reads an Anserini topics TSV (`question<TAB>['alias', ...]`, NQ-open / TriviaQA).
pub fn load_topics_tsv(path: &Path) -> Result<Vec<QaItem>> {
    let what = "question TAB alias-list file";
    let file = std::fs::File::open(path).map_err(|e| HaluError::io(path, e))?;
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .has_headers(false)
        .flexible(true)
        .from_reader(std::io::BufReader::new(file));
    let mut items = Vec::new();
    let mut rec = csv::StringRecord::new();
    loop {
        let line = rdr.position().line();
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(line);
                return Err(malformed(path, what, line, e));
            }
        }
        let line = rec.position().map(|p| p.line()).unwrap_or(line);
        if rec.len() == 1 && rec[0].trim().is_empty() {
            continue;
        }
        if rec.len() != 2 {
            return Err(malformed(
                path,
                what,
                line,
                format!(
                    "{} tab-separated fields, expected 2 (question, aliases)",
                    rec.len()
                ),
            ));
        }
        let question = rec[0].trim();
        if question.is_empty() {
            return Err(malformed(path, what, line, "empty question"));
        }
        let aliases = parse_py_str_list(&rec[1])
            .map_err(|e| malformed(path, what, line, format!("alias list: {e}")))?;
        if aliases.iter().all(|a| a.trim().is_empty()) {
            return Err(malformed(path, what, line, "no answer alias"));
        }
        items.push(QaItem {
            question: question.to_string(),
            aliases,
            knowledge: None,
        });
    }
    if items.is_empty() {
        return Err(HaluError::Empty(format!(
            "{} has no questions",
            path.display()
        )));
    }
    Ok(items)
}

#[derive(serde::Deserialize)]
struct JsonQa {
    question: String,
    answer: Vec<String>,
}

/// Reads a JSONL file of `{"question": ..., "answer": [aliases]}` (WebQuestions, SQuAD-open).
pub fn load_qa_jsonl(path: &Path) -> Result<Vec<QaItem>> {
    let what = "question/answer JSONL";
    let text = std::fs::read_to_string(path).map_err(|e| HaluError::io(path, e))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let r: JsonQa = serde_json::from_str(line).map_err(|e| malformed(path, what, n, e))?;
        if r.question.trim().is_empty() {
            return Err(malformed(path, what, n, "empty question"));
        }
        if r.answer.iter().all(|a| a.trim().is_empty()) {
            return Err(malformed(path, what, n, "no answer alias"));
        }
        items.push(QaItem {
            question: r.question.trim().to_string(),
            aliases: r.answer,
            knowledge: None,
        });
    }
    if items.is_empty() {
        return Err(HaluError::Empty(format!(
            "{} has no questions",
            path.display()
        )));
    }
    Ok(items)
}

/// Parses a Python literal list of strings (`['a', "b's", 'c\x83']`): single- or
/// double-quoted strings (an optional `u` prefix), commas, an optional trailing comma, and
/// Python's backslash escapes. Errors say at which character the input went wrong.
pub fn parse_py_str_list(s: &str) -> std::result::Result<Vec<String>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if chars.get(i) != Some(&'[') {
        return Err(format!("expected `[` at character {}", i + 1));
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        skip_ws(&mut i);
        match chars.get(i) {
            Some(']') => {
                i += 1;
                break;
            }
            None => return Err("unterminated list (no `]`)".into()),
            _ => {}
        }
        if chars.get(i) == Some(&'u') || chars.get(i) == Some(&'U') {
            i += 1;
        }
        let (value, next) = parse_py_str(&chars, i)?;
        out.push(value);
        i = next;
        skip_ws(&mut i);
        match chars.get(i) {
            Some(',') => i += 1,
            Some(']') => {
                i += 1;
                break;
            }
            Some(c) => {
                return Err(format!(
                    "expected `,` or `]` at character {}, found `{c}`",
                    i + 1
                ))
            }
            None => return Err("unterminated list (no `]`)".into()),
        }
    }
    skip_ws(&mut i);
    if i != chars.len() {
        return Err(format!("text after the list at character {}", i + 1));
    }
    Ok(out)
}

/// One Python string literal starting at `chars[i]` (a quote); returns it and the index after.
fn parse_py_str(chars: &[char], start: usize) -> std::result::Result<(String, usize), String> {
    let q = match chars.get(start) {
        Some(&c @ ('\'' | '"')) => c,
        Some(c) => {
            return Err(format!(
                "expected a quoted string at character {}, found `{c}`",
                start + 1
            ))
        }
        None => return Err("expected a quoted string, found the end".into()),
    };
    let mut s = String::new();
    let mut i = start + 1;
    let hex = |from: usize, n: usize| -> std::result::Result<char, String> {
        let digits: String = chars
            .get(from..from + n)
            .ok_or("truncated escape")?
            .iter()
            .collect();
        u32::from_str_radix(&digits, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| format!("bad escape `{digits}` at character {}", from + 1))
    };
    loop {
        let c = *chars
            .get(i)
            .ok_or_else(|| format!("unterminated string starting at character {}", start + 1))?;
        i += 1;
        if c == q {
            return Ok((s, i));
        }
        if c != '\\' {
            s.push(c);
            continue;
        }
        let e = *chars.get(i).ok_or("backslash at the end")?;
        i += 1;
        match e {
            '\\' | '\'' | '"' => s.push(e),
            'n' => s.push('\n'),
            't' => s.push('\t'),
            'r' => s.push('\r'),
            'a' => s.push('\u{7}'),
            'b' => s.push('\u{8}'),
            'f' => s.push('\u{c}'),
            'v' => s.push('\u{b}'),
            '\n' => {}
            'x' => {
                s.push(hex(i, 2)?);
                i += 2;
            }
            'u' => {
                s.push(hex(i, 4)?);
                i += 4;
            }
            'U' => {
                s.push(hex(i, 8)?);
                i += 8;
            }
            '0'..='7' => {
                let mut v = e.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match chars.get(i).and_then(|c| c.to_digit(8)) {
                        Some(d) => {
                            v = v * 8 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                s.push(char::from_u32(v).ok_or("bad octal escape")?);
            }
            // Python keeps unknown escapes as written.
            other => {
                s.push('\\');
                s.push(other);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literal_lists() {
        assert_eq!(
            parse_py_str_list(r#"['Apple, Inc', "Apple's", 'S\xc3o', '\uf8ff Inc', 'a\\b',]"#)
                .unwrap(),
            vec!["Apple, Inc", "Apple's", "S\u{c3}o", "\u{f8ff} Inc", "a\\b"]
        );
        assert_eq!(parse_py_str_list("[]").unwrap(), Vec::<String>::new());
        assert_eq!(parse_py_str_list(r"['it\'s']").unwrap(), vec!["it's"]);
        for bad in ["", "['a'", "['a' 'b']", "[a]", "['a'] x", r"['\x4']"] {
            assert!(parse_py_str_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoted_tsv_lines_and_broken_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        // The second line is quoted the way Python's csv module writes a field with `"`.
        std::fs::write(
            &p,
            "who is it\t['A', 'B']\n\"\"\"Bomb\"\" plot?\"\t\"['x', \"\"y's\"\"]\"\n\n",
        )
        .unwrap();
        let items = load_topics_tsv(&p).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].question, "\"Bomb\" plot?");
        assert_eq!(items[1].aliases, vec!["x", "y's"]);
        std::fs::write(&p, "q1\t['a']\nq2\t['a'\nq3\t['b']\n").unwrap();
        let e = load_topics_tsv(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("alias list"), "{e}");
        std::fs::write(&p, "q1\t['a']\nq2 no tab\n").unwrap();
        let e = load_topics_tsv(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("fields"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(load_topics_tsv(&p), Err(HaluError::Empty(_))));
        let j = dir.path().join("q.jsonl");
        std::fs::write(
            &j,
            "{\"question\": \"q\", \"answer\": [\"a\"]}\n{\"question\": 3}\n",
        )
        .unwrap();
        let e = load_qa_jsonl(&j).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
