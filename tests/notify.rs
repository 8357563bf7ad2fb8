//! `serve` with a FHIR server behind it: Subscription notifications in the R4 Backport, R4B and
//! R5 shapes re-screen the patient they name and write a changed status back (recorded in the
//! verdict history); a gap in the event numbers is repaired; `$screen` reads a patient from
//! the server; `POST /screen?write_back=true` finds the posted patient by MRN first and
//! refuses when it cannot.

use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trialgate::fhir::client::{ClientOptions, FhirClient};
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

mod mock;

const TRIAL: &str = "NCT06406205";
const MRN_SYSTEM: &str = "urn:oid:2.16.840.1.113883.19.5";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fhir(body: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.to_string(), "application/fhir+json")
}

fn searchset(resources: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "searchset",
        "entry": resources.into_iter().map(|r| json!({"resource": r, "search": {"mode": "match"}})).collect::<Vec<_>>()})
}

fn patient() -> Value {
    json!({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1990-01-01",
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
            "system": MRN_SYSTEM, "value": "MRN-0001"}]})
}

/// An eGFR of 40 yesterday: NCT06406205 needs at least 45, so the patient turns ineligible.
fn low_egfr() -> Value {
    let yesterday = trialgate::time::Instant(trialgate::time::Instant::now().0 - 86_400).to_string();
    json!({"resourceType": "Observation", "id": "o3", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "98979-8"}]},
        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": yesterday,
        "valueQuantity": {"value": 40, "unit": "mL/min/{1.73_m2}", "system": "http://unitsofmeasure.org", "code": "mL/min/{1.73_m2}"}})
}

/// A FHIR server that keeps the ResearchSubjects written to it, so updates can be seen.
struct Ehr {
    server: MockServer,
    subjects: Arc<Mutex<Vec<Value>>>,
}

impl Ehr {
    async fn start() -> Ehr {
        let server = mock::server_without_capabilities().await;
        let subjects: Arc<Mutex<Vec<Value>>> = Arc::default();
        Mock::given(method("GET"))
            .and(path("/Patient"))
            .and(query_param("_id", "p1"))
            .respond_with(fhir(searchset(vec![patient()])))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/Patient"))
            .and(query_param("identifier", format!("{MRN_SYSTEM}|MRN-0001")))
            .respond_with(fhir(searchset(vec![json!({"resourceType": "Patient", "id": "p1"})])))
            .mount(&server)
            .await;
        mock::accepts_research_study(&server).await;
        let kept = subjects.clone();
        Mock::given(method("GET"))
            .and(path("/ResearchSubject"))
            .respond_with(move |_: &Request| fhir(searchset(kept.lock().unwrap().clone())))
            .mount(&server)
            .await;
        let kept = subjects.clone();
        Mock::given(method("POST"))
            .and(path("/"))
            .respond_with(move |req: &Request| {
                let batch: Value = serde_json::from_slice(&req.body).unwrap();
                let mut store = kept.lock().unwrap();
                let mut answers = Vec::new();
                for e in batch["entry"].as_array().unwrap() {
                    let mut r = e["resource"].clone();
                    if e["request"]["method"] == "POST" {
                        r["id"] = json!(format!("rs{}", store.len() + 1));
                        r["meta"] = json!({"versionId": "1"});
                        store.push(r);
                        answers.push(json!({"response": {"status": "201 Created"}}));
                    } else {
                        let id = e["request"]["url"]
                            .as_str()
                            .unwrap()
                            .trim_start_matches("ResearchSubject/")
                            .to_string();
                        let slot = store.iter_mut().find(|s| s["id"] == id.as_str()).unwrap();
                        r["meta"] = json!({"versionId": "2"});
                        *slot = r;
                        answers.push(json!({"response": {"status": "200 OK"}}));
                    }
                }
                fhir(json!({"resourceType": "Bundle", "type": "batch-response", "entry": answers}))
            })
            .mount(&server)
            .await;
        // Everything else the trial reads: nothing yet.
        Mock::given(method("GET"))
            .respond_with(fhir(searchset(Vec::new())))
            .with_priority(10)
            .mount(&server)
            .await;
        Ehr { server, subjects }
    }

    /// The lab result arrives: searches find it, and it can be read by id.
    async fn add_low_egfr(&self) {
        Mock::given(method("GET"))
            .and(path("/Observation"))
            .respond_with(fhir(searchset(vec![low_egfr()])))
            .with_priority(1)
            .mount(&self.server)
            .await;
        Mock::given(method("GET"))
            .and(path("/Observation/o3"))
            .respond_with(fhir(low_egfr()))
            .with_priority(1)
            .mount(&self.server)
            .await;
    }

    fn status(&self) -> Option<String> {
        let s = self.subjects.lock().unwrap();
        s.iter()
            .find(|r| r["individual"]["reference"] == "Patient/p1")
            .and_then(|r| r["status"].as_str().map(str::to_string))
    }

    async fn requests_to(&self, p: &str) -> usize {
        self.server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.url.path() == p)
            .count()
    }
}

/// The service against `ehr`, with write-back and a history in `db`.
async fn serve(ehr: &Ehr, db: &std::path::Path, write: bool) -> String {
    serve_trials(ehr, db, write, &[TRIAL]).await
}

async fn serve_trials(ehr: &Ehr, db: &std::path::Path, write: bool, trials: &[&str]) -> String {
    let trials: Vec<String> = trials.iter().map(|t| t.to_string()).collect();
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &trials).unwrap();
    let opts = ClientOptions {
        max_retries: 1,
        ..Default::default()
    };
    let client = FhirClient::new(&ehr.server.uri(), opts).unwrap();
    let writer = write.then(|| client.counted_apart());
    let location = trialgate::state::Location::File(db.to_path_buf());
    let ledger = trialgate::state::Ledger::open(&location).unwrap();
    let live = trialgate::live::Live::new(client, writer, Default::default(), true, Some(ledger));
    let app = trialgate::serve::App::with(
        cfg,
        vec!["tok".into()],
        1 << 20,
        trialgate::serve::Services {
            state: Some(location),
            live: Some(Arc::new(live)),
            ..Default::default()
        },
    );
    mock::listen(app).await
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .bearer_auth("tok")
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn r4_notification(kind: &str, events: &[(u64, &str)]) -> Value {
    let mut params = vec![
        json!({"name": "subscription", "valueReference": {"reference": "Subscription/s1"}}),
        json!({"name": "topic", "valueCanonical": "http://example.org/SubscriptionTopic/lab-result"}),
        json!({"name": "status", "valueCode": "active"}),
        json!({"name": "type", "valueCode": kind}),
        json!({"name": "events-since-subscription-start", "valueString": events.last().map_or(0, |e| e.0).to_string()}),
    ];
    let mut entries = Vec::new();
    for (n, focus) in events {
        params.push(json!({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": n.to_string()},
            {"name": "focus", "valueReference": {"reference": focus}}]}));
        entries.push(json!({"fullUrl": format!("http://ehr/fhir/{focus}"), "request": {"method": "PUT", "url": focus}}));
    }
    entries.insert(
        0,
        json!({"fullUrl": "urn:uuid:status", "resource": {"resourceType": "Parameters", "parameter": params}}),
    );
    json!({"resourceType": "Bundle", "type": "history", "entry": entries})
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trialgate-notify-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn a_new_lab_result_notified_id_only_changes_the_written_status() {
    let ehr = Ehr::start().await;
    let dir = temp("idonly");
    let db = dir.join("state.sqlite");
    let base = serve(&ehr, &db, true).await;

    // The subscription's handshake is acknowledged.
    let (status, v) = post(&format!("{base}/notify"), r4_notification("handshake", &[])).await;
    assert_eq!(status, 200, "{v}");

    // The patient as the server has it now, screened and written.
    let (status, report) = post(&format!("{base}/fhir/Patient/p1/$screen?write_back=true"), json!({})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["results"][0]["status"], "potentially-eligible", "{report}");
    assert_eq!(report["write_back"]["created"], 1, "{report}");
    assert_eq!(ehr.status().as_deref(), Some("potential-candidate"));

    // A low eGFR arrives; the server notifies its id only.
    ehr.add_low_egfr().await;
    let (status, v) = post(
        &format!("{base}/notify"),
        r4_notification("event-notification", &[(1, "Observation/o3")]),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let took = wait_for("the ineligible status written back", async || {
        ehr.status().as_deref() == Some("ineligible")
    })
    .await;
    eprintln!("notification to written-back status change: {took:?}");
    assert!(ehr.requests_to("/Observation/o3").await >= 1, "the notified resource was read");

    // The history holds the change, from the notification.
    let ledger = trialgate::state::Ledger::open(&trialgate::state::Location::File(db.clone())).unwrap();
    let history = ledger.history("Patient/p1", TRIAL).unwrap();
    let moves: Vec<(Option<&str>, &str, &str)> = history
        .iter()
        .map(|t| (t.from.as_deref(), t.to.as_str(), t.source.as_str()))
        .collect();
    assert_eq!(
        moves,
        [
            (None, "potentially-eligible", "$screen"),
            (Some("potentially-eligible"), "ineligible", "notification")
        ]
    );

    // The coordinator's page shows the change the notification made, with the status before.
    let page = reqwest::Client::new()
        .get(format!("{base}/"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let row = page
        .split("<tr class=\"ineligible\"")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_default();
    assert!(row.contains("Patient/p1"), "{page}");
    assert!(
        row.contains("<mark class=\"newly-ineligible\">newly ineligible</mark><br><small>was potentially eligible</small>"),
        "{row}"
    );

    // The same event again (a redelivery): nothing changes, nothing more is written.
    let before = ehr.requests_to("/").await;
    let (status, _) = post(
        &format!("{base}/notify"),
        r4_notification("event-notification", &[(1, "Observation/o3")]),
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ehr.requests_to("/").await, before, "an unchanged verdict is not written again");
    assert_eq!(ledger.history("Patient/p1", TRIAL).unwrap().len(), 2);

    // What happened shows in the metrics.
    let metrics = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "trialgate_notifications_total{type=\"event-notification\"} 2",
        "trialgate_notifications_total{type=\"handshake\"} 1",
        "trialgate_status_changes_total 2",
        "trialgate_subjects_written_total 2",
        "trialgate_notify_to_written_seconds_count 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(
        metrics.contains("trialgate_fhir_requests_total{use=\"write\",outcome=\"sent\"}"),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn r4b_full_resource_r5_and_empty_payloads_are_understood() {
    let ehr = Ehr::start().await;
    let dir = temp("shapes");
    let base = serve(&ehr, &dir.join("state.sqlite"), false).await;
    let status_of = |kind: &str, number: Value| {
        json!({"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
            "eventsSinceSubscriptionStart": number, "subscription": {"reference": "Subscription/s2"},
            "notificationEvent": [{"eventNumber": number, "focus": {"reference": "Observation/o3"}}]})
    };
    let screened = async || ehr.requests_to("/Patient").await;

    // R4B, full-resource: the resource comes along; no need to read it.
    let before = screened().await;
    let r4b = json!({"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": status_of("event-notification", json!("1"))}, {"fullUrl": "Observation/o3", "resource": low_egfr()}]});
    let (status, v) = post(&format!("{base}/notify"), r4b).await;
    assert_eq!(status, 200, "{v}");
    wait_for("a re-screen after the R4B notification", async || screened().await > before).await;
    assert_eq!(ehr.requests_to("/Observation/o3").await, 0, "a full resource is not read again");

    // R5, with the event number as a JSON number; the resource is read by id.
    ehr.add_low_egfr().await;
    let before = screened().await;
    let r5 = json!({"resourceType": "Bundle", "type": "subscription-notification", "entry": [
        {"resource": status_of("event-notification", json!(2))}, {"fullUrl": "http://ehr/fhir/Observation/o3"}]});
    let (status, v) = post(&format!("{base}/notify"), r5).await;
    assert_eq!(status, 200, "{v}");
    wait_for("a re-screen after the R5 notification", async || screened().await > before).await;
    assert!(ehr.requests_to("/Observation/o3").await >= 1, "an id-only entry is read");

    // Heartbeats are acknowledged.
    let hb = json!({"resourceType": "Bundle", "type": "subscription-notification", "entry": [
        {"resource": {"resourceType": "SubscriptionStatus", "type": "heartbeat", "eventsSinceSubscriptionStart": 2,
          "subscription": {"reference": "Subscription/s2"}}}]});
    assert_eq!(post(&format!("{base}/notify"), hb).await.0, 200);

    // An empty payload names nothing: what changed is asked of the server by _lastUpdated.
    let empty = json!({"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {"resourceType": "SubscriptionStatus", "type": "event-notification", "eventsSinceSubscriptionStart": "3",
          "subscription": {"reference": "Subscription/s2"}, "notificationEvent": [{"eventNumber": "3"}]}}]});
    let before = screened().await;
    assert_eq!(post(&format!("{base}/notify"), empty).await.0, 200);
    wait_for("a re-screen after the empty notification", async || screened().await > before).await;
    let asked = ehr.server.received_requests().await.unwrap();
    assert!(
        asked
            .iter()
            .any(|r| r.url.path() == "/Observation" && r.url.query().unwrap_or("").contains("_lastUpdated=ge")),
        "an empty notification asks for what changed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server that keeps its events: `$events` answers for events 2 and 3 (the second about
/// Observation o3), should they be missed.
async fn ehr_keeping_events_2_and_3() -> Ehr {
    let ehr = Ehr::start().await;
    Mock::given(method("GET"))
        .and(path("/Subscription/s1/$events"))
        .and(query_param("eventsSinceNumber", "2"))
        .and(query_param("eventsUntilNumber", "3"))
        .respond_with(fhir(r4_notification("query-event", &[(2, "Patient/p1"), (3, "Observation/o3")])))
        .with_priority(1)
        .mount(&ehr.server)
        .await;
    ehr.add_low_egfr().await;
    ehr
}

#[tokio::test]
async fn a_gap_in_the_event_numbers_is_repaired() {
    let ehr = ehr_keeping_events_2_and_3().await;
    let dir = temp("gap");
    let base = serve(&ehr, &dir.join("state.sqlite"), false).await;
    assert_eq!(
        post(
            &format!("{base}/notify"),
            r4_notification("event-notification", &[(1, "Patient/p1")])
        )
        .await
        .0,
        200
    );
    wait_for("the first event's re-screen", async || ehr.requests_to("/Patient").await >= 1).await;
    let (status, _) = post(
        &format!("{base}/notify"),
        r4_notification("event-notification", &[(4, "Patient/p1")]),
    )
    .await;
    assert_eq!(status, 200);
    wait_for("$events asked for the missed events", async || {
        ehr.requests_to("/Subscription/s1/$events").await == 1
    })
    .await;
    wait_for("the missed event's resource read", async || {
        ehr.requests_to("/Observation/o3").await >= 1
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The last event seen is kept in the state database: after a restart, the first event tells
/// what was missed while the service was down (2 and 3), and it is repaired the same way.
#[tokio::test]
async fn a_gap_across_a_restart_is_repaired() {
    let ehr = ehr_keeping_events_2_and_3().await;
    let dir = temp("restart-gap");
    let db = dir.join("state.sqlite");
    let before = serve(&ehr, &db, false).await;
    let event = |n: u64| r4_notification("event-notification", &[(n, "Patient/p1")]);
    assert_eq!(post(&format!("{before}/notify"), event(1)).await.0, 200);
    wait_for("the first event's re-screen", async || ehr.requests_to("/Patient").await >= 1).await;
    wait_for("the event kept", async || {
        let ledger = trialgate::state::Ledger::open(&trialgate::state::Location::File(db.clone())).unwrap();
        ledger.events_seen().unwrap().iter().any(|(sub, n, _)| sub == "s1" && *n == 1)
    })
    .await;

    // Another service on the same database, as after a restart.
    let after = serve(&ehr, &db, false).await;
    assert_eq!(post(&format!("{after}/notify"), event(4)).await.0, 200);
    wait_for("$events asked for the events missed across the restart", async || {
        ehr.requests_to("/Subscription/s1/$events").await == 1
    })
    .await;
    wait_for("the missed event's resource read", async || {
        ehr.requests_to("/Observation/o3").await >= 1
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn write_back_of_a_posted_patient_goes_through_the_mrn() {
    let ehr = Ehr::start().await;
    let dir = temp("mrn");
    let base = serve(&ehr, &dir.join("state.sqlite"), true).await;
    // The engine's own copy of the patient: a local id, the hospital's MRN.
    let mut local = patient();
    local["id"] = json!("local-77");
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": local}]});
    let (status, report) = post(&format!("{base}/screen?write_back=true"), bundle.clone()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["results"][0]["patient"], "Patient/p1", "{report}");
    assert_eq!(report["write_back"]["created"], 1, "{report}");
    assert_eq!(ehr.status().as_deref(), Some("potential-candidate"));

    // No MRN, an MRN the server does not know: refused, nothing written.
    let writes = ehr.requests_to("/").await;
    let mut no_mrn = local.clone();
    no_mrn["identifier"] = json!([{"system": "urn:other", "value": "x"}]);
    let (status, v) = post(&format!("{base}/screen?write_back=true"), no_mrn).await;
    assert_eq!(status, 422, "{v}");
    assert!(v["issue"][0]["diagnostics"].as_str().unwrap().contains("has no MRN"), "{v}");
    let mut unknown = local.clone();
    unknown["identifier"][0]["value"] = json!("MRN-9999");
    let (status, v) = post(&format!("{base}/screen?write_back=true"), unknown).await;
    assert_eq!(status, 422, "{v}");
    let said = v["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        said.contains("no Patient on the server has the posted MRN") && !said.contains("MRN-9999"),
        "{v}"
    );
    assert_eq!(ehr.requests_to("/").await, writes, "nothing written for a patient the server lacks");

    // Without write-back configured the request is refused, not silently ignored.
    let other = Ehr::start().await;
    let read_only = serve(&other, &dir.join("other.sqlite"), false).await;
    let (status, v) = post(&format!("{read_only}/screen?write_back=true"), bundle).await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["issue"][0]["diagnostics"].as_str().unwrap().contains("[write_back] enabled"),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_notifications_and_unknown_patients_get_clear_4xx() {
    let ehr = Ehr::start().await;
    let dir = temp("bad");
    let base = serve(&ehr, &dir.join("state.sqlite"), false).await;
    for (body, want) in [
        (json!("not an object"), "is a Bundle"),
        (json!({"resourceType": "Observation"}), "is a Bundle"),
        (
            json!({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Patient"}}]}),
            "first entry is Patient",
        ),
    ] {
        let (status, v) = post(&format!("{base}/notify"), body).await;
        assert_eq!(status, 400, "{v}");
        assert!(v["issue"][0]["diagnostics"].as_str().unwrap().contains(want), "{v}");
    }
    // A patient the server does not have.
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(query_param("_id", "nobody"))
        .respond_with(fhir(searchset(Vec::new())))
        .with_priority(1)
        .mount(&ehr.server)
        .await;
    let (status, v) = post(&format!("{base}/fhir/Patient/nobody/$screen"), json!({})).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = post(&format!("{base}/fhir/Patient/bad%20id/$screen"), json!({})).await;
    assert_eq!(status, 400, "{v}");
    // Without a token: 401, as every route but /health.
    let resp = reqwest::Client::new()
        .post(format!("{base}/notify"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn subscribe_registers_the_subscription_once_and_updates_it_after() {
    let server = MockServer::start().await;
    let created = Arc::new(Mutex::new(None::<Value>));
    let kept = created.clone();
    Mock::given(method("GET"))
        .and(path("/Subscription"))
        .respond_with(move |_: &Request| {
            let found: Vec<Value> = kept.lock().unwrap().iter().cloned().collect();
            fhir(searchset(found))
        })
        .mount(&server)
        .await;
    let kept = created.clone();
    Mock::given(method("POST"))
        .and(path("/Subscription"))
        .respond_with(move |req: &Request| {
            let mut sub: Value = serde_json::from_slice(&req.body).unwrap();
            sub["id"] = json!("sub1");
            *kept.lock().unwrap() = Some(sub.clone());
            ResponseTemplate::new(201).set_body_raw(sub.to_string(), "application/fhir+json")
        })
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/Subscription/sub1"))
        .respond_with(|req: &Request| ResponseTemplate::new(200).set_body_raw(req.body.clone(), "application/fhir+json"))
        .mount(&server)
        .await;
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
            .current_dir(root())
            .env("TRIALGATE_CONFIG", root().join("tests/data/no-such-gateway.toml"))
            .env("TRIALGATE_API_TOKENS", "n0tify-s3cret")
            .args([
                "subscribe",
                "--server",
                &server.uri(),
                "--endpoint",
                "https://trialgate.example/notify",
            ])
            .args(["--topic", "http://example.org/SubscriptionTopic/lab-result", "--lab-codes"])
            .output()
            .unwrap()
    };
    let first = run();
    let (out, err) = (String::from_utf8_lossy(&first.stdout), String::from_utf8_lossy(&first.stderr));
    assert!(first.status.success(), "{err}");
    assert!(out.contains("created Subscription/sub1"), "{out}");
    assert!(
        !out.contains("n0tify-s3cret") && !err.contains("n0tify-s3cret"),
        "the token is never printed"
    );
    let sub = created.lock().unwrap().clone().unwrap();
    assert_eq!(sub["channel"]["endpoint"], "https://trialgate.example/notify");
    assert_eq!(sub["channel"]["header"][0], "Authorization: Bearer n0tify-s3cret");
    assert_eq!(sub["criteria"], "http://example.org/SubscriptionTopic/lab-result");
    let filter = sub["_criteria"]["extension"][0]["valueString"].as_str().unwrap();
    assert!(filter.starts_with("Observation?code=") && filter.contains("98979-8"), "{filter}");

    let second = run();
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(out.contains("updated Subscription/sub1"), "{out}");
    let posts = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST")
        .count();
    assert_eq!(posts, 1, "one Subscription, then updated in place");
}

#[tokio::test]
async fn screen_operation_writes_only_the_trials_asked_for_and_what_ifs_leave_the_history() {
    let ehr = Ehr::start().await;
    let dir = temp("trials");
    let db = dir.join("state.sqlite");
    let base = serve_trials(&ehr, &db, true, &[TRIAL, "NCT06535412"]).await;
    let (status, report) = post(&format!("{base}/fhir/Patient/p1/$screen?write_back=true&trial={TRIAL}"), json!({})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["results"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["write_back"]["created"], 1, "only the trial asked for is written: {report}");
    // Another date, without write-back: a what-if, not recorded as the patient's verdict.
    let (status, report) = post(&format!("{base}/fhir/Patient/p1/$screen?as_of=2020-01-01"), json!({})).await;
    assert_eq!(status, 200, "{report}");
    let mut ledger = trialgate::state::Ledger::open(&trialgate::state::Location::File(db)).unwrap();
    let latest = ledger.latest().unwrap();
    assert_eq!(latest.len(), 1, "{:?}", latest.iter().map(|l| &l.result.trial).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
}
