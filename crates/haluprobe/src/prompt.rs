//! Prompts: the fixed layouts of teacher-forced extraction (given answers) and the prompts the
//! model answers itself (own answers, [`own_prompt`]).
//!
//! Given answers: `label_ctx K "\n" label_query Q cue` followed by `" " A`, encoded piece by piece
//! without special tokens, so that the prompt's token boundaries do not depend on the answer
//! ([`Layout::labels`]). Own answers: one user message through the model's chat template (when
//! the tokenizer has one) asking for a short answer, with the knowledge passage for HaluEval QA
//! (retrieval-augmented) and without for NQ-open / TriviaQA (closed book).
use crate::error::{HaluError, Result};
use crate::keys::{ExtractConfig, Layout};
use umbra_model::tokenizer::{ChatMessage, TextTokenizer};

fn enc(tok: &TextTokenizer, s: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(s, false)?)
}

impl Layout {
    /// Prompt ids of one triple: the context (optional, cut to `max_knowledge_tokens`), the
    /// query (cut to `max_question_tokens`; a dialogue keeps its most recent tokens) and the
    /// answer cue. Errors on an empty query where the layout has one.
    pub fn encode_prompt(
        self,
        tok: &TextTokenizer,
        cfg: &ExtractConfig,
        context: Option<&str>,
        query: &str,
    ) -> Result<Vec<u32>> {
        let (ctx_label, query_label, cue) = self.labels();
        if query_label.is_some() && query.trim().is_empty() {
            return Err(HaluError::Input("empty question".into()));
        }
        let context = context.filter(|k| !k.trim().is_empty());
        if query_label.is_none() && context.is_none() {
            return Err(HaluError::Input("empty document".into()));
        }
        let mut ids = Vec::new();
        if let Some(k) = context {
            ids.extend(enc(tok, ctx_label)?);
            let mut k = enc(tok, k.trim())?;
            k.truncate(cfg.max_knowledge_tokens);
            ids.extend(k);
            if query_label.is_some() {
                ids.extend(enc(tok, "\n")?);
            }
        }
        if let Some(label) = query_label {
            ids.extend(enc(tok, label)?);
            let mut q = enc(tok, query.trim())?;
            if self == Layout::Dialogue && q.len() > cfg.max_question_tokens {
                q.drain(..q.len() - cfg.max_question_tokens);
            }
            q.truncate(cfg.max_question_tokens);
            ids.extend(q);
        }
        ids.extend(enc(tok, cue)?);
        Ok(ids)
    }
}

/// Answer ids (`" " + answer`, cut to `max_answer_tokens`). Errors on an empty answer.
pub fn encode_answer(tok: &TextTokenizer, cfg: &ExtractConfig, answer: &str) -> Result<Vec<u32>> {
    if answer.trim().is_empty() {
        return Err(HaluError::Input("empty answer".into()));
    }
    let mut a = enc(tok, &format!(" {}", answer.trim()))?;
    a.truncate(cfg.max_answer_tokens);
    if a.is_empty() {
        return Err(HaluError::Input("answer has no tokens".into()));
    }
    Ok(a)
}

/// `text` cut to its first `max` tokens (decoded back; unchanged when it is short enough).
pub fn cut_text(tok: &TextTokenizer, text: &str, max: usize) -> Result<String> {
    let ids = enc(tok, text.trim())?;
    if ids.len() <= max {
        return Ok(text.trim().to_string());
    }
    Ok(tok.decode(&ids[..max], true)?.trim().to_string())
}

/// The instruction of an own-answer prompt.
pub const OWN_INSTRUCTION: &str = "Answer the question with a short phrase.";
/// The instruction when a knowledge passage is given.
pub const OWN_INSTRUCTION_KNOWLEDGE: &str =
    "Answer the question with a short phrase, using the knowledge below.";

/// An own-answer prompt: the text the model reads and its token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnPrompt {
    /// The user message (what a chat client sends).
    pub message: String,
    /// The text the model reads (the message through the chat template).
    pub text: String,
    pub ids: Vec<u32>,
    /// Whether the model's chat template wrapped it.
    pub chat: bool,
}

/// The prompt the model answers for one question: with a chat template one user message
/// (`instruction`, `Knowledge: K` when given, `Question: Q`) and the assistant turn opened;
/// without one the plain `Knowledge: K\nQuestion: Q\nAnswer:` layout. The knowledge is cut to
/// `cfg.max_knowledge_tokens` and the question to `cfg.max_question_tokens` tokens.
pub fn own_prompt(
    tok: &TextTokenizer,
    cfg: &ExtractConfig,
    knowledge: Option<&str>,
    question: &str,
) -> Result<OwnPrompt> {
    if question.trim().is_empty() {
        return Err(HaluError::Input("empty question".into()));
    }
    let knowledge = knowledge
        .filter(|k| !k.trim().is_empty())
        .map(|k| cut_text(tok, k, cfg.max_knowledge_tokens))
        .transpose()?;
    let question = cut_text(tok, question, cfg.max_question_tokens)?;
    match tok.apply_chat_template(&[ChatMessage::user("x")], true) {
        Ok(_) => {
            let msg = match &knowledge {
                Some(k) => {
                    format!("{OWN_INSTRUCTION_KNOWLEDGE}\n\nKnowledge: {k}\n\nQuestion: {question}")
                }
                None => format!("{OWN_INSTRUCTION}\n\nQuestion: {question}"),
            };
            let text = tok.apply_chat_template(&[ChatMessage::user(msg.clone())], true)?;
            let ids = enc(tok, &text)?;
            Ok(OwnPrompt {
                message: msg,
                text,
                ids,
                chat: true,
            })
        }
        Err(_) => {
            let text = match &knowledge {
                Some(k) => format!("Knowledge: {k}\nQuestion: {question}\nAnswer:"),
                None => format!("Question: {question}\nAnswer:"),
            };
            let ids = enc(tok, &text)?;
            Ok(OwnPrompt {
                message: text.clone(),
                text,
                ids,
                chat: false,
            })
        }
    }
}
