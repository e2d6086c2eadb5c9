//! Text helpers shared by the server and the proxy: prompt rendering and stop sequences.
use crate::api::ApiError;
use umbra_model::tokenizer::{ChatMessage, TextTokenizer};

/// Token ids of a chat conversation: the chat template with the generation prompt, encoded
/// without extra special tokens (the template writes them).
pub fn chat_prompt_ids(
    tok: &TextTokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<u32>, ApiError> {
    let text = tok
        .apply_chat_template(messages, true)
        .map_err(|e| ApiError::bad_request(format!("cannot apply the chat template: {e}")))?;
    tok.encode(&text, false)
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))
}

/// Token ids of a text completion prompt (special tokens as the tokenizer's config says).
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
