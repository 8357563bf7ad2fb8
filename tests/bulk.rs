//! Bulk Data export against a mock that plays the whole protocol: kick-off with `_type`,
//! `_typeFilter` and `_since`, status polling with `X-Progress` and `Retry-After`, a manifest
//! whose files need the access token, a download that fails once, an error file, a `deleted`
//! list, and the final DELETE; then the files are screened like any NDJSON folder.

use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use trialgate::criteria::decisions::Decisions;
use trialgate::fhir::client::{ClientOptions, FhirClient};
use trialgate::sweep::BulkOptions;
use trialgate::time::Date;
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

mod mock;
mod pg;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn client(server: &MockServer) -> FhirClient {
    FhirClient::new(
        &server.uri(),
        ClientOptions {
            bearer: Some("s3cret-token".into()),
            base_backoff: Duration::from_millis(10),
            max_retries: 2,
            ..Default::default()
        },
    )
    .unwrap()
}

fn ndjson(name: &str) -> String {
    std::fs::read_to_string(root().join("fixtures/bulk").join(name)).unwrap()
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("trialgate-bulk-{name}-{}", std::process::id()))
}

#[tokio::test]
async fn a_full_export_is_polled_downloaded_and_screened_like_files() {
    let server = MockServer::start().await;
    let status = format!("{}/status/job-1", server.uri());
    Mock::given(method("GET"))
        .and(path("/Group/ln-clinic/$export"))
        .and(header("prefer", "respond-async"))
        .and(query_param("_since", "2026-05-01T00:00:00Z"))
        .respond_with(ResponseTemplate::new(202).insert_header("Content-Location", status.as_str()))
        .expect(1)
        .mount(&server)
        .await;
    // In progress once (with Retry-After and X-Progress), then done.
    Mock::given(method("GET"))
        .and(path("/status/job-1"))
        .respond_with(
            ResponseTemplate::new(202)
                .insert_header("Retry-After", "1")
                .insert_header("X-Progress", "50% (Observations)"),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    let file = |name: &str| format!("{}/files/{name}", server.uri());
    let manifest = json!({
        "transactionTime": "2026-06-01T02:00:00Z",
        "request": format!("{}/Group/ln-clinic/$export", server.uri()),
        "requiresAccessToken": true,
        "output": [
            {"type": "Observation", "url": file("obs-1")},
            {"type": "Patient", "url": file("patients")},
            {"type": "Condition", "url": file("conditions")},
        ],
        "error": [{"type": "OperationOutcome", "url": file("errors")}],
        "deleted": [{"type": "Bundle", "url": file("deleted")}],
    });
    Mock::given(method("GET"))
        .and(path("/status/job-1"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(manifest.to_string(), "application/json"))
        .with_priority(2)
        .mount(&server)
        .await;
    // The Observation file fails once: the download is started again.
    Mock::given(method("GET"))
        .and(path("/files/obs-1"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    for (name, body) in [
        ("obs-1", ndjson("Observation.ndjson")),
        ("patients", ndjson("Patient.ndjson")),
        ("conditions", ndjson("Condition.ndjson")),
        (
            "errors",
            json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                "diagnostics": "MedicationRequest for 3 patients could not be exported"}]})
            .to_string(),
        ),
        (
            "deleted",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"request": {"method": "DELETE", "url": "Observation/old-1"}},
                {"request": {"method": "DELETE", "url": "Observation/old-2"}}]})
            .to_string(),
        ),
    ] {
        Mock::given(method("GET"))
            .and(path(format!("/files/{name}")))
            .and(header("authorization", "Bearer s3cret-token"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body, "application/fhir+ndjson"))
            .with_priority(2)
            .mount(&server)
            .await;
    }
    Mock::given(method("DELETE"))
        .and(path("/status/job-1"))
        .respond_with(ResponseTemplate::new(202))
        .expect(1)
        .mount(&server)
        .await;

    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let as_of = Date::parse("2026-06-01").unwrap();
    let dir = temp("full");
    let _ = std::fs::remove_dir_all(&dir);
    let started = std::time::Instant::now();
    let opts = BulkOptions {
        group: Some("ln-clinic".into()),
        since: Some("2026-05-01T00:00:00Z".into()),
        code_filter: true,
        max_poll: Duration::from_secs(5),
    };
    let (s, outcome) = trialgate::sweep::bulk_sweep(&client(&server), &cfg, as_of, &Decisions::default(), &opts, &dir, None)
        .await
        .expect("the export runs");
    let exported = outcome.exported;
    assert!(started.elapsed() >= Duration::from_millis(950), "Retry-After: 1 was honoured");
    assert_eq!(exported.transaction_time.as_deref(), Some("2026-06-01T02:00:00Z"));
    assert_eq!(exported.files.len(), 3);
    assert_eq!(exported.deleted, ["Observation/old-1", "Observation/old-2"]);
    assert!(
        s.issues
            .iter()
            .any(|i| i.message.contains("MedicationRequest for 3 patients could not be exported")),
        "{:?}",
        s.issues
    );

    // The same verdicts as the files read from disk.
    let files = trialgate::screen(&root().join("fixtures/bulk"), &cfg, as_of, &Decisions::default()).unwrap();
    let statuses = |rs: &[trialgate::criteria::eval::TrialResult]| -> BTreeMap<(String, String), &'static str> {
        rs.iter()
            .map(|r| ((r.patient.clone(), r.trial.clone()), r.status.as_str()))
            .collect()
    };
    assert_eq!(statuses(&s.results), statuses(&files.results));
    assert!(s.patients > 0);

    // The kick-off asked for the types the trials read and the Observation codes they use.
    let reqs = server.received_requests().await.unwrap();
    let kick = reqs.iter().find(|r| r.url.path().ends_with("$export")).unwrap();
    let q: BTreeMap<String, String> = kick.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let types: Vec<&str> = q["_type"].split(',').collect();
    for t in ["Patient", "Observation", "Condition", "MedicationRequest", "Medication"] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    assert!(!types.contains(&"Encounter"));
    assert!(
        q["_typeFilter"].starts_with("Observation?code=") && q["_typeFilter"].contains("98979-8"),
        "{q:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server that refuses `_typeFilter` is asked again without it; one whose export fails is
/// reported in its own words.
#[tokio::test]
async fn a_refused_filter_is_dropped_and_a_failed_export_is_reported() {
    let server = MockServer::start().await;
    let outcome = |text: &str| {
        json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported", "diagnostics": text}]})
            .to_string()
    };
    Mock::given(method("GET"))
        .and(path("/Patient/$export"))
        .and(wiremock::matchers::query_param_contains("_typeFilter", "Observation"))
        .respond_with(ResponseTemplate::new(400).set_body_raw(outcome("_typeFilter is not supported"), "application/fhir+json"))
        .with_priority(1)
        .mount(&server)
        .await;
    let status = format!("{}/status/job-2", server.uri());
    Mock::given(method("GET"))
        .and(path("/Patient/$export"))
        .respond_with(ResponseTemplate::new(202).insert_header("Content-Location", status.as_str()))
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/status/job-2"))
        .respond_with(ResponseTemplate::new(500).set_body_raw(outcome("export failed: disk full"), "application/fhir+json"))
        .mount(&server)
        .await;
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &["NCT06406205".into()]).unwrap();
    let dir = temp("failed");
    let opts = BulkOptions {
        group: None,
        since: None,
        code_filter: true,
        max_poll: Duration::from_secs(1),
    };
    let as_of = Date::parse("2026-06-01").unwrap();
    let err = trialgate::sweep::bulk_sweep(&client(&server), &cfg, as_of, &Decisions::default(), &opts, &dir, None).await;
    let Err(err) = err else {
        panic!("the export failed, yet the sweep succeeded")
    };
    let text = err.to_string();
    assert!(text.contains("export failed: disk full"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    let reqs = server.received_requests().await.unwrap();
    let kicks: Vec<_> = reqs.iter().filter(|r| r.url.path() == "/Patient/$export").collect();
    assert_eq!(kicks.len(), 2, "asked again without _typeFilter");
    assert!(!kicks[1].url.query().unwrap_or_default().contains("_typeFilter"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mounts one export job: its kick-off (told apart by `_since`), status and files.
async fn mount_job(server: &MockServer, job: &str, since: Option<&str>, time: &str, files: &[(&str, String)], deleted: Option<String>) {
    let kick = Mock::given(method("GET")).and(path("/Patient/$export"));
    let kick = match since {
        Some(s) => kick.and(query_param("_since", s)),
        None => kick.and(wiremock::matchers::query_param_is_missing("_since")),
    };
    let status = format!("{}/status/{job}", server.uri());
    kick.respond_with(ResponseTemplate::new(202).insert_header("Content-Location", status.as_str()))
        .expect(1)
        .mount(server)
        .await;
    let url = |name: &str| format!("{}/files/{job}/{name}", server.uri());
    let mut manifest = json!({"transactionTime": time, "requiresAccessToken": false,
        "output": files.iter().map(|(t, _)| json!({"type": t, "url": url(t)})).collect::<Vec<_>>(), "error": []});
    if deleted.is_some() {
        manifest["deleted"] = json!([{"type": "Bundle", "url": url("deleted")}]);
    }
    Mock::given(method("GET"))
        .and(path(format!("/status/{job}")))
        .respond_with(ResponseTemplate::new(200).set_body_raw(manifest.to_string(), "application/json"))
        .mount(server)
        .await;
    for (t, body) in files.iter().cloned().chain(deleted.map(|d| ("deleted", d))) {
        Mock::given(method("GET"))
            .and(path(format!("/files/{job}/{t}")))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body, "application/fhir+ndjson"))
            .mount(server)
            .await;
    }
    Mock::given(method("DELETE"))
        .and(path(format!("/status/{job}")))
        .respond_with(ResponseTemplate::new(202))
        .mount(server)
        .await;
}

/// A full export, then a `_since` delta (an amended eGFR, a deleted one, a new patient) applied
/// to the stored facts a day later: every verdict equals a full screening of the data as it now
/// stands, at the new date.
#[tokio::test]
async fn an_incremental_export_applied_to_stored_facts_equals_a_full_rescreen() {
    let dir = temp("incremental");
    let db = trialgate::state::Location::File(dir.join("state.sqlite"));
    incremental(&dir, db).await;
}

/// The same with the fact state in PostgreSQL, as processes sharing a cohort keep it.
#[tokio::test]
async fn an_incremental_export_works_the_same_with_state_in_postgres() {
    let db = trialgate::state::Location::parse(&pg::database("incremental"));
    incremental(&temp("incremental-pg"), db).await;
}

async fn incremental(dir: &Path, db: trialgate::state::Location) {
    let server = MockServer::start().await;
    let (patients, observations, conditions) = (ndjson("Patient.ndjson"), ndjson("Observation.ndjson"), ndjson("Condition.ndjson"));
    let full = [
        ("Patient", patients.clone()),
        ("Observation", observations.clone()),
        ("Condition", conditions.clone()),
    ];
    mount_job(&server, "full", None, "2026-06-01T03:00:00Z", &full, None).await;

    // The delta: bulk-0001's eGFR amended to 30, bulk-0003's eGFR deleted, a new patient.
    let amended = observations
        .lines()
        .find(|l| l.contains("\"id\":\"bulk-0001-egfr\""))
        .unwrap()
        .replace("\"status\":\"final\"", "\"status\":\"amended\"");
    let mut amended: serde_json::Value = serde_json::from_str(&amended).unwrap();
    amended["valueQuantity"]["value"] = json!(30);
    let newcomer = json!({"resourceType": "Patient", "id": "bulk-new", "gender": "female", "birthDate": "1992-03-04"});
    let deleted = json!({"resourceType": "Bundle", "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": "Observation/bulk-0003-egfr"}}]});
    let delta = [("Patient", format!("{newcomer}\n")), ("Observation", format!("{amended}\n"))];
    mount_job(
        &server,
        "delta",
        Some("2026-06-01T03:00:00Z"),
        "2026-06-02T03:00:00Z",
        &delta,
        Some(deleted.to_string()),
    )
    .await;

    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let opts = BulkOptions {
        group: None,
        since: None,
        code_filter: false,
        max_poll: Duration::from_secs(1),
    };
    let c = client(&server);
    for (day, export) in [("2026-06-01", "export-1"), ("2026-06-02", "export-2")] {
        let mut state = trialgate::state::State::open(&db, &format!("cohort|{day}"), "cohort", day).unwrap();
        let as_of = Date::parse(day).unwrap();
        let (s, outcome) = trialgate::sweep::bulk_sweep(&c, &cfg, as_of, &Decisions::default(), &opts, &dir.join(export), Some(&mut state))
            .await
            .expect("the export runs");
        state.finish().unwrap();
        if day == "2026-06-01" {
            assert_eq!(outcome.incremental_since, None, "the first run is a full export");
            continue;
        }
        assert_eq!(outcome.incremental_since.as_deref(), Some("2026-06-01T03:00:00Z"));
        assert_eq!(outcome.exported.deleted, ["Observation/bulk-0003-egfr"]);

        // The data as it now stands, screened in full at the new date.
        let now = dir.join("now");
        std::fs::create_dir_all(&now).unwrap();
        std::fs::write(now.join("Patient.ndjson"), format!("{patients}{newcomer}\n")).unwrap();
        let obs: Vec<String> = observations
            .lines()
            .filter(|l| !l.contains("\"id\":\"bulk-0003-egfr\""))
            .map(|l| {
                if l.contains("\"id\":\"bulk-0001-egfr\"") {
                    amended.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(now.join("Observation.ndjson"), obs.join("\n") + "\n").unwrap();
        std::fs::write(now.join("Condition.ndjson"), &conditions).unwrap();
        let rescreen = trialgate::screen(&now, &cfg, as_of, &Decisions::default()).unwrap();
        let view = |rs: &[trialgate::criteria::eval::TrialResult]| -> Vec<serde_json::Value> {
            rs.iter().map(|r| serde_json::to_value(r).unwrap()).collect()
        };
        assert_eq!(s.patients, rescreen.patients);
        let (a, b) = (view(&s.results), view(&rescreen.results));
        for (x, y) in a.iter().zip(&b) {
            assert!(x == y, "{} {}:\n{x}\n{y}", y["patient"], y["trial"]);
        }
        assert_eq!(a.len(), b.len());
        // And the amendment did change a verdict.
        let st = |p: &str, t: &str| s.results.iter().find(|r| r.patient == p && r.trial == t).map(|r| r.status.as_str());
        assert_eq!(st("Patient/bulk-0001", "NCT06406205"), Some("ineligible"));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `trialgate sweep --bulk` on the command line, with state, write-back and a report: the
/// verdicts are not held but evaluated again for each pass (the state, then write-back and the
/// report), in runs of a few thousand. Over several runs every pass must see every verdict,
/// each trial's ResearchStudy is bound and its subjects listed once (not once per run), and a
/// second, incremental sweep lists what changed.
#[tokio::test]
async fn the_command_line_bulk_sweep_passes_every_verdict_to_state_write_back_and_report() {
    const N: usize = 1100; // two trials: 2,200 results, more than one run
    let trials = ["NCT06406205", "belimumab-multitarget-ln"];
    let egfr = |id: &str, p: &str, value: f64, status: &str| {
        json!({"resourceType": "Observation", "id": id, "status": status,
            "code": {"coding": [{"system": "http://loinc.org", "code": "98979-8"}]},
            "subject": {"reference": format!("Patient/{p}")},
            "effectiveDateTime": "2026-05-20T09:00:00Z",
            "valueQuantity": {"value": value, "unit": "mL/min/{1.73_m2}", "system": "http://unitsofmeasure.org", "code": "mL/min/{1.73_m2}"}})
    };
    let (mut patients, mut observations) = (String::new(), String::new());
    for i in 0..N {
        let p = format!("p{i:04}");
        patients.push_str(&format!(
            "{}\n",
            json!({"resourceType": "Patient", "id": p, "gender": "female", "birthDate": "1990-01-01"})
        ));
        let value = if i % 3 == 0 { 40.0 } else { 80.0 };
        observations.push_str(&format!("{}\n", egfr(&format!("{p}-egfr"), &p, value, "final")));
    }
    let dir = temp("cli-sweep");
    let _ = std::fs::remove_dir_all(&dir);
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("Patient.ndjson"), &patients).unwrap();
    std::fs::write(files.join("Observation.ndjson"), &observations).unwrap();

    let server = mock::server_without_capabilities().await;
    mount_job(
        &server,
        "full",
        None,
        "2026-06-01T03:00:00Z",
        &[("Patient", patients.clone()), ("Observation", observations.clone())],
        None,
    )
    .await;
    // p0001 and p0002 fall to an eGFR of 30; p0000 rises to 90.
    let delta: String = [(1, 30.0), (2, 30.0), (0, 90.0)]
        .iter()
        .map(|(i, v)| format!("{}\n", egfr(&format!("p{i:04}-egfr"), &format!("p{i:04}"), *v, "amended")))
        .collect();
    mount_job(
        &server,
        "delta",
        Some("2026-06-01T03:00:00Z"),
        "2026-06-02T03:00:00Z",
        &[("Observation", delta)],
        None,
    )
    .await;
    mock::accepts_research_study(&server).await;
    mock::lists_no_research_subjects(&server).await;
    Mock::given(method("POST"))
        .and(path("/"))
        .respond_with(|req: &wiremock::Request| {
            let sent: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let n = sent["entry"].as_array().map_or(0, Vec::len);
            let entry: Vec<serde_json::Value> = (0..n).map(|_| json!({"response": {"status": "201 Created"}})).collect();
            ResponseTemplate::new(200).set_body_raw(
                json!({"resourceType": "Bundle", "type": "batch-response", "entry": entry}).to_string(),
                "application/fhir+json",
            )
        })
        .mount(&server)
        .await;

    let (uri, home) = (server.uri(), dir.clone());
    let sweep = move |day: &str, format: &str, extra: &[&str]| {
        let mut args: Vec<String> = ["sweep", "--server", &uri, "--bulk", "--as-of", day, "--format", format]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for t in trials {
            args.extend(["--trial".to_string(), t.to_string()]);
        }
        for (flag, file) in [
            ("--state", "state.sqlite"),
            ("-o", &format!("{day}.{format}")),
            ("--changes", &format!("{day}.changes.csv")),
        ] {
            args.extend([flag.to_string(), home.join(file).display().to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
            .current_dir(root())
            .args(&args)
            .output()
            .expect("trialgate runs")
    };
    let first = tokio::task::spawn_blocking({
        let sweep = sweep.clone();
        move || sweep("2026-06-01", "csv", &["--write-back"])
    });
    let out = first.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    // The report: every verdict, the same as `screen` of the exported files gives.
    let screened = std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
        .current_dir(root())
        .args([
            "screen",
            "--bundle",
            &files.display().to_string(),
            "--as-of",
            "2026-06-01",
            "--format",
            "csv",
        ])
        .args(trials.iter().flat_map(|t| ["--trial", t]))
        .output()
        .unwrap();
    let report = std::fs::read_to_string(dir.join("2026-06-01.csv")).unwrap();
    assert_eq!(report, String::from_utf8_lossy(&screened.stdout));
    assert_eq!(report.lines().count(), 1 + 2 * N);

    // The state: every verdict of the run.
    let db = rusqlite::Connection::open(dir.join("state.sqlite")).unwrap();
    let stored: i64 = db
        .query_row("SELECT count(*) FROM results WHERE run = (SELECT max(run) FROM results)", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored, 2 * N as i64);
    assert_eq!(
        std::fs::read_to_string(dir.join("2026-06-01.changes.csv")).unwrap(),
        "patient,trial,from,to\n"
    );

    // Write-back: a subject for every candidate, in batches of at most 100; each study's
    // subjects listed once; the narratives carry the reasons although the CSV report has none.
    let candidates = report.lines().skip(1).filter(|l| !l.contains(",ineligible,")).count();
    assert!(candidates > 0 && candidates < 2 * N);
    let reqs = server.received_requests().await.unwrap();
    let posted: Vec<serde_json::Value> = reqs
        .iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path() == "/")
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
        .collect();
    let batches: Vec<usize> = posted.iter().map(|b| b["entry"].as_array().unwrap().len()).collect();
    assert_eq!(batches.iter().sum::<usize>(), candidates);
    assert!(batches.iter().all(|&n| (1..=100).contains(&n)), "{batches:?}");
    for e in posted.iter().flat_map(|b| b["entry"].as_array().unwrap()) {
        let div = e["resource"]["text"]["div"].as_str().unwrap();
        assert!(
            div.contains("<li>") && !div.contains(": </li>"),
            "a narrative without reasons: {div}"
        );
    }
    let listings = reqs
        .iter()
        .filter(|r| r.method.as_str() == "GET" && r.url.path() == "/ResearchSubject")
        .count();
    assert_eq!(listings, trials.len());
    assert!(stderr.contains(&format!("{candidates} created")), "{stderr}");

    // A day later, the delta: the changes are listed against the first run, and every
    // verdict is what a full screening of the data as it now stands gives.
    let out = tokio::task::spawn_blocking(move || sweep("2026-06-02", "json", &[])).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Exactly these: the newly eligible first, then the newly ineligible, each by patient.
    assert_eq!(
        std::fs::read_to_string(dir.join("2026-06-02.changes.csv")).unwrap(),
        "patient,trial,from,to\n\
         Patient/p0000,NCT06406205,ineligible,potentially-eligible\n\
         Patient/p0001,NCT06406205,potentially-eligible,ineligible\n\
         Patient/p0002,NCT06406205,potentially-eligible,ineligible\n"
    );
    let now: String = observations
        .lines()
        .map(|l| {
            match [(0, 90.0), (1, 30.0), (2, 30.0)]
                .iter()
                .find(|(i, _)| l.contains(&format!("\"id\":\"p{i:04}-egfr\"")))
            {
                Some((i, v)) => egfr(&format!("p{i:04}-egfr"), &format!("p{i:04}"), *v, "amended").to_string() + "\n",
                None => format!("{l}\n"),
            }
        })
        .collect();
    std::fs::write(files.join("Observation.ndjson"), now).unwrap();
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &trials.map(String::from)).unwrap();
    let rescreen = trialgate::screen(&files, &cfg, Date::parse("2026-06-02").unwrap(), &Decisions::default()).unwrap();
    let expected: Vec<serde_json::Value> = rescreen.results.iter().map(|r| serde_json::to_value(r).unwrap()).collect();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("2026-06-02.json")).unwrap()).unwrap();
    let got = report["results"].as_array().unwrap();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert!(g == e, "{} {}:\n{g}\n{e}", e["patient"], e["trial"]);
    }
    assert_eq!(report["summary"]["patients"], N);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A dry run prints every write it would make as one batch Bundle and sends none; the plan is
/// printed as it is made, batch by batch in the order the writes would go (a cohort's worth
/// is never held): 150 patients and two trials with `--write-ineligible` plan 300 creates,
/// the first trial's first hundred, the second's, then what is left of each.
#[tokio::test]
async fn a_dry_run_prints_every_planned_write_and_sends_none() {
    const N: usize = 150;
    let trials = ["NCT06406205", "belimumab-multitarget-ln"];
    let patients: String = (0..N)
        .map(|i| {
            format!(
                "{}\n",
                json!({"resourceType": "Patient", "id": format!("p{i:04}"), "gender": "female", "birthDate": "1990-01-01"})
            )
        })
        .collect();
    let server = mock::server_without_capabilities().await;
    mount_job(&server, "full", None, "2026-06-01T03:00:00Z", &[("Patient", patients)], None).await;
    mock::accepts_research_study(&server).await;
    mock::lists_no_research_subjects(&server).await;
    Mock::given(method("POST"))
        .and(path("/"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    let uri = server.uri();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
            .current_dir(root())
            .args(["sweep", "--server", &uri, "--bulk", "--as-of", "2026-06-01"])
            .args(trials.iter().flat_map(|t| ["--trial", t]))
            .args(["--write-back", "--write-ineligible", "--dry-run"])
            .output()
            .expect("trialgate runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("(dry run: nothing sent)"), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with("{\n  \"resourceType\": \"Bundle\",\n  \"type\": \"batch\",\n  \"entry\": [\n    {\n      \""),
        "{}",
        &stdout[..200.min(stdout.len())]
    );
    assert!(stdout.ends_with("\n    }\n  ]\n}\n"));
    let bundle: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON Bundle");
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2 * N);
    let planned: Vec<String> = entries
        .iter()
        .map(|e| {
            assert_eq!(e["request"]["method"], "POST");
            e["resource"]["identifier"][0]["value"].as_str().unwrap().to_string()
        })
        .collect();
    let [a, b] = trials;
    let of = |t: &'static str, r: std::ops::Range<usize>| r.map(move |i| format!("{t}:Patient/p{i:04}"));
    let expected: Vec<String> = of(a, 0..100)
        .chain(of(b, 0..100))
        .chain(of(a, 100..N))
        .chain(of(b, 100..N))
        .collect();
    assert_eq!(planned, expected);
}
