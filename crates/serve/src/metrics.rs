//! Counters behind `GET /metrics` (Prometheus text format).
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Window over which `umbra_tokens_per_second` is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub queue_depth: AtomicI64,
    pub active_sequences: AtomicI64,
    /// Prompt tokens admitted.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens run through the model so far (prompts are read in chunks).
    pub prefill_tokens: AtomicU64,
    /// Prompt chunks run (one per prefilling cohort per pass).
    pub prefill_chunks: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub cancelled: AtomicU64,
    /// Batched decode forwards, and the rows they carried (mean batch = rows / steps).
    pub decode_steps: AtomicU64,
    pub decode_rows: AtomicU64,
    timing: Mutex<Timing>,
}

#[derive(Debug, Default)]
struct Timing {
    ttft_sum: f64,
    ttft_count: u64,
    tpot_sum: f64,
    tpot_count: u64,
    recent: VecDeque<(Instant, u64)>,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    pub fn record_tokens(&self, n: u64) {
        self.generated_tokens.fetch_add(n, Ordering::Relaxed);
        let now = Instant::now();
        let mut t = self.timing.lock().unwrap_or_else(|e| e.into_inner());
        t.recent.push_back((now, n));
        while t
            .recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            t.recent.pop_front();
        }
    }

    pub fn record_ttft(&self, s: f64) {
        let mut t = self.timing.lock().unwrap_or_else(|e| e.into_inner());
        t.ttft_sum += s;
        t.ttft_count += 1;
    }

    pub fn record_tpot(&self, s: f64) {
        let mut t = self.timing.lock().unwrap_or_else(|e| e.into_inner());
        t.tpot_sum += s;
        t.tpot_count += 1;
    }

    /// Generated tokens per second over the last 10 s.
    pub fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let t = self.timing.lock().unwrap_or_else(|e| e.into_inner());
        let n: u64 = t
            .recent
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= RATE_WINDOW)
            .map(|x| x.1)
            .sum();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }

    /// The Prometheus exposition text.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        s.push_str("# HELP umbra_requests_total HTTP requests by endpoint and status.\n# TYPE umbra_requests_total counter\n");
        for ((ep, st), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "umbra_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
            );
        }
        let gauge = |s: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = write!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        };
        gauge(
            &mut s,
            "umbra_queue_depth",
            "Requests waiting for an engine slot.",
            "gauge",
            self.queue_depth.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut s,
            "umbra_active_sequences",
            "Sequences being generated.",
            "gauge",
            self.active_sequences.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut s,
            "umbra_prompt_tokens_total",
            "Prompt tokens admitted.",
            "counter",
            self.prompt_tokens.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut s,
            "umbra_prefill_tokens_total",
            "Prompt tokens run through the model (prompts are read in chunks).",
            "counter",
            self.prefill_tokens.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut s,
            "umbra_prefill_chunks_total",
            "Prompt chunks run (one per prefilling cohort per forward pass).",
            "counter",
            self.prefill_chunks.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut s,
            "umbra_generated_tokens_total",
            "Tokens generated.",
            "counter",
            self.generated_tokens.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut s,
            "umbra_cancelled_total",
            "Sequences stopped because the client went away.",
            "counter",
            self.cancelled.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut s,
            "umbra_decode_steps_total",
            "Batched decode forward passes.",
            "counter",
            self.decode_steps.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut s,
            "umbra_decode_rows_total",
            "Sequences carried by decode forward passes (rows / steps = mean batch).",
            "counter",
            self.decode_rows.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut s,
            "umbra_tokens_per_second",
            "Generated tokens per second over the last 10 s.",
            "gauge",
            format!("{:.3}", self.tokens_per_second()),
        );
        let t = self.timing.lock().unwrap_or_else(|e| e.into_inner());
        let _ = write!(
            s,
            "# HELP umbra_ttft_seconds Time from request admission to the first token.\n# TYPE umbra_ttft_seconds summary\numbra_ttft_seconds_sum {:.6}\numbra_ttft_seconds_count {}\n",
            t.ttft_sum, t.ttft_count
        );
        let _ = write!(
            s,
            "# HELP umbra_tpot_seconds Mean time per output token after the first, per request.\n# TYPE umbra_tpot_seconds summary\numbra_tpot_seconds_sum {:.6}\numbra_tpot_seconds_count {}\n",
            t.tpot_sum, t.tpot_count
        );
        s
    }
}
