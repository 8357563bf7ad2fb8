//! `trialgate serve` over real HTTP on 127.0.0.1: the same verdicts as `screen` for a posted
//! Bundle, bearer tokens on every route but /health, an OperationOutcome with a 4xx for every
//! kind of bad input (never a 500), ResearchSubjects on request, and metrics.

use serde_json::{Value, json};
use std::path::PathBuf;
use trialgate::criteria::decisions::Decisions;
use trialgate::time::Date;

mod mock;
mod pg;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

async fn start(max_body: usize) -> String {
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let app = trialgate::serve::App::new(cfg, vec!["t0k3n".into(), "second-token".into()], max_body);
    mock::listen(app).await
}

async fn post(base: &str, query: &str, body: impl Into<reqwest::Body>, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(format!("{base}/screen{query}")).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn diagnostics(v: &Value) -> String {
    assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
    v["issue"][0]["diagnostics"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_posted_bundle_gets_the_verdicts_screen_gives() {
    let base = start(16 << 20).await;
    let file = root().join("fixtures/bundles/01-meilin-zhou.json");
    let (status, report) = post(&base, "?as_of=2026-06-01", std::fs::read(&file).unwrap(), Some("t0k3n")).await;
    assert_eq!(status, 200, "{report}");
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let screened = trialgate::screen(&file, &cfg, Date::parse("2026-06-01").unwrap(), &Decisions::default()).unwrap();
    let expected: Vec<Value> = screened.results.iter().map(|r| serde_json::to_value(r).unwrap()).collect();
    assert_eq!(report["results"].as_array().unwrap(), &expected);
    assert_eq!(report["summary"]["patients"], 1);

    // One trial, as FHIR ResearchSubjects; the second token works too.
    let (status, bundle) = post(
        &base,
        "?as_of=2026-06-01&trial=NCT06406205&format=bundle",
        std::fs::read(&file).unwrap(),
        Some("second-token"),
    )
    .await;
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["resourceType"], "Bundle");
    let subjects: Vec<&Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "ResearchSubject")
        .collect();
    assert_eq!(subjects.len(), 1);
    let want = trialgate::writeback::r4_status(screened.results[0].status).unwrap();
    assert_eq!(subjects[0]["status"], want);
    assert_eq!(subjects[0]["study"]["reference"], "ResearchStudy/NCT06406205");

    // Metrics count what was served.
    let metrics = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth("t0k3n")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("trialgate_http_requests_total{route=\"/screen\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("trialgate_verdicts_total{trial=\"NCT06406205\""), "{metrics}");
}

#[tokio::test]
async fn every_bad_request_gets_an_operation_outcome_never_a_500() {
    let base = start(64 << 10).await;
    let patient = json!({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1990-01-01"});
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient}]}).to_string();

    let (s, v) = post(&base, "", bundle.clone(), None).await;
    assert_eq!(s, 401);
    assert!(diagnostics(&v).contains("Authorization: Bearer"));
    let (s, _) = post(&base, "", bundle.clone(), Some("t0k3n-but-longer")).await;
    assert_eq!(s, 401, "a token that only starts right is refused");

    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("", "{\"resourceType\": \"Bundle\", \"entry\": [".into(), 400, "not valid JSON"),
        ("", "   ".into(), 400, "empty"),
        (
            "",
            json!({"resourceType": "Observation", "id": "o", "status": "final"}).to_string(),
            422,
            "no Patient",
        ),
        (
            "",
            json!({"resourceType": "Encounter", "id": "e"}).to_string(),
            400,
            "cannot be screened",
        ),
        ("?trial=NCT00000000", bundle.clone(), 400, "unknown trial `NCT00000000`"),
        ("?as_of=June", bundle.clone(), 400, "as_of `June`"),
        ("?format=xml", bundle.clone(), 400, "format `xml`"),
        ("", "x".repeat(70 << 10), 413, "larger than"),
    ];
    for (query, body, status, says) in cases {
        let (s, v) = post(&base, query, body, Some("t0k3n")).await;
        assert_eq!(s, status, "{query}: {v}");
        let d = diagnostics(&v);
        assert!(d.contains(says), "{query}: {d}");
    }
    // NDJSON works as well as a Bundle.
    let (s, v) = post(&base, "?as_of=2026-06-01", format!("{patient}\n"), Some("t0k3n")).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn health_is_open_and_the_rest_is_described() {
    let base = start(1 << 20).await;
    let http = reqwest::Client::new();
    let health = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert!(health.headers().contains_key("x-request-id"));
    let get_json = |route: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let text = http
                .get(format!("{base}{route}"))
                .bearer_auth("t0k3n")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            serde_json::from_str::<Value>(&text).unwrap()
        }
    };
    let trials = get_json("/trials").await;
    assert_eq!(trials.as_array().unwrap().len(), 5);
    assert!(trials[0]["criteria"][0]["text"].as_str().is_some_and(|t| !t.is_empty()));
    let api = get_json("/openapi.json").await;
    for route in [
        "/screen",
        "/notify",
        "/fhir/Patient/{id}/$screen",
        "/trials",
        "/health",
        "/metrics",
        "/openapi.json",
        "/",
        "/login",
        "/logout",
    ] {
        assert!(api["paths"][route].is_object(), "{route} is described");
    }
    let missing = http.get(format!("{base}/nowhere")).bearer_auth("t0k3n").send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let wrong = http.get(format!("{base}/screen")).bearer_auth("t0k3n").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 405);
    let v: Value = serde_json::from_str(&wrong.text().await.unwrap()).unwrap();
    assert!(diagnostics(&v).contains("POST /screen"));
}

/// `/health` says whether the FHIR server and the state database answer, with a 503 when a
/// configured one does not.
#[tokio::test]
async fn health_checks_the_fhir_server_and_the_database() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let fhir = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/metadata"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            r#"{"resourceType":"CapabilityStatement","status":"active"}"#,
            "application/fhir+json",
        ))
        .mount(&fhir)
        .await;
    let quick = trialgate::fhir::client::ClientOptions {
        max_retries: 0,
        read_timeout: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let check = |server: &str, state: Option<trialgate::state::Location>| {
        let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
        let client = trialgate::fhir::client::FhirClient::new(server, quick.clone()).unwrap();
        trialgate::serve::App::with(
            cfg,
            vec!["t".into()],
            1 << 20,
            trialgate::serve::Services {
                fhir: Some(client),
                state,
                ..Default::default()
            },
        )
    };
    let health = |app| async move {
        let base = mock::listen(app).await;
        let r = reqwest::get(format!("{base}/health")).await.unwrap();
        let status = r.status().as_u16();
        (status, serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap())
    };
    let dir = std::env::temp_dir().join(format!("trialgate-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("state.sqlite");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();

    let (s, v) = health(check(&fhir.uri(), Some(trialgate::state::Location::File(db.clone())))).await;
    assert_eq!(
        (s, v["fhir_server"].as_str(), v["database"].as_str()),
        (200, Some("ok"), Some("ok")),
        "{v}"
    );
    // A FHIR server that is down: 503, and the reason.
    let dead = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let (s, v) = health(check(&dead, Some(trialgate::state::Location::File(db)))).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["status"], "degraded");
    assert!(v["fhir_server"].as_str().is_some_and(|t| t.starts_with("not answering")), "{v}");
    // State in PostgreSQL: up, then a server that does not answer (its password not shown).
    let shared = trialgate::state::Location::parse(&pg::database("health"));
    let (s, v) = health(check(&fhir.uri(), Some(shared))).await;
    assert_eq!((s, v["database"].as_str()), (200, Some("ok")), "{v}");
    let down = trialgate::state::Location::parse(&format!("postgres://u:secret@{}/x", dead.trim_start_matches("http://")));
    let (s, v) = health(check(&fhir.uri(), Some(down))).await;
    assert_eq!(s, 503, "{v}");
    assert!(v["database"].as_str().is_some_and(|t| t.starts_with("not answering")), "{v}");
    assert!(!v.to_string().contains("secret"), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A service of the seed trials, token `t0k3n`, with the coordinator's page served as `page`
/// says.
fn page_app(page: trialgate::console::PageOptions) -> std::sync::Arc<trialgate::serve::App> {
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let services = trialgate::serve::Services {
        page,
        ..Default::default()
    };
    trialgate::serve::App::with(cfg, vec!["t0k3n".into()], 16 << 20, services)
}

/// The coordinator's page at `/`: a sign-in form and nothing about anyone without a session;
/// a token posted in a form (never a URL) for an HttpOnly, SameSite=Strict session cookie that
/// opens the page but not the API; sign-out ends it.
#[tokio::test]
async fn the_page_signs_in_with_a_token_for_a_session_that_opens_only_the_page() {
    let app = page_app(trialgate::console::PageOptions {
        link_base: Some("https://fhir.example.org/r4/".into()),
        ..Default::default()
    });
    let base = mock::listen(app.clone()).await;
    let file = root().join("fixtures/bundles/02-rosa-delgado.json");
    let (s, _) = post(&base, "?as_of=2026-06-01", std::fs::read(&file).unwrap(), Some("t0k3n")).await;
    assert_eq!(s, 200);
    assert_eq!(app.console().board.len(), 5, "one row per trial on the board");

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get_page = |cookie: Option<String>| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let mut req = http.get(format!("{base}/"));
            if let Some(c) = cookie {
                req = req.header("cookie", c);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            assert!(
                r.headers()["content-type"].to_str().unwrap().starts_with("text/html"),
                "the page answers HTML"
            );
            assert_eq!(r.headers()["cache-control"], "no-store");
            (status, r.text().await.unwrap())
        }
    };
    let no_patient_data = |html: &str| {
        for secret in ["Delgado", "TX-880153", "rosa", "exc-1"] {
            assert!(!html.contains(secret), "`{secret}` before sign-in:\n{html}");
        }
    };
    let (s, html) = get_page(None).await;
    assert_eq!(s, 200);
    assert!(html.contains("<form method=\"post\" action=\"/login\">"), "{html}");
    no_patient_data(&html);

    let login = |body: &'static str, query: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.post(format!("{base}/login{query}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    // Wrong, empty, or in the URL: refused with a plain message, and no cookie.
    for (body, query) in [("token=wrong", ""), ("token=t0k3n-but-longer", ""), ("", "?token=t0k3n")] {
        let r = login(body, query).await;
        assert_eq!(r.status().as_u16(), 401, "{body} {query}");
        assert!(r.headers().get("set-cookie").is_none());
        let html = r.text().await.unwrap();
        assert!(html.contains("not accepted") || html.contains("Enter an access token"), "{html}");
        no_patient_data(&html);
    }
    let r = login("token=t0k3n", "").await;
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.starts_with("trialgate_session="), "{set}");
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(set.contains(part), "{part}: {set}");
    }
    assert!(!set.contains("Secure"), "no Secure without TLS: {set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let id = cookie.trim_start_matches("trialgate_session=");
    assert_eq!(id.len(), 64);
    assert!(!id.contains("t0k3n"));

    // Signed in: Rosa by name and MRN, why she is out, her eGFR linked to the server.
    let (s, html) = get_page(Some(cookie.clone())).await;
    assert_eq!(s, 200);
    assert!(
        html.contains("<b>Rosa María Delgado</b>") && html.contains("<td>TX-880153</td>"),
        "{html}"
    );
    assert!(html.contains("<b>exc-1</b> egfr 38"), "{html}");
    assert!(html.contains("href=\"https://fhir.example.org/r4/Observation/rosa-egfr-20260505\""));
    assert!(html.contains("Sign out"));

    // The session cookie opens no API route: those keep their bearer tokens.
    for (method, route) in [("GET", "/trials"), ("POST", "/screen"), ("GET", "/metrics")] {
        let r = http
            .request(method.parse().unwrap(), format!("{base}{route}"))
            .header("cookie", cookie.clone())
            .body(std::fs::read(&file).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{method} {route} with a session cookie");
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert!(diagnostics(&v).contains("Bearer"));
    }
    // A forged session id is no session.
    let (_, html) = get_page(Some(format!("trialgate_session={}", "0".repeat(64)))).await;
    no_patient_data(&html);

    // Signing out ends the session and clears the cookie.
    let r = http
        .post(format!("{base}/logout"))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let (_, html) = get_page(Some(cookie)).await;
    assert!(html.contains("action=\"/login\""));
    no_patient_data(&html);
    // The page's routes answer HTML even to a wrong method; the API's, an OperationOutcome.
    let r = http.get(format!("{base}/logout")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let r = http.get(format!("{base}/screen")).bearer_auth("t0k3n").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["content-type"], "application/fhir+json");
}

/// Behind an authenticating proxy, the configured header signs a request in to the page as
/// its user; without the setting the same header means nothing. TLS marks the cookie Secure.
#[tokio::test]
async fn a_trusted_proxy_header_signs_in_only_when_configured() {
    let serve_with = |page: trialgate::console::PageOptions| async move {
        let base = mock::listen(page_app(page)).await;
        let file = root().join("fixtures/bundles/01-meilin-zhou.json");
        let (s, _) = post(&base, "?as_of=2026-06-01", std::fs::read(&file).unwrap(), Some("t0k3n")).await;
        assert_eq!(s, 200);
        base
    };
    let page_as = |base: String, user: Option<&'static str>| async move {
        let mut req = reqwest::Client::new().get(format!("{base}/"));
        if let Some(u) = user {
            req = req.header("x-forwarded-user", u);
        }
        req.send().await.unwrap().text().await.unwrap()
    };
    let proxied = serve_with(trialgate::console::PageOptions {
        trusted_user_header: Some(axum::http::HeaderName::from_static("x-forwarded-user")),
        ..Default::default()
    })
    .await;
    let html = page_as(proxied.clone(), Some("j.cobb@example.org")).await;
    assert!(
        html.contains("Signed in: j.cobb@example.org") && html.contains("Mei Lin Zhou"),
        "{html}"
    );
    assert!(!html.contains("Sign out"), "the proxy signs out, not the page");
    let html = page_as(proxied.clone(), None).await;
    assert!(html.contains("action=\"/login\"") && !html.contains("Zhou"), "{html}");
    // The header opens no API route.
    let r = reqwest::Client::new()
        .get(format!("{proxied}/trials"))
        .header("x-forwarded-user", "j.cobb")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    let plain = serve_with(trialgate::console::PageOptions {
        secure_cookies: true,
        ..Default::default()
    })
    .await;
    let html = page_as(plain.clone(), Some("j.cobb")).await;
    assert!(html.contains("action=\"/login\"") && !html.contains("Zhou"), "{html}");
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{plain}/login"))
        .body("token=t0k3n")
        .send()
        .await
        .unwrap();
    assert!(r.headers()["set-cookie"].to_str().unwrap().ends_with("; Secure"));
}
