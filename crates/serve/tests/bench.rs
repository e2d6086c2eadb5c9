//! `umbra bench serve` end to end on a tiny model.
mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_every_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model_dir(tmp.path());
    let r = umbra_serve::bench::bench(&dir, &[1, 2], 6, 1, 8)
        .await
        .unwrap();
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        for k in [
            "tok_s_plain",
            "tok_s_obf",
            "ttft_ms_plain",
            "ttft_ms_obf",
            "tpot_ms_plain",
            "tpot_ms_obf",
            "proxy_overhead_ms",
            "tok_s_split",
            "ttft_ms_split",
            "tpot_ms_split",
            "split_over_plain",
        ] {
            assert!(row[k].as_f64().is_some_and(f64::is_finite), "{k} in {row}");
        }
        assert!(row["tok_s_plain"].as_f64().unwrap() > 0.0);
        assert!(row["tok_s_split"].as_f64().unwrap() > 0.0);
    }
}
