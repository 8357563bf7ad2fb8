//! SMART Backend Services against a mock authorization and FHIR server: discovery, a signed
//! client assertion with the right claims, the token cached until shortly before expiry and
//! then refreshed, a new token after a 401, and a refused client reported without retries.
//! The keys in tests/data/smart are throwaway test keys, used nowhere else.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;
use trialgate::fhir::client::{ClientOptions, FhirClient};
use trialgate::fhir::smart::{Alg, SmartClient};
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn data(name: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smart").join(name)).unwrap()
}

fn smart(alg: Alg) -> SmartClient {
    let key = match alg {
        Alg::Es384 => data("test-only-es384.pem"),
        Alg::Rs384 => data("test-only-rs384.pem"),
    };
    SmartClient {
        client_id: "trialgate-test".into(),
        key_pem: key,
        alg,
        kid: Some("k1".into()),
        scope: "system/*.rs".into(),
        token_endpoint: None,
    }
}

fn client(server: &MockServer, s: SmartClient) -> FhirClient {
    let opts = ClientOptions {
        smart: Some(s),
        base_backoff: Duration::from_millis(10),
        max_retries: 2,
        ..Default::default()
    };
    FhirClient::new(&server.uri(), opts).unwrap()
}

fn token(t: &str, expires_in: u64) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_json(json!({"access_token": t, "token_type": "bearer", "expires_in": expires_in, "scope": "system/*.rs"}))
}

fn capability() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(
        json!({"resourceType": "CapabilityStatement", "status": "active"}).to_string(),
        "application/fhir+json",
    )
}

async fn discovery(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path("/.well-known/smart-configuration"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"token_endpoint": format!("{}/auth/token", server.uri()),
            "grant_types_supported": ["client_credentials"], "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"]})),
        )
        .mount(server)
        .await;
}

/// The form fields of the token requests the server received.
async fn token_requests(server: &MockServer) -> Vec<Vec<(String, String)>> {
    let reqs = server.received_requests().await.unwrap();
    reqs.iter()
        .filter(|r| r.url.path() == "/auth/token")
        .map(|r| {
            String::from_utf8_lossy(&r.body)
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        v.replace('+', " ").replace("%2F", "/").replace("%2A", "*").replace("%3A", ":"),
                    )
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn token_is_obtained_with_a_signed_assertion_and_cached() {
    for alg in [Alg::Es384, Alg::Rs384] {
        let server = MockServer::start().await;
        discovery(&server).await;
        Mock::given(method("POST"))
            .and(path("/auth/token"))
            .and(body_string_contains("grant_type=client_credentials"))
            .respond_with(token("tok-1", 3600))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/metadata"))
            .and(header("Authorization", "Bearer tok-1"))
            .respond_with(capability())
            .expect(2)
            .mount(&server)
            .await;
        let c = client(&server, smart(alg));
        c.get("metadata").await.unwrap();
        c.get("metadata").await.unwrap(); // the cached token, no second token request

        let forms = token_requests(&server).await;
        assert_eq!(forms.len(), 1);
        let field = |k: &str| forms[0].iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(
            field("client_assertion_type"),
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        );
        assert_eq!(field("scope"), "system/*.rs");
        let jwt = field("client_assertion");
        let (algorithm, key) = match alg {
            Alg::Es384 => (
                Algorithm::ES384,
                DecodingKey::from_ec_pem(data("test-only-es384.pub.pem").as_bytes()).unwrap(),
            ),
            Alg::Rs384 => (
                Algorithm::RS384,
                DecodingKey::from_rsa_pem(data("test-only-rs384.pub.pem").as_bytes()).unwrap(),
            ),
        };
        let endpoint = format!("{}/auth/token", server.uri());
        let mut v = Validation::new(algorithm);
        v.set_audience(&[endpoint.as_str()]);
        v.set_issuer(&["trialgate-test"]);
        let claims = decode::<Value>(&jwt, &key, &v)
            .expect("the assertion verifies with the client's public key")
            .claims;
        assert_eq!(claims["sub"], "trialgate-test");
        let exp = claims["exp"].as_u64().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(exp > now && exp <= now + 300, "exp at most five minutes ahead");
        assert!(!claims["jti"].as_str().unwrap().is_empty());
        assert_eq!(jsonwebtoken::decode_header(&jwt).unwrap().kid.as_deref(), Some("k1"));
    }
}

#[tokio::test]
async fn a_token_near_expiry_is_refreshed_and_a_401_fetches_a_new_one() {
    let server = MockServer::start().await;
    discovery(&server).await;
    // 30 s tokens are inside the refresh margin: every request needs a new one.
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .respond_with(token("short", 30))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .respond_with(token("long", 3600))
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/metadata"))
        .and(header("Authorization", "Bearer short"))
        .respond_with(capability())
        .mount(&server)
        .await;
    // The long token is revoked once: the server answers 401, the client fetches a new one.
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .and(header("Authorization", "Bearer long"))
        .respond_with(ResponseTemplate::new(401))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .and(header("Authorization", "Bearer long"))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(json!({"resourceType": "Patient", "id": "p1"}).to_string(), "application/fhir+json"),
        )
        .with_priority(2)
        .mount(&server)
        .await;
    let c = client(&server, smart(Alg::Es384));
    c.get("metadata").await.unwrap();
    c.get("metadata").await.unwrap();
    c.get("Patient/p1").await.unwrap();
    // short, short (expired at once), long, then long again after the 401.
    assert_eq!(token_requests(&server).await.len(), 4);
}

#[tokio::test]
async fn a_refused_client_is_reported_without_retries_or_secrets() {
    let server = MockServer::start().await;
    discovery(&server).await;
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_client", "error_description": "unknown key id k1"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let c = client(&server, smart(Alg::Es384));
    let err = c.get("metadata").await.unwrap_err().to_string();
    assert!(
        err.contains("HTTP 400") && err.contains("invalid_client unknown key id k1"),
        "{err}"
    );
    assert!(!err.contains("eyJ"), "no JWT in the error: {err}");
    assert!(!err.contains("PRIVATE KEY"));
}
