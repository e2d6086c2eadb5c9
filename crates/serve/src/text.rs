//! Text helpers shared by the server and the proxy: prompt rendering and tokenization (with
//! cheap bounds first, off the async runtime) and stop sequences.
use crate::api::ApiError;
use std::sync::Arc;
use umbra_model::tokenizer::{ChatMessage, TextTokenizer};

/// A prompt before tokenization.
#[derive(Debug, Clone)]
pub enum PromptText {
    /// Chat messages, rendered with the chat template (only the template's own markers become
    /// control tokens; special-token text in a message is ordinary text).
    Chat(Vec<ChatMessage>),
    /// A completion prompt: raw text, special tokens as the tokenizer's config says.
    Text(String),
}

impl PromptText {
    /// Bytes of text the caller wrote (message contents, or the prompt).
    pub fn text_bytes(&self) -> usize {
        match self {
            PromptText::Chat(m) => m.iter().map(|m| m.content.len()).sum(),
            PromptText::Text(t) => t.len(),
        }
    }
}

/// The cheap check before tokenizing: text that cannot fit in `max_tokens` tokens is refused
/// by its byte length alone (a token covers at most `max_token_bytes` bytes of input).
#[derive(Debug, Clone)]
pub struct PromptBound {
    pub max_tokens: usize,
    pub max_token_bytes: usize,
    /// Tokenizations running at once (CPU work beside the engine thread).
    permits: Arc<tokio::sync::Semaphore>,
}

impl PromptBound {
    pub fn new(tok: &TextTokenizer, max_tokens: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            max_tokens,
            max_token_bytes: max_token_bytes(tok),
            permits: Arc::new(tokio::sync::Semaphore::new(cores)),
        }
    }

    /// 400 `context_length_exceeded` when `bytes` of text cannot fit.
    pub fn check_bytes(&self, bytes: usize) -> Result<(), ApiError> {
        let most = self.max_tokens.saturating_mul(self.max_token_bytes);
        if bytes > most {
            return Err(ApiError::bad_request(format!(
                "the prompt has {bytes} bytes of text; at most {} tokens fit ({most} bytes at \
                 most), so it cannot fit without being tokenized",
                self.max_tokens
            ))
            .with_code("context_length_exceeded"));
        }
        Ok(())
    }

    /// Token ids of `prompt`: the byte bound first, then tokenization on a blocking thread (at
    /// most one per core at once), then the token bound.
    pub async fn ids(
        &self,
        tok: &Arc<TextTokenizer>,
        prompt: PromptText,
    ) -> Result<Vec<u32>, ApiError> {
        self.check_bytes(prompt.text_bytes())?;
        let _permit = self.permits.acquire().await.map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting down",
            )
        })?;
        let tok = tok.clone();
        let ids = tokio::task::spawn_blocking(move || match &prompt {
            PromptText::Chat(m) => chat_prompt_ids(&tok, m),
            PromptText::Text(t) => text_prompt_ids(&tok, t),
        })
        .await
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("tokenization failed: {e}"),
            )
        })??;
        if ids.len() > self.max_tokens {
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens; the limit is {}",
                ids.len(),
                self.max_tokens
            ))
            .with_code("context_length_exceeded"));
        }
        Ok(ids)
    }
}

/// Most bytes of input one token of `tok` can stand for: the longest token (decoded, or as
/// written in the vocabulary, whichever is longer), times 4 when the tokenizer has a
/// normalizer (one that maps a 4-byte character to a 1-byte one would shrink the text).
pub fn max_token_bytes(tok: &TextTokenizer) -> usize {
    let n = tok.vocab_size() as u32;
    let longest = (0..n)
        .map(|id| {
            let written = tok.id_to_token(id).map_or(0, |t| t.len());
            let decoded = tok.decode(&[id], false).map_or(0, |t| t.len());
            written.max(decoded)
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let normalizes = tok.inner().get_normalizer().is_some();
    longest * if normalizes { 4 } else { 1 }
}

/// Token ids of a chat conversation: the chat template with the generation prompt, encoded
/// without extra special tokens (the template writes them) and with the messages' text kept
/// literal ([`TextTokenizer::encode_chat`]: `<|im_end|>` typed by a user is not a control
/// token, so no role can be injected).
pub fn chat_prompt_ids(
    tok: &TextTokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<u32>, ApiError> {
    tok.encode_chat(messages, true).map_err(|e| match e {
        umbra_model::ModelError::ChatTemplate(e) => {
            ApiError::bad_request(format!("cannot apply the chat template: {e}"))
        }
        e => ApiError::bad_request(format!("cannot tokenize the prompt: {e}")),
    })
}

/// Token ids of a text completion prompt (special tokens as the tokenizer's config says: a
/// completion prompt is the client's own raw text, template markers included).
pub fn text_prompt_ids(tok: &TextTokenizer, prompt: &str) -> Result<Vec<u32>, ApiError> {
    tok.encode(prompt, true)
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))
}

/// Applies stop sequences to streamed text: text that could still become a stop sequence is
/// held back; once one appears, the text before it is released and the stream ends.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds text; returns the text safe to emit now and whether a stop sequence was hit.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.pending.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(p) = first {
            self.stopped = true;
            let out = self.pending[..p].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop sequence.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.pending.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Releases whatever is held back at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_across_pieces() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dxyz"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc EN"), ("abc ".to_string(), false));
        assert_eq!(m.push("x"), ("ENx".to_string(), false));
        assert_eq!(m.finish(), "");
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("héllo"), ("héllo".to_string(), false));
    }
}
