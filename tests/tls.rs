//! `serve` over HTTPS when a certificate is configured: the configured certificate is the one
//! presented, plain HTTP to that port gets nothing, and bad certificate files are clear errors.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn the_service_speaks_https_with_the_configured_certificate() {
    let tls_dir = root().join("tests/data/tls");
    let tls = trialgate::serve::tls_config(&tls_dir.join("localhost.crt"), &tls_dir.join("localhost.key")).unwrap();
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let app = trialgate::serve::App::new(cfg, vec!["tok".into()], 1 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(trialgate::serve::serve_tls(listener, app, tls));

    // Trusting only the test certificate: the handshake succeeds only if it is the one served.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(tls_dir.join("localhost.crt")).unwrap()).unwrap();
    let client = reqwest::Client::builder().tls_certs_only([ca]).build().unwrap();
    let resp = client.get(format!("https://localhost:{port}/health")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = client
        .get(format!("https://localhost:{port}/trials"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the API behind TLS is the same");

    // Plain HTTP to the HTTPS port is not answered as HTTP.
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/health")).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // A client that does not trust the certificate refuses it.
    let strict = reqwest::Client::builder().tls_certs_only([]).build().unwrap();
    assert!(strict.get(format!("https://localhost:{port}/health")).send().await.is_err());
}

#[test]
fn bad_certificate_files_are_clear_errors() {
    let tls_dir = root().join("tests/data/tls");
    let missing = trialgate::serve::tls_config(&tls_dir.join("nope.crt"), &tls_dir.join("localhost.key")).unwrap_err();
    assert!(missing.contains("tls_cert") && missing.contains("nope.crt"), "{missing}");
    let swapped = trialgate::serve::tls_config(&tls_dir.join("localhost.key"), &tls_dir.join("localhost.crt")).unwrap_err();
    assert!(swapped.contains("tls_"), "{swapped}");
}
