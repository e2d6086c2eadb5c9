//! [`SplitClient`], the client of split mode: ids -> tau -> embedding rows -> server ->
//! hidden state -> final norm and head -> logits over plaintext ids -> sample.
use super::batcher::{run_head_batch, spawn_batcher, HeadJob};
use super::wire::{decode_f32, encode_f32, ForwardRequest, ForwardResponse, FORWARD_PATH};
use crate::api::{check_fingerprint, KEY_FINGERPRINT_HEADER};
use crate::error::ServeError;
use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use umbra_model::checkpoint::Checkpoint;
use umbra_model::generate::{generate_with, GenerateOutput, GenerateParams};
use umbra_model::llama::Llama;
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::ModelPart;

/// What one split-mode generation cost, measured on the client.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SplitStats {
    pub round_trips: usize,
    pub bytes_sent: usize,
    pub bytes_received: usize,
    /// Seconds in the client's embedding and head.
    pub client_s: f64,
    /// Seconds waiting for the server (network and blocks).
    pub server_s: f64,
}

/// The client of split mode: the client part (embedding, final norm, head), the tokenizer and
/// tau; the server runs the blocks. Shareable across threads: concurrent generations' heads
/// run batched.
pub struct SplitClient {
    model: Arc<Llama>,
    head: std::sync::mpsc::Sender<HeadJob>,
    pub tokenizer: TextTokenizer,
    tau: umbra_aloepri::TokenPermutation,
    /// The key's fingerprint: the server's weights must have been compiled with it.
    fingerprint: String,
    pub stop_ids: Vec<u32>,
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    timeout: Duration,
}

/// A failure that came from the server (502, naming it).
fn bad_upstream(url: &str, msg: impl std::fmt::Display) -> ServeError {
    ServeError::Upstream {
        status: 502,
        message: format!("{url}: {msg}"),
    }
}

impl SplitClient {
    /// Opens the client part at `dir` with its key (which must be this part's); the server at
    /// `server` is checked by [`SplitClient::check_server`].
    pub fn open(
        dir: &Path,
        key: &Path,
        server: &str,
        timeout: Duration,
    ) -> Result<Self, ServeError> {
        let key = umbra_aloepri::ClientKey::load(key)?;
        umbra_aloepri::compiler::check_key_for(dir, &key)?;
        let ck = Checkpoint::open(dir)?;
        if ck.config.part() != ModelPart::Client {
            return Err(ServeError::Config(format!(
                "{} is not the client part of a split model (`umbra obfuscate --split` writes \
                 <out>/client)",
                dir.display()
            )));
        }
        let tokenizer = ck
            .tokenizer
            .clone()
            .ok_or_else(|| ServeError::Config(format!("{} has no tokenizer", dir.display())))?;
        let model = Arc::new(Llama::new_part(&ck.config, &ck.weights, &Device::Cpu)?);
        let head = {
            let model = model.clone();
            spawn_batcher("split-head", 64, move |jobs| run_head_batch(&model, jobs))?
        };
        Ok(Self {
            model,
            head,
            tokenizer,
            tau: key.permutation()?,
            fingerprint: key.fingerprint.clone(),
            stop_ids: ck.eos_token_ids(),
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| ServeError::Other(format!("http client: {e}")))?,
            url: server.trim_end_matches('/').to_string(),
            api_key: None,
            timeout,
        })
    }

    /// Sends `Authorization: Bearer <key>` to a server started with `--api-key`.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key;
        self
    }

    fn authorized(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    pub fn width(&self) -> usize {
        self.model.config().hidden_size
    }

    /// The model's context in tokens.
    pub fn max_positions(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key's fingerprint (the server must publish the same).
    pub fn key_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Checks that the server is a split server of this width whose weights were compiled
    /// with this client's key (its published key fingerprint).
    pub async fn check_server(&self) -> Result<(), ServeError> {
        let url = format!("{}/health", self.url);
        let v: serde_json::Value = self
            .authorized(self.http.get(&url))
            .send()
            .await
            .map_err(|e| ServeError::unreachable(&url, &e))?
            .json()
            .await
            .map_err(|e| bad_upstream(&url, format!("not a JSON health answer: {e}")))?;
        if v["mode"] != "split-server" {
            return Err(ServeError::Config(format!(
                "{} is not a split-mode server (serve the server part of `umbra obfuscate \
                 --split` with `umbra serve`)",
                self.url
            )));
        }
        if v["width"].as_u64() != Some(self.width() as u64) {
            return Err(ServeError::Config(format!(
                "the server's width is {}, this client part's is {}: they are not parts of \
                 the same model",
                v["width"],
                self.width()
            )));
        }
        check_fingerprint(&self.url, &self.fingerprint, v["key_fingerprint"].as_str())
            .map_err(ServeError::Config)
    }

    /// Rows per request when a prompt is sent (longer prompts go in several requests, so a
    /// request stays far below the server's body limit).
    pub const ROWS_PER_REQUEST: usize = 256;

    /// One step: sends `x` (`[n, d']` rows) and returns the server's hidden state of the last.
    /// Every answer must carry this key's fingerprint (a server restarted on other weights is
    /// refused).
    pub async fn step(
        &self,
        session: Option<&str>,
        x: Vec<f32>,
        rows: usize,
        stats: &mut SplitStats,
    ) -> Result<ForwardResponse, ServeError> {
        let body = serde_json::to_vec(&ForwardRequest {
            session: session.map(str::to_string),
            rows,
            width: self.width(),
            embeddings: Some(encode_f32(&x)),
            return_rows: None,
            close: false,
        })
        .map_err(|e| ServeError::Other(format!("encoding a split step: {e}")))?;
        stats.bytes_sent += body.len();
        stats.round_trips += 1;
        let url = format!("{}{FORWARD_PATH}", self.url);
        let t = Instant::now();
        let resp = self
            .authorized(self.http.post(&url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| ServeError::unreachable(&url, &e))?;
        let status = resp.status();
        let served = resp
            .headers()
            .get(KEY_FINGERPRINT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ServeError::unreachable(&url, &e))?;
        stats.server_s += t.elapsed().as_secs_f64();
        stats.bytes_received += bytes.len();
        if !status.is_success() {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ServeError::Upstream {
                status: status.as_u16(),
                message: format!("{url}: {status}: {msg}"),
            });
        }
        check_fingerprint(&self.url, &self.fingerprint, served.as_deref())
            .map_err(|m| bad_upstream(&url, m))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| bad_upstream(&url, format!("malformed answer: {e}")))
    }

    /// Best effort: drops the session on the server.
    pub async fn close(&self, session: &str) {
        let body = json!({"session": session, "close": true});
        let _ = self
            .authorized(self.http.post(format!("{}{FORWARD_PATH}", self.url)))
            .timeout(self.timeout.min(Duration::from_secs(5)))
            .json(&body)
            .send()
            .await;
    }

    /// Embedding rows of plaintext ids, as the server receives them (`[n, d']`, flat).
    pub fn embed_plain(&self, plain: &[u32]) -> Result<Vec<f32>, ServeError> {
        let ids = self.tau.apply(plain)?;
        let t = Tensor::from_vec(ids, (1, plain.len()), &Device::Cpu)
            .map_err(umbra_model::ModelError::from)?;
        let x = self.model.embed(&t)?;
        Ok(x.flatten_all()
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(umbra_model::ModelError::from)?)
    }

    /// Final norm and head on one hidden row -> logits over *plaintext* ids. The head runs on
    /// the client's head batcher, batched with other generations' rows waiting at that moment.
    /// Blocks until it is done.
    fn logits(&self, h: Vec<f32>) -> Result<Vec<f32>, ServeError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let stopped = || ServeError::Other("the client's head batcher stopped".into());
        self.head
            .send(HeadJob { h, reply })
            .map_err(|_| stopped())?;
        let obf = answer
            .recv()
            .map_err(|_| stopped())?
            .map_err(ServeError::Other)?;
        // logits over obfuscated ids: plain id i sits at tau(i).
        let tau = self.tau.forward_table();
        Ok((0..obf.len()).map(|i| obf[tau[i] as usize]).collect())
    }

    /// Generates from plaintext prompt ids; `on_token` sees each plaintext id. Runs the
    /// embedding and head here and the blocks on the server, one round trip per token. Call
    /// from a thread that may block (not a runtime worker): HTTP runs on `rt`.
    pub fn generate(
        &self,
        rt: &tokio::runtime::Handle,
        prompt: &[u32],
        params: &GenerateParams,
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<(GenerateOutput, SplitStats), ServeError> {
        let mut stats = SplitStats::default();
        let mut session: Option<String> = None;
        let max_pos = self.max_positions();
        let out = generate_with(
            prompt,
            params,
            max_pos,
            |ids| -> Result<Vec<f32>, ServeError> {
                let mut last = None;
                for chunk in ids.chunks(Self::ROWS_PER_REQUEST) {
                    let t = Instant::now();
                    let x = self.embed_plain(chunk)?;
                    stats.client_s += t.elapsed().as_secs_f64();
                    let r =
                        rt.block_on(self.step(session.as_deref(), x, chunk.len(), &mut stats))?;
                    session = Some(r.session.clone());
                    last = Some(r);
                }
                let r = last.ok_or_else(|| ServeError::Other("empty step".into()))?;
                let h = decode_f32(&r.hidden, self.width(), "hidden")
                    .map_err(|m| bad_upstream(&self.url, m))?;
                let t = Instant::now();
                let l = self.logits(h)?;
                stats.client_s += t.elapsed().as_secs_f64();
                Ok(l)
            },
            on_token,
        );
        if let Some(s) = &session {
            rt.block_on(self.close(s));
        }
        Ok((out?, stats))
    }
}
