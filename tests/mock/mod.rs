//! Mock FHIR server pieces that several test binaries share.

#![allow(dead_code)] // each test binary uses a different part

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A mock FHIR server that publishes no CapabilityStatement (`GET /metadata` is 404): the
/// client then falls back to what it assumes of an R4 server.
pub async fn server_without_capabilities() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/metadata"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    server
}

/// A server that has no ResearchSubject yet: every listing or lookup finds none.
pub async fn lists_no_research_subjects(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path("/ResearchSubject"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            json!({"resourceType": "Bundle", "type": "searchset", "entry": []}).to_string(),
            "application/fhir+json",
        ))
        .mount(server)
        .await;
}

/// Answers every ResearchStudy creation with the study `st1`.
pub async fn accepts_research_study(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/ResearchStudy"))
        .respond_with(ResponseTemplate::new(201).set_body_raw(
            json!({"resourceType": "ResearchStudy", "id": "st1", "status": "active"}).to_string(),
            "application/fhir+json",
        ))
        .mount(server)
        .await;
}

/// Serves `app` on a free port of 127.0.0.1, in the background; its base URL.
pub async fn listen(app: std::sync::Arc<trialgate::serve::App>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(trialgate::serve::serve(listener, app));
    base
}
