//! Soak (issue 20, item 1): a prompt of the model's whole context sent beside 8 short chats on
//! loopback. The chats' p99 latency stays within 3x of their latency alone (the prompt is read
//! in chunks between their decode steps instead of one `n x n` pass), and the process's peak
//! memory stays under a bound (the whole-prompt pass of a 8,192-token prompt alone would need
//! `3 x heads x n^2 x 4 B` = 3 GiB of attention scores on this model).
//!
//! Alone in its test binary, so that the peak memory is this test's.
mod common;

use umbra_serve::bench::soak::{soak, SoakOptions};

/// Peak resident memory allowed to the whole test process (measured 53-59 MiB on the
/// development machine; reading the prompt in one pass needs ~3 GiB).
const PEAK_RSS_MIB: f64 = 256.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_context_prompt_does_not_starve_short_chats() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_long_model_dir(tmp.path(), 64, 4, 8192);
    let t = std::time::Instant::now();
    let r = soak(
        &dir,
        &SoakOptions {
            prompt_tokens: 0,
            chats: 8,
            max_tokens: 96,
            rounds: 2,
            // One engine thread: pass costs then grow smoothly with work, as on a dedicated
            // core, instead of jumping with the machine's load when a matmul goes parallel.
            threads: Some(1),
        },
    )
    .await
    .unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    eprintln!("soak took {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(r["long_prompt_tokens"], 8192 - 4);
    assert_eq!(
        r["long_overlapped_chats"], true,
        "the long prompt must still run while the chats do: {r}"
    );
    let ratio = r["p99_ratio"].as_f64().unwrap();
    assert!(
        ratio <= 3.0,
        "short chats slowed {ratio:.2}x by a long prompt: {r}"
    );
    let peak = r["peak_rss_mib"].as_f64().unwrap();
    assert!(
        peak <= PEAK_RSS_MIB,
        "peak RSS {peak:.0} MiB > {PEAK_RSS_MIB} MiB: {r}"
    );
}
