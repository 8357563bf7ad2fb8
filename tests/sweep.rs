//! `sweep` against a mock FHIR server (wiremock): the same verdicts as `screen` for the same
//! data, pages followed to the end, and the faults real servers have (429 with Retry-After,
//! 5xx, timeouts, truncated bodies, OperationOutcome errors) retried or reported per patient.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use trialgate::criteria::Status;
use trialgate::criteria::decisions::Decisions;
use trialgate::fhir::client::{ClientOptions, FhirClient};
use trialgate::sweep::{Cohort, SweepOptions, sweep};
use trialgate::time::Date;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

mod mock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config(trial: &str) -> trialgate::Config {
    trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[trial.to_string()]).expect("config")
}

fn as_of() -> Date {
    Date::parse("2026-06-01").unwrap()
}

fn fast() -> ClientOptions {
    ClientOptions {
        read_timeout: Duration::from_secs(2),
        max_retries: 2,
        base_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_secs(2),
        ..Default::default()
    }
}

fn searchset(resources: &[Value], next: Option<String>) -> Value {
    let mut b = json!({"resourceType": "Bundle", "type": "searchset",
        "entry": resources.iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()});
    if let Some(url) = next {
        b["link"] = json!([{"relation": "next", "url": url}]);
    }
    b
}

fn ok(body: &Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.to_string(), "application/fhir+json")
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "gender": "female", "birthDate": "1990-01-01"})
}

fn egfr(id: &str, patient: &str, value: f64) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "98979-8"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": "2026-05-20T09:00:00Z",
        "valueQuantity": {"value": value, "unit": "mL/min/{1.73_m2}", "system": "http://unitsofmeasure.org", "code": "mL/min/{1.73_m2}"}})
}

/// The resource types trial 000 reads besides Patient and Observation.
const OTHER_TYPES: &[&str] = &[
    "Condition",
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "Procedure",
    "Immunization",
    "AllergyIntolerance",
    "DiagnosticReport",
];

/// Every type a small trial on eGFR reads, answered empty unless a test says otherwise.
async fn empty_searches(server: &MockServer, types: &[&str]) {
    for t in types {
        Mock::given(method("GET"))
            .and(path(format!("/{t}")))
            .respond_with(ok(&searchset(&[], None)))
            .with_priority(10)
            .mount(server)
            .await;
    }
}

fn statuses(results: &[trialgate::criteria::eval::TrialResult]) -> BTreeMap<(String, String), Status> {
    results.iter().map(|r| ((r.patient.clone(), r.trial.clone()), r.status)).collect()
}

/// The fixture cohort served by a mock server gives exactly the verdicts `screen` gives for
/// the same files, with the Patient list paged and batched searches per resource type.
#[tokio::test]
async fn sweep_of_the_fixture_cohort_matches_screen() {
    let dir = root().join("fixtures/bundles");
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in std::fs::read_dir(&dir).unwrap() {
        let b: Value = serde_json::from_str(&std::fs::read_to_string(f.unwrap().path()).unwrap()).unwrap();
        for e in b["entry"].as_array().unwrap() {
            let r = e["resource"].clone();
            by_type.entry(r["resourceType"].as_str().unwrap().to_string()).or_default().push(r);
        }
    }
    let server = MockServer::start().await;
    let types: Vec<String> = by_type.keys().cloned().collect();
    let cap = json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
        "rest": [{"mode": "server", "resource": types.iter().map(|t| json!({"type": t})).collect::<Vec<_>>()}]});
    Mock::given(method("GET"))
        .and(path("/metadata"))
        .respond_with(ok(&cap))
        .mount(&server)
        .await;
    // The Patient list in two pages.
    let mut patients = by_type["Patient"].clone();
    patients.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let (first, second) = patients.split_at(patients.len() / 2);
    let next = format!("{}/Patient?page=2", server.uri());
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(query_param("_count", "200"))
        .respond_with(ok(&searchset(first, Some(next))))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(query_param("page", "2"))
        .respond_with(ok(&searchset(second, None)))
        .mount(&server)
        .await;
    // One batched search per type naming every patient; Observations come in three pages.
    let ids: Vec<&str> = patients.iter().map(|p| p["id"].as_str().unwrap()).collect();
    let list = ids.join(",");
    for t in std::iter::once("Observation").chain(OTHER_TYPES.iter().copied()) {
        // A type the fixtures lack is not in the CapabilityStatement: it must not be asked for.
        let Some(all) = by_type.get(t).cloned() else { continue };
        if t == "Observation" {
            let third = all.len().div_ceil(3);
            let pages: Vec<&[Value]> = all.chunks(third).collect();
            for (i, page) in pages.iter().enumerate() {
                let next = (i + 1 < pages.len()).then(|| format!("{}/Observation?cursor={}", server.uri(), i + 2));
                let m = Mock::given(method("GET")).and(path("/Observation"));
                let m = if i == 0 {
                    m.and(query_param("patient", list.as_str()))
                } else {
                    m.and(query_param("cursor", (i + 1).to_string().as_str()))
                };
                m.respond_with(ok(&searchset(page, next))).expect(1).mount(&server).await;
            }
        } else {
            Mock::given(method("GET"))
                .and(path(format!("/{t}")))
                .and(query_param("patient", list.as_str()))
                .respond_with(ok(&searchset(&all, None)))
                .expect(1)
                .mount(&server)
                .await;
        }
    }

    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let client = FhirClient::new(&server.uri(), fast()).unwrap();
    let (swept, summary) = sweep(&client, &cfg, as_of(), &Decisions::default(), &SweepOptions::default(), None)
        .await
        .expect("sweep");
    let screened = trialgate::screen(&dir, &cfg, as_of(), &Decisions::default()).unwrap();
    assert_eq!(summary.errors, 0);
    assert_eq!(swept.patients, patients.len());
    assert_eq!(statuses(&swept.results), statuses(&screened.results));
    // Same criteria outcomes too, not just the same statuses.
    for (a, b) in swept.results.iter().zip(&screened.results) {
        let oa: Vec<_> = a.criteria.iter().map(|c| (&c.id, c.outcome)).collect();
        let ob: Vec<_> = b.criteria.iter().map(|c| (&c.id, c.outcome)).collect();
        assert_eq!(oa, ob, "{} {}", a.patient, a.trial);
    }
    // metadata + 2 Patient pages + 3 Observation pages + one page per other type served: the
    // fixtures hold no MedicationAdministration, so the mock does not serve it and it is not
    // asked for, and the report says criteria needing it stay unknown.
    let others = types
        .iter()
        .filter(|t| !["Patient", "Observation", "Medication"].contains(&t.as_str()))
        .count();
    assert_eq!(summary.requests as usize, 1 + 2 + 3 + others);
    assert!(!summary.types.contains(&"MedicationAdministration".to_string()));
    assert!(
        swept
            .issues
            .iter()
            .any(|i| i.message.contains("does not serve MedicationAdministration")),
        "{:?}",
        swept.issues
    );
    assert_eq!(summary.retries, 0);
}

/// 429 with Retry-After, then 500, then success: the patient is screened, the retries counted,
/// and the server's Retry-After waited for.
#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    let server = mock::server_without_capabilities().await;
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream unavailable"))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .respond_with(ok(&searchset(&[egfr("o1", "p1", 40.0)], None)))
        .with_priority(3)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(ok(&searchset(&[patient("p1")], None)))
        .mount(&server)
        .await;

    let cfg = config("NCT06406205");
    let client = FhirClient::new(&server.uri(), fast()).unwrap();
    let opts = SweepOptions {
        cohort: Cohort::Ids(vec!["p1".into()]),
        ..Default::default()
    };
    empty_searches(&server, OTHER_TYPES).await;
    let started = std::time::Instant::now();
    let (s, summary) = sweep(&client, &cfg, as_of(), &Decisions::default(), &opts, None).await.unwrap();
    assert_eq!(summary.errors, 0);
    assert_eq!(summary.retries, 2, "one 429 and one 503 retried");
    assert!(started.elapsed() >= Duration::from_millis(950), "Retry-After: 1 was honoured");
    let r = &s.results[0];
    assert_eq!(r.patient, "Patient/p1");
    assert_eq!(r.status, Status::Ineligible, "eGFR 40 excludes (exc-1)");
}

/// A truncated body is retried; a page that never comes right marks its patients `error`
/// with the reason, while the others in the batch are still screened.
#[tokio::test]
async fn a_failing_patient_is_reported_and_does_not_stop_the_others() {
    let server = mock::server_without_capabilities().await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(query_param("_id", "good,bad"))
        .respond_with(ok(&searchset(&[patient("good"), patient("bad")], None)))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(query_param("_id", "good"))
        .respond_with(ok(&searchset(&[patient("good")], None)))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(query_param("_id", "bad"))
        .respond_with(ok(&searchset(&[patient("bad")], None)))
        .mount(&server)
        .await;
    let oo = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
        "diagnostics": "Observation index for patient bad is being rebuilt"}]});
    // The batch fails (the bad patient is in it), then each patient is tried alone.
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .and(query_param("patient", "good,bad"))
        .respond_with(ResponseTemplate::new(500).set_body_raw(oo.to_string(), "application/fhir+json"))
        .mount(&server)
        .await;
    // The good patient's page first arrives cut off, then whole.
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .and(query_param("patient", "good"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            r#"{"resourceType":"Bundle","type":"searchset","entry":[{"res"#,
            "application/fhir+json",
        ))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .and(query_param("patient", "good"))
        .respond_with(ok(&searchset(&[egfr("o1", "good", 80.0)], None)))
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .and(query_param("patient", "bad"))
        .respond_with(ResponseTemplate::new(500).set_body_raw(oo.to_string(), "application/fhir+json"))
        .mount(&server)
        .await;
    empty_searches(&server, OTHER_TYPES).await;

    let cfg = config("NCT06406205");
    let client = FhirClient::new(&server.uri(), fast()).unwrap();
    let opts = SweepOptions {
        cohort: Cohort::Ids(vec!["good".into(), "bad".into()]),
        ..Default::default()
    };
    let (s, summary) = sweep(&client, &cfg, as_of(), &Decisions::default(), &opts, None).await.unwrap();
    assert_eq!(summary.patients, 2);
    assert_eq!(summary.errors, 1);
    let by: BTreeMap<&str, &trialgate::criteria::eval::TrialResult> = s.results.iter().map(|r| (r.patient.as_str(), r)).collect();
    let bad = by["Patient/bad"];
    assert_eq!(bad.status, Status::Error);
    let reason = bad.record.as_deref().unwrap();
    assert!(
        reason.contains("HTTP 500") && reason.contains("index for patient bad is being rebuilt"),
        "{reason}"
    );
    let good = by["Patient/good"];
    assert_ne!(good.status, Status::Error);
    let exc1 = good.criteria.iter().find(|c| c.id == "exc-1").unwrap();
    assert_eq!(exc1.outcome, trialgate::criteria::Outcome::NotMet, "{}", exc1.reason);
    assert!(summary.retries >= 1, "the truncated page was retried");
    // The report says so in every format.
    assert!(trialgate::report::csv(&s).contains("Patient/bad,NCT06406205,error"));
}

/// A server that never answers in time: the request times out, is retried, and the patient
/// ends up `error` with a reason that says so.
#[tokio::test]
async fn timeouts_end_in_an_error_with_the_reason() {
    let server = mock::server_without_capabilities().await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(ok(&searchset(&[patient("slow")], None)))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .respond_with(ok(&searchset(&[], None)).set_delay(Duration::from_secs(3)))
        .mount(&server)
        .await;
    empty_searches(&server, OTHER_TYPES).await;
    let cfg = config("NCT06406205");
    let opts = ClientOptions {
        read_timeout: Duration::from_millis(300),
        max_retries: 1,
        ..fast()
    };
    let client = FhirClient::new(&server.uri(), opts).unwrap();
    let sweep_opts = SweepOptions {
        cohort: Cohort::Ids(vec!["slow".into()]),
        ..Default::default()
    };
    let (s, summary) = sweep(&client, &cfg, as_of(), &Decisions::default(), &sweep_opts, None)
        .await
        .unwrap();
    assert_eq!(summary.errors, 1);
    assert_eq!(summary.retries, 1);
    let reason = s.results[0].record.as_deref().unwrap();
    assert!(reason.to_lowercase().contains("time"), "{reason}");
}

/// A sweep of a search the server answers with `status` and `body`, once (`expect(1)`): the
/// error it stops with, and how many retries the client made.
async fn sweep_refused(status: u16, body: String) -> (String, u64) {
    let server = mock::server_without_capabilities().await;
    Mock::given(method("GET"))
        .and(path("/Condition"))
        .respond_with(ResponseTemplate::new(status).set_body_raw(body, "application/fhir+json"))
        .expect(1)
        .mount(&server)
        .await;
    let cfg = config("NCT06406205");
    let client = FhirClient::new(&server.uri(), fast()).unwrap();
    let opts = SweepOptions {
        cohort: Cohort::Search("Condition?code=http://snomed.info/sct|55464009".into()),
        ..Default::default()
    };
    let Err(err) = sweep(&client, &cfg, as_of(), &Decisions::default(), &opts, None).await else {
        panic!("an unreadable cohort must stop the sweep");
    };
    (err.to_string(), client.stats.retries.load(std::sync::atomic::Ordering::Relaxed))
}

/// A client error from the server (a bad search) is not retried, and the OperationOutcome is
/// shown in the server's own words; an unreadable cohort stops the sweep with that reason.
#[tokio::test]
async fn operation_outcomes_are_shown_and_client_errors_not_retried() {
    let oo = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported",
        "diagnostics": "Search parameter 'code' is not supported for Condition"}]});
    let (err, retries) = sweep_refused(400, oo.to_string()).await;
    assert!(
        err.contains("HTTP 400") && err.contains("Search parameter 'code' is not supported for Condition"),
        "{err}"
    );
    assert_eq!(retries, 0);
}

/// A server that says it cannot do something (501) is not asked again.
#[tokio::test]
async fn not_implemented_is_not_retried() {
    let (err, retries) = sweep_refused(501, String::new()).await;
    assert!(err.contains("HTTP 501"), "{err}");
    assert_eq!(retries, 0);
}

/// The real binary: `sweep --server` with a bearer token from an environment variable. Every
/// request carries the token; the token appears in no output; the summary goes to stderr.
#[tokio::test]
async fn the_sweep_command_sends_the_token_and_never_prints_it() {
    use wiremock::matchers::header;
    let server = MockServer::start().await;
    let auth = || header("Authorization", "Bearer s3cr3t-t0ken");
    Mock::given(method("GET"))
        .and(path("/metadata"))
        .and(auth())
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(auth())
        .respond_with(ok(&searchset(&[patient("p1")], None)))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .and(auth())
        .respond_with(ok(&searchset(&[egfr("o1", "p1", 40.0)], None)))
        .mount(&server)
        .await;
    for t in OTHER_TYPES {
        Mock::given(method("GET"))
            .and(path(format!("/{t}")))
            .and(auth())
            .respond_with(ok(&searchset(&[], None)))
            .mount(&server)
            .await;
    }
    // Anything without the token is refused, so a request that forgot it would fail the sweep.
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(401))
        .with_priority(100)
        .mount(&server)
        .await;
    let uri = server.uri();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
            .current_dir(root())
            .env("TG_TEST_TOKEN", "s3cr3t-t0ken")
            .env("RUST_LOG", "debug")
            .args([
                "sweep",
                "--server",
                &uri,
                "--patient",
                "p1",
                "--trial",
                "NCT06406205",
                "--as-of",
                "2026-06-01",
                "--format",
                "csv",
                "--token-env",
                "TG_TEST_TOKEN",
            ])
            .output()
            .expect("trialgate runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("patient,trial,status"), "{stdout}");
    assert!(stdout.contains("Patient/p1,NCT06406205,ineligible,exc-1"), "{stdout}");
    assert!(stderr.contains("sweep: 1 patient(s), 0 in error"), "{stderr}");
    assert!(!stdout.contains("s3cr3t") && !stderr.contains("s3cr3t"), "the token leaked");
}

/// `config/gateway.toml`-style configuration drives the sweep: server and cohort from the
/// file, the batch size from the environment; a patient that cannot be fetched makes the exit
/// status 1 after the report is written.
#[tokio::test]
async fn the_gateway_configuration_drives_the_sweep() {
    let server = mock::server_without_capabilities().await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(query_param("_id", "p1"))
        .respond_with(ok(&searchset(&[patient("p1")], None)))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .and(query_param("patient", "p1"))
        .respond_with(ok(&searchset(&[egfr("o1", "p1", 80.0)], None)))
        .mount(&server)
        .await;
    // p2 does not exist on the server.
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(query_param("_id", "p2"))
        .respond_with(ok(&searchset(&[], None)))
        .mount(&server)
        .await;
    empty_searches(&server, &["Observation"]).await;
    empty_searches(&server, OTHER_TYPES).await;
    let dir = std::env::temp_dir().join(format!("trialgate-gw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!("[server]\nurl = \"{}\"\nmax_retries = 0\n[cohort]\nkind = \"ids\"\nids = [\"p1\", \"p2\"]\n[sweep]\ntrials = [\"NCT06406205\"]\nbatch = 50\n", server.uri()),
    )
    .unwrap();
    let cfg_path = cfg.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
            .current_dir(root())
            .env("TRIALGATE_CONFIG", &cfg_path)
            .env("TRIALGATE_SWEEP_BATCH", "1")
            .args(["sweep", "--as-of", "2026-06-01", "--format", "csv"])
            .output()
            .expect("trialgate runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stdout.contains("Patient/p1,NCT06406205,potentially-eligible"), "{stdout}");
    assert!(
        stdout.contains("Patient/p2,NCT06406205,error,record: the server returned no Patient resource"),
        "{stdout}"
    );
    assert!(stderr.contains("1 patient(s) could not be screened"), "{stderr}");
    // The summary counts each trial's verdicts and says why patients are in error.
    assert!(
        stderr.contains("  NCT06406205: 0 eligible, 1 potentially eligible, 0 ineligible, 1 in error\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("  1 patient(s) in error: the server returned no Patient resource for this id\n"),
        "{stderr}"
    );
    // Batch size 1 from the environment: each patient searched on its own.
    let reqs = server.received_requests().await.unwrap();
    assert!(
        reqs.iter().any(|r| r.url.query().is_some_and(|q| q.contains("patient=p1&"))),
        "per-patient searches"
    );
    assert!(
        !reqs
            .iter()
            .any(|r| r.url.query().is_some_and(|q| q.contains("p1%2Cp2") || q.contains("p1,p2")))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CapabilityStatement whose Observation declares these search parameters.
fn capability_with(observation_params: &[&str]) -> Value {
    let mut resources: Vec<Value> = ["Patient"]
        .iter()
        .chain(OTHER_TYPES)
        .map(|t| json!({"type": t, "searchParam": [{"name": "patient", "type": "reference"}]}))
        .collect();
    resources.push(json!({"type": "Observation",
        "searchParam": observation_params.iter().map(|p| json!({"name": p, "type": "token"})).collect::<Vec<_>>()}));
    json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
        "rest": [{"mode": "server", "resource": resources}]})
}

/// The Observation query a sweep of trial 000 sends, given what the server declares.
async fn observation_query(observation_params: Option<&[&str]>, code_filter: bool) -> String {
    let server = MockServer::start().await;
    let metadata = match observation_params {
        Some(p) => ok(&capability_with(p)),
        None => ResponseTemplate::new(404),
    };
    Mock::given(method("GET"))
        .and(path("/metadata"))
        .respond_with(metadata)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(ok(&searchset(&[patient("p1")], None)))
        .mount(&server)
        .await;
    empty_searches(&server, &["Observation"]).await;
    empty_searches(&server, OTHER_TYPES).await;
    let client = FhirClient::new(&server.uri(), fast()).unwrap();
    let opts = SweepOptions {
        cohort: Cohort::Ids(vec!["p1".into()]),
        code_filter,
        ..Default::default()
    };
    let (_, summary) = sweep(&client, &config("NCT06406205"), as_of(), &Decisions::default(), &opts, None)
        .await
        .unwrap();
    assert_eq!(summary.errors, 0);
    let reqs = server.received_requests().await.unwrap();
    let obs: Vec<_> = reqs.iter().filter(|r| r.url.path() == "/Observation").collect();
    assert_eq!(obs.len(), 1);
    obs[0].url.query().unwrap_or_default().replace("%2C", ",")
}

/// Observations are asked for by the codes the trial reads: by `combo-code` where the server
/// declares it (it looks into components), else by `code` plus the panels whose components
/// carry a needed lab; with neither declared, or the filter off, every Observation is fetched.
#[tokio::test]
async fn observations_are_fetched_by_the_codes_the_trials_read() {
    let codes_of = |q: &str, param: &str| -> Vec<String> {
        let prefix = format!("{param}=");
        q.split('&')
            .find_map(|kv| kv.strip_prefix(prefix.as_str()))
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    };
    let combo = observation_query(Some(&["patient", "code", "combo-code"]), true).await;
    let got = codes_of(&combo, "combo-code");
    // eGFR as reported, serum creatinine to derive it from, UPCR, and a blood-count code.
    for needed in ["98979-8", "2160-0", "2890-2", "26499-4"] {
        assert!(got.iter().any(|c| c == needed), "{needed} missing from {combo}");
    }
    assert!(!got.iter().any(|c| c == "85354-9"), "combo-code needs no panel codes: {combo}");
    assert!(!combo.contains("&code="), "{combo}");

    let code = observation_query(Some(&["patient", "code"]), true).await;
    let got = codes_of(&code, "code");
    assert!(got.iter().any(|c| c == "98979-8"), "{code}");
    assert!(
        got.iter().any(|c| c == "85354-9"),
        "the blood-pressure panel is asked for by its code: {code}"
    );

    let none = observation_query(Some(&["patient"]), true).await;
    assert!(!none.contains("code="), "the server declares no code search: {none}");
    let unknown = observation_query(None, true).await;
    assert!(!unknown.contains("code="), "no CapabilityStatement, no assumption: {unknown}");
    let off = observation_query(Some(&["patient", "code", "combo-code"]), false).await;
    assert!(!off.contains("code="), "the filter turned off: {off}");
}

/// Many patients times many codes make a URL no proxy should be trusted with: the search goes
/// as `POST [type]/_search` with a form body, its next pages are followed by GET, and the
/// patients are screened from what came back.
#[tokio::test]
async fn long_searches_go_as_post_and_their_pages_are_followed() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/metadata"))
        .respond_with(ok(&capability_with(&["patient", "combo-code"])))
        .mount(&server)
        .await;
    let ids: Vec<String> = (0..60).map(|i| format!("5f0c1a8e-93b2-4f6e-9c1d-{i:012}")).collect();
    let patients: Vec<Value> = ids.iter().map(|id| patient(id)).collect();
    Mock::given(method("POST"))
        .and(path("/Patient/_search"))
        .respond_with(ok(&searchset(&patients, None)))
        .mount(&server)
        .await;
    let next = format!("{}/Observation?_cursor=2", server.uri());
    Mock::given(method("POST"))
        .and(path("/Observation/_search"))
        .and(wiremock::matchers::header("content-type", "application/x-www-form-urlencoded"))
        .respond_with(ok(&searchset(&[egfr("o1", &ids[0], 40.0)], Some(next))))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .and(query_param("_cursor", "2"))
        .respond_with(ok(&searchset(&[egfr("o2", &ids[1], 40.0)], None)))
        .expect(1)
        .mount(&server)
        .await;
    for t in OTHER_TYPES {
        Mock::given(method("POST"))
            .and(path(format!("/{t}/_search")))
            .respond_with(ok(&searchset(&[], None)))
            .mount(&server)
            .await;
    }
    let client = FhirClient::new(&server.uri(), fast()).unwrap();
    let opts = SweepOptions {
        cohort: Cohort::Ids(ids.clone()),
        batch: 60,
        ..Default::default()
    };
    let (s, summary) = sweep(&client, &config("NCT06406205"), as_of(), &Decisions::default(), &opts, None)
        .await
        .unwrap();
    assert_eq!((summary.patients, summary.errors), (60, 0));
    let by_patient = statuses(&s.results);
    for (i, id) in ids.iter().enumerate() {
        let st = by_patient[&(format!("Patient/{id}"), "NCT06406205".to_string())];
        if i < 2 {
            assert_eq!(st, Status::Ineligible, "{id}: eGFR 40 from the POSTed search or its next page");
        } else {
            assert_ne!(st, Status::Ineligible, "{id}");
        }
    }
    let reqs = server.received_requests().await.unwrap();
    let post = reqs.iter().find(|r| r.url.path() == "/Observation/_search").unwrap();
    let form = String::from_utf8_lossy(&post.body);
    assert!(form.starts_with(&format!("patient={}", ids[0])), "{form}");
    assert!(form.contains("&combo-code=") && form.contains("98979-8"), "{form}");
    // metadata, Patient, Observation (two pages) and one per other type.
    assert_eq!(summary.requests as usize, 1 + 1 + 2 + OTHER_TYPES.len());
}

/// Two processes with `--shard 1/2` and `2/2` fetch and screen disjoint halves of the cohort
/// that together are the whole of it.
#[tokio::test]
async fn shards_of_a_server_cohort_are_disjoint_and_complete() {
    let server = mock::server_without_capabilities().await;
    // Answers any Patient?_id=a,b,... with those patients.
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(|req: &wiremock::Request| {
            let ids = req
                .url
                .query_pairs()
                .find(|(k, _)| k == "_id")
                .map(|(_, v)| v.split(',').map(patient).collect::<Vec<_>>())
                .unwrap_or_default();
            ok(&searchset(&ids, None))
        })
        .mount(&server)
        .await;
    empty_searches(&server, &["Observation"]).await;
    empty_searches(&server, OTHER_TYPES).await;
    let ids: Vec<String> = (0..20).map(|i| format!("pt-{i}")).collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut requested = Vec::new();
    for k in 1..=2 {
        let shard = trialgate::Shard::parse(&format!("{k}/2")).unwrap();
        let opts = SweepOptions {
            cohort: Cohort::Ids(ids.clone()),
            shard: Some(shard),
            ..Default::default()
        };
        let client = FhirClient::new(&server.uri(), fast()).unwrap();
        let (s, summary) = sweep(&client, &config("NCT06406205"), as_of(), &Decisions::default(), &opts, None)
            .await
            .unwrap();
        assert_eq!(summary.errors, 0);
        for r in &s.results {
            assert!(shard.holds(&r.patient));
            assert!(seen.insert(r.patient.clone()), "{} screened twice", r.patient);
        }
    }
    for r in server.received_requests().await.unwrap() {
        if r.url.path() == "/Patient" {
            for (k, v) in r.url.query_pairs() {
                if k == "_id" {
                    requested.extend(v.split(',').map(str::to_string));
                }
            }
        }
    }
    let all: std::collections::BTreeSet<String> = ids.iter().map(|i| format!("Patient/{i}")).collect();
    assert_eq!(seen, all, "every patient once");
    requested.sort();
    requested.dedup_by(|a, b| {
        assert_ne!(a, b, "{a} fetched by both shards");
        false
    });
    assert_eq!(requested.len(), ids.len(), "each patient fetched by one shard only");
}

/// `daemon --once` runs the configured sweep with the schedule's state and reports folder; a
/// second run is compared with the first; a bad cron is refused naming the key.
#[tokio::test]
async fn the_daemon_runs_the_configured_sweep_with_state_and_reports() {
    let server = mock::server_without_capabilities().await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(ok(&searchset(&[patient("p1")], None)))
        .mount(&server)
        .await;
    empty_searches(&server, &["Observation"]).await;
    empty_searches(&server, OTHER_TYPES).await;
    let dir = std::env::temp_dir().join(format!("trialgate-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nurl = \"{}\"\n[sweep]\ntrials = [\"NCT06406205\"]\n[schedule]\ncron = \"0 2 * * *\"\nstate = \"{}\"\nreports = \"{}\"\n",
            server.uri(),
            dir.join("state.sqlite").display(),
            dir.join("reports").display()
        ),
    )
    .unwrap();
    let run = || {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
                .current_dir(root())
                .env("TRIALGATE_CONFIG", &cfg)
                .env_remove("RUST_LOG")
                .args(["daemon", "--once"])
                .output()
                .expect("trialgate runs")
        })
    };
    let first = run().await.unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = run().await.unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert!(
        err.contains("0 newly eligible or potentially eligible, 0 newly ineligible"),
        "{err}"
    );
    let reports: Vec<_> = std::fs::read_dir(dir.join("reports"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert!(!reports.is_empty());
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&reports[0]).unwrap()).unwrap();
    assert_eq!(report["summary"]["patients"], 1);
    assert!(dir.join("state.sqlite").exists());

    // Without --once, a schedule that cannot parse is refused before anything runs.
    let bad = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
                .current_dir(root())
                .env("TRIALGATE_CONFIG", &cfg)
                .env("TRIALGATE_SCHEDULE_CRON", "0 25 * * *")
                .args(["daemon"])
                .output()
                .expect("trialgate runs")
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(
        err.contains("[schedule] cron (from TRIALGATE_SCHEDULE_CRON)") && err.contains("hour"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With write-back the report is made as the subjects are written: when a write fails
/// halfway, standard output gets nothing (not the report's first rows), and the temporary
/// copy is removed; when all goes well, standard output gets the whole report.
#[tokio::test]
async fn a_failed_write_back_leaves_no_half_report_on_standard_output() {
    let server_where = |batch: ResponseTemplate| async move {
        let server = mock::server_without_capabilities().await;
        Mock::given(method("GET"))
            .and(path("/Patient"))
            .respond_with(ok(&searchset(&[patient("p1"), patient("p2")], None)))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/Observation"))
            .respond_with(ok(&searchset(&[egfr("o1", "p1", 80.0), egfr("o2", "p2", 85.0)], None)))
            .mount(&server)
            .await;
        empty_searches(&server, OTHER_TYPES).await;
        mock::accepts_research_study(&server).await;
        Mock::given(method("GET"))
            .and(path("/ResearchSubject"))
            .respond_with(ok(&searchset(&[], None)))
            .mount(&server)
            .await;
        Mock::given(method("POST")).and(path("/")).respond_with(batch).mount(&server).await;
        server
    };
    let run = |uri: String, tmp: PathBuf, state: PathBuf| {
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&tmp).unwrap();
            std::fs::create_dir_all(&state).unwrap();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
                .current_dir(root())
                .env("TMPDIR", &tmp)
                .args(["sweep", "--server", &uri, "--patient", "p1", "--patient", "p2"])
                .args(["--trial", "NCT06406205", "--as-of", "2026-06-01", "--format", "csv", "--write-back"])
                .arg("--state")
                .arg(state.join("state.sqlite"))
                .arg("--changes")
                .arg(state.join("changes.csv"))
                .output()
                .expect("trialgate runs");
            let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
            let _ = std::fs::remove_dir_all(&tmp);
            (out, left.len())
        })
    };
    let tmp = |name: &str| std::env::temp_dir().join(format!("trialgate-held-{name}-{}", std::process::id()));

    let broken = server_where(ResponseTemplate::new(200).set_body_raw("not a Bundle", "application/fhir+json")).await;
    let state = tmp("state");
    let (out, left) = run(broken.uri(), tmp("broken"), state.clone()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("writing ResearchSubjects"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "no half report");
    assert_eq!(left, 0, "the held report is removed");
    // Nor is the run finished: the next one resumes it (write-back included) rather than
    // comparing itself with a run whose report nobody got.
    assert!(!state.join("changes.csv").exists());
    let unfinished: i64 = rusqlite::Connection::open(state.join("state.sqlite"))
        .unwrap()
        .query_row("SELECT count(*) FROM runs WHERE finished IS NULL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(unfinished, 1);
    let _ = std::fs::remove_dir_all(&state);

    let answer = json!({"resourceType": "Bundle", "type": "batch-response",
        "entry": [{"response": {"status": "201 Created"}}, {"response": {"status": "201 Created"}}]});
    let working = server_where(ok(&answer)).await;
    let (out, left) = run(working.uri(), tmp("working"), state.clone()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("2 created"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("patient,trial,status"), "{stdout}");
    assert!(stdout.contains("Patient/p1,NCT06406205,potentially-eligible"), "{stdout}");
    assert!(stdout.contains("Patient/p2,NCT06406205,potentially-eligible"), "{stdout}");
    assert_eq!(left, 0, "the held report is removed");
    assert_eq!(
        std::fs::read_to_string(state.join("changes.csv")).unwrap(),
        "patient,trial,from,to\n",
        "finished, as the first run of its cohort"
    );
    let _ = std::fs::remove_dir_all(&state);
}
