//! The command-line entry points refuse what share mode cannot do, before loading anything.
use umbra_share::cli::{run_proxy, ProxyShareArgs, ShareClientArgs};

fn client(servers: &[&str], pins: &[&str]) -> ShareClientArgs {
    ShareClientArgs {
        share_servers: servers.iter().map(|s| s.to_string()).collect(),
        share_pin: pins.iter().map(|s| s.to_string()).collect(),
        share_timeout_s: 5.0,
        share_bits: 24,
        ..Default::default()
    }
}

const PIN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[test]
fn a_proxy_given_one_server_is_refused() {
    let a = ProxyShareArgs {
        model: Some("smollm2".into()),
        client: client(&["https://127.0.0.1:8001"], &[PIN]),
    };
    let e = run_proxy(&a, "127.0.0.1", 0, &[]).unwrap_err().to_string();
    assert!(
        e.contains("exactly two servers") && e.contains("would hold both shares"),
        "{e}"
    );
}

#[test]
fn token_mode_options_and_missing_trust_are_refused() {
    let a = ProxyShareArgs {
        model: Some("smollm2".into()),
        client: client(
            &["https://127.0.0.1:8001", "https://127.0.0.1:8002"],
            &[PIN, PIN],
        ),
    };
    let e = run_proxy(&a, "127.0.0.1", 0, &["--key"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--key does not apply"), "{e}");
    let no_model = ProxyShareArgs {
        model: None,
        ..a.clone()
    };
    let e = run_proxy(&no_model, "127.0.0.1", 0, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs --model"), "{e}");
    let no_trust = client(&["https://127.0.0.1:8001", "https://127.0.0.1:8002"], &[]);
    let e = no_trust.remote().unwrap_err().to_string();
    assert!(e.contains("--share-pin"), "{e}");
    let one_pin = client(
        &["https://127.0.0.1:8001", "https://127.0.0.1:8002"],
        &[PIN],
    );
    assert!(one_pin.remote().is_err());
    let bad_pin = client(
        &["https://127.0.0.1:8001", "https://127.0.0.1:8002"],
        &["xyz", PIN],
    );
    assert!(bad_pin
        .remote()
        .unwrap_err()
        .to_string()
        .contains("SHA-256"));
    let plain_http = client(
        &["http://127.0.0.1:8001", "https://127.0.0.1:8002"],
        &[PIN, PIN],
    );
    assert!(plain_http
        .remote()
        .unwrap_err()
        .to_string()
        .contains("TLS only"));
}
