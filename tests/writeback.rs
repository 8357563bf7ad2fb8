//! Write-back against a mock FHIR server: the ResearchStudy bound by a conditional create,
//! new ResearchSubjects created with `ifNoneExist`, changed ones updated with `ifMatch`,
//! unchanged ones and those a person moved on never sent, ineligible ones written only when
//! asked, all in one batch Bundle; and a dry run that sends nothing.

use serde_json::{Value, json};
use std::path::PathBuf;
use trialgate::criteria::Status;
use trialgate::criteria::eval::TrialResult;
use trialgate::fhir::client::{ClientOptions, FhirClient};
use trialgate::time::Date;
use trialgate::writeback::{SUBJECT_SYSTEM, WriteOptions, write_back};
use wiremock::matchers::{body_partial_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

mod mock;

fn trial() -> trialgate::criteria::trial::Trial {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cfg = trialgate::load_config(&root.join("mappings"), &root.join("config/trials"), &["NCT06406205".into()]).unwrap();
    cfg.trials.into_iter().next().unwrap()
}

fn result(patient: &str, status: Status) -> TrialResult {
    TrialResult {
        patient: format!("Patient/{patient}"),
        person: None,
        trial: "NCT06406205".into(),
        status,
        record: None,
        decided_by: Vec::new(),
        criteria: Vec::new(),
        facts: Vec::new(),
    }
}

fn subject(id: &str, patient: &str, status: &str, version: &str) -> Value {
    json!({"resourceType": "ResearchSubject", "id": id, "meta": {"versionId": version}, "status": status,
        "identifier": [{"system": SUBJECT_SYSTEM, "value": format!("NCT06406205:Patient/{patient}")}],
        "study": {"reference": "ResearchStudy/st1"}, "individual": {"reference": format!("Patient/{patient}")}})
}

async fn server_with_state(existing: &[Value], study_status: u16) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/ResearchStudy"))
        .and(header("If-None-Exist", "identifier=urn:trialgate:trial|NCT06406205"))
        .and(body_partial_json(json!({"resourceType": "ResearchStudy", "status": "active",
            "identifier": [{"system": "urn:trialgate:trial", "value": "NCT06406205"}]})))
        .respond_with(ResponseTemplate::new(study_status).set_body_raw(
            json!({"resourceType": "ResearchStudy", "id": "st1", "status": "active"}).to_string(),
            "application/fhir+json",
        ))
        .expect(1)
        .mount(&server)
        .await;
    // A study's subjects, or (for a few patients) those with the identifiers asked for.
    let existing = existing.to_vec();
    Mock::given(method("GET"))
        .and(path("/ResearchSubject"))
        .respond_with(move |req: &wiremock::Request| {
            let query: Vec<(String, String)> = req.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
            let wanted: Option<Vec<&str>> = query.iter().find(|(k, _)| k == "identifier").map(|(_, v)| v.split(',').collect());
            let by_study = query.iter().any(|(k, v)| k == "study" && v == "ResearchStudy/st1");
            let found: Vec<&Value> = existing
                .iter()
                .filter(|r| match &wanted {
                    Some(ids) => r["identifier"].as_array().into_iter().flatten().any(|i| {
                        let token = format!("{}|{}", i["system"].as_str().unwrap_or(""), i["value"].as_str().unwrap_or(""));
                        ids.contains(&token.as_str())
                    }),
                    None => by_study,
                })
                .collect();
            let page = json!({"resourceType": "Bundle", "type": "searchset",
                "entry": found.iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()});
            ResponseTemplate::new(200).set_body_raw(page.to_string(), "application/fhir+json")
        })
        .mount(&server)
        .await;
    server
}

fn client(server: &MockServer) -> FhirClient {
    FhirClient::new(
        &server.uri(),
        ClientOptions {
            base_backoff: std::time::Duration::from_millis(10),
            ..Default::default()
        },
    )
    .unwrap()
}

fn batch_response(statuses: &[&str]) -> ResponseTemplate {
    let b = json!({"resourceType": "Bundle", "type": "batch-response",
        "entry": statuses.iter().map(|s| json!({"response": {"status": s}})).collect::<Vec<_>>()});
    ResponseTemplate::new(200).set_body_raw(b.to_string(), "application/fhir+json")
}

async fn sent_batch(server: &MockServer) -> Value {
    let reqs: Vec<Request> = server.received_requests().await.unwrap();
    let batch = reqs
        .iter()
        .find(|r| r.method.as_str() == "POST" && r.url.path() == "/")
        .expect("a batch was posted");
    serde_json::from_slice(&batch.body).unwrap()
}

#[tokio::test]
async fn writes_only_what_changed_and_never_touches_what_a_person_owns() {
    // On the server: A was moved on-study by a coordinator; B was a potential candidate (v3)
    // and is now ineligible; E is eligible as before.
    let server = server_with_state(
        &[
            subject("rs-a", "a", "on-study", "7"),
            subject("rs-b", "b", "potential-candidate", "3"),
            subject("rs-e", "e", "eligible", "1"),
        ],
        201,
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/"))
        .respond_with(batch_response(&["200 OK", "201 Created"]))
        .expect(1)
        .mount(&server)
        .await;
    let results = [
        result("a", Status::Ineligible),          // person-owned: left alone
        result("b", Status::Ineligible),          // written before: updated
        result("c", Status::PotentiallyEligible), // new: created
        result("d", Status::Ineligible),          // new and ineligible: not written by default
        result("e", Status::Eligible),            // unchanged: not sent
        result("f", Status::Error),               // no data: nothing to say
    ];
    let as_of = Date::parse("2026-06-01").unwrap();
    let w = write_back(&client(&server), &[trial()], &results, as_of, &WriteOptions::default())
        .await
        .unwrap();
    assert_eq!((w.created, w.updated, w.unchanged, w.left_alone, w.not_written), (1, 1, 1, 1, 2));
    assert!(w.failed.is_empty());

    let batch = sent_batch(&server).await;
    assert_eq!(batch["type"], "batch");
    let entries = batch["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "only the changed and the new subject are sent: {batch}");
    let update = &entries[0];
    assert_eq!(update["request"]["method"], "PUT");
    assert_eq!(update["request"]["url"], "ResearchSubject/rs-b");
    assert_eq!(update["request"]["ifMatch"], "W/\"3\"");
    assert_eq!(update["resource"]["id"], "rs-b");
    assert_eq!(update["resource"]["status"], "ineligible");
    let create = &entries[1];
    assert_eq!(create["request"]["method"], "POST");
    assert_eq!(
        create["request"]["ifNoneExist"],
        format!("identifier={SUBJECT_SYSTEM}|NCT06406205:Patient/c")
    );
    let rs = &create["resource"];
    // A valid R4 ResearchSubject: the required elements, an R4 status code, XHTML narrative.
    assert_eq!(rs["resourceType"], "ResearchSubject");
    assert_eq!(rs["status"], "potential-candidate");
    assert_eq!(rs["study"]["reference"], "ResearchStudy/st1");
    assert_eq!(rs["individual"]["reference"], "Patient/c");
    assert_eq!(rs["identifier"][0]["value"], "NCT06406205:Patient/c");
    assert_eq!(rs["text"]["status"], "generated");
    assert!(
        rs["text"]["div"]
            .as_str()
            .unwrap()
            .starts_with("<div xmlns=\"http://www.w3.org/1999/xhtml\">")
    );
    // The R5 progress extension carries the same state.
    let progress = &rs["extension"][0];
    assert_eq!(progress["url"], trialgate::writeback::PROGRESS_EXTENSION);
    let part = |name: &str| {
        progress["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        part("subjectState")["valueCodeableConcept"]["coding"][0]["code"],
        "potential-candidate"
    );
    assert_eq!(part("type")["valueCodeableConcept"]["coding"][0]["code"], "Enrollment");
    assert_eq!(part("startDate")["valueDateTime"], "2026-06-01");
}

#[tokio::test]
async fn ineligible_patients_are_written_when_asked_and_a_dry_run_sends_nothing() {
    let server = server_with_state(&[], 200).await;
    Mock::given(method("POST"))
        .and(path("/"))
        .respond_with(batch_response(&["201 Created"]))
        .expect(1)
        .mount(&server)
        .await;
    let as_of = Date::parse("2026-06-01").unwrap();
    let results = [result("d", Status::Ineligible)];
    let opts = WriteOptions {
        write_ineligible: true,
        dry_run: false,
        ..Default::default()
    };
    let w = write_back(&client(&server), &[trial()], &results, as_of, &opts).await.unwrap();
    assert_eq!(w.created, 1);
    assert_eq!(sent_batch(&server).await["entry"][0]["resource"]["status"], "ineligible");

    let dry = server_with_state(&[], 200).await;
    Mock::given(method("POST"))
        .and(path("/"))
        .respond_with(batch_response(&[]))
        .expect(0)
        .mount(&dry)
        .await;
    let opts = WriteOptions {
        write_ineligible: true,
        dry_run: true,
        ..Default::default()
    };
    let w = write_back(&client(&dry), &[trial()], &results, as_of, &opts).await.unwrap();
    assert_eq!(w.planned.len(), 1, "the dry run still says what it would write");
    assert_eq!(w.created, 0);
}

/// A cohort is written batch by batch as its subjects are built: 250 new subjects go in
/// three batches (100, 100, 50), each answered entry by entry, and nothing is kept after.
#[tokio::test]
async fn a_cohort_is_written_in_batches_of_a_hundred() {
    let server = server_with_state(&[], 201).await;
    Mock::given(method("POST"))
        .and(path("/"))
        .respond_with(|req: &Request| {
            let sent: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let n = sent["entry"].as_array().map_or(0, Vec::len);
            batch_response(&vec!["201 Created"; n])
        })
        .expect(3)
        .mount(&server)
        .await;
    let results: Vec<TrialResult> = (0..250).map(|i| result(&format!("p{i}"), Status::Eligible)).collect();
    let opts = WriteOptions {
        write_ineligible: false,
        dry_run: false,
        ..Default::default()
    };
    let as_of = Date::parse("2026-06-01").unwrap();
    let w = write_back(&client(&server), &[trial()], &results, as_of, &opts).await.unwrap();
    assert_eq!(w.created, 250);
    assert!(w.failed.is_empty() && w.planned.is_empty());
    let sizes: Vec<usize> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path() == "/")
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["entry"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [100, 100, 50]);
}

/// A study with more subjects on the server than `listing_limit` is not held: its listing is
/// dropped as soon as it runs over (the pages after are not even read), and the subjects of
/// the patients being written are looked up by identifier, forty to a search, instead. Both
/// ways write exactly the same.
#[tokio::test]
async fn a_study_too_large_to_list_has_its_subjects_looked_up() {
    // 45 patients (more than the few looked up one by one): p0 was moved on-study by a person,
    // p1 was a potential candidate and is now eligible, p2 to p4 are eligible as before; p44
    // has no data. The server lists the study's subjects two to a page (three pages).
    let existing = vec![
        subject("rs-0", "p0", "on-study", "7"),
        subject("rs-1", "p1", "potential-candidate", "3"),
        subject("rs-2", "p2", "eligible", "1"),
        subject("rs-3", "p3", "eligible", "1"),
        subject("rs-4", "p4", "eligible", "1"),
    ];
    let results: Vec<TrialResult> = (0..45)
        .map(|i| result(&format!("p{i}"), if i == 44 { Status::Error } else { Status::Eligible }))
        .collect();
    let run = |limit: usize| {
        let (existing, results) = (existing.clone(), results.clone());
        async move {
            let server = MockServer::start().await;
            mock::accepts_research_study(&server).await;
            let uri = server.uri();
            Mock::given(method("GET"))
                .and(path("/ResearchSubject"))
                .respond_with(move |req: &Request| {
                    let q: Vec<(String, String)> = req.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
                    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                    let (found, next): (Vec<&Value>, Option<usize>) = match get("identifier") {
                        Some(ids) => {
                            let ids: Vec<&str> = ids.split(',').collect();
                            let hit = |r: &&Value| {
                                let token = format!("{SUBJECT_SYSTEM}|{}", r["identifier"][0]["value"].as_str().unwrap_or(""));
                                ids.contains(&token.as_str())
                            };
                            (existing.iter().filter(hit).collect(), None)
                        }
                        None => {
                            let page: usize = get("_page").and_then(|p| p.parse().ok()).unwrap_or(0);
                            let found = existing.iter().skip(2 * page).take(2).collect();
                            (found, (2 * page + 2 < existing.len()).then_some(page + 1))
                        }
                    };
                    let link: Vec<Value> = next
                        .map(|n| json!({"relation": "next", "url": format!("{uri}/ResearchSubject?study=ResearchStudy/st1&_page={n}")}))
                        .into_iter()
                        .collect();
                    let page = json!({"resourceType": "Bundle", "type": "searchset", "link": link,
                        "entry": found.iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()});
                    ResponseTemplate::new(200).set_body_raw(page.to_string(), "application/fhir+json")
                })
                .mount(&server)
                .await;
            Mock::given(method("POST"))
                .and(path("/"))
                .respond_with(|req: &Request| {
                    let sent: Value = serde_json::from_slice(&req.body).unwrap_or_default();
                    let entries = sent["entry"].as_array().cloned().unwrap_or_default();
                    let said: Vec<&str> = entries
                        .iter()
                        .map(|e| if e["request"]["method"] == "PUT" { "200 OK" } else { "201 Created" })
                        .collect();
                    batch_response(&said)
                })
                .mount(&server)
                .await;
            let opts = WriteOptions {
                listing_limit: limit,
                ..Default::default()
            };
            let as_of = Date::parse("2026-06-01").unwrap();
            let w = write_back(&client(&server), &[trial()], &results, as_of, &opts).await.unwrap();
            let gets: Vec<Vec<(String, String)>> = server
                .received_requests()
                .await
                .unwrap()
                .iter()
                .filter(|r| r.method.as_str() == "GET" && r.url.path() == "/ResearchSubject")
                .map(|r| r.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
                .collect();
            (w, sent_batch(&server).await, gets)
        }
    };
    let (listed, listed_batch, listed_gets) = run(5).await;
    let (looked_up, looked_up_batch, looked_up_gets) = run(2).await;
    for w in [&listed, &looked_up] {
        assert_eq!((w.created, w.updated, w.unchanged, w.left_alone, w.not_written), (39, 1, 3, 1, 1));
        assert!(w.failed.is_empty(), "{:?}", w.failed);
    }
    assert_eq!(listed_batch, looked_up_batch, "the same writes either way");
    assert_eq!(listed_batch["entry"][0]["request"]["url"], "ResearchSubject/rs-1");
    assert_eq!(listed_batch["entry"][0]["request"]["ifMatch"], "W/\"3\"");

    let by_identifier = |gets: &[Vec<(String, String)>]| -> Vec<usize> {
        gets.iter()
            .filter_map(|q| q.iter().find(|(k, _)| k == "identifier"))
            .map(|(_, v)| v.split(',').count())
            .collect()
    };
    assert_eq!(
        listed_gets.len(),
        3,
        "within the limit, the study is listed (three pages) and nothing looked up: {listed_gets:?}"
    );
    assert!(by_identifier(&listed_gets).is_empty());
    // Over it: the first page (2 subjects) is within the limit, the second (4) is not, so the
    // listing stops there; the 44 patients with something to write are looked up in two searches.
    assert_eq!(by_identifier(&looked_up_gets), [40, 4], "{looked_up_gets:?}");
    assert_eq!(looked_up_gets.len(), 4, "{looked_up_gets:?}");
}

#[tokio::test]
async fn a_refused_write_is_reported_with_the_servers_reason() {
    let server = server_with_state(&[], 201).await;
    let b = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [{"response": {"status": "412 Precondition Failed",
        "outcome": {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "conflict", "diagnostics": "multiple matches"}]}}}]});
    Mock::given(method("POST"))
        .and(path("/"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(b.to_string(), "application/fhir+json"))
        .mount(&server)
        .await;
    let as_of = Date::parse("2026-06-01").unwrap();
    let w = write_back(
        &client(&server),
        &[trial()],
        &[result("c", Status::Eligible)],
        as_of,
        &WriteOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(w.failed.len(), 1);
    assert_eq!(w.failed[0].0, "NCT06406205:Patient/c");
    assert!(
        w.failed[0].1.starts_with("412") && w.failed[0].1.contains("multiple matches"),
        "{:?}",
        w.failed
    );
}

/// A coordinator opening the ResearchSubject sees why: the deciding criteria, the unknown
/// items and what needs a person, in the narrative.
#[test]
fn the_narrative_explains_the_verdict() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cfg = trialgate::load_config(&root.join("mappings"), &root.join("config/trials"), &["NCT06406205".into()]).unwrap();
    let as_of = Date::parse("2026-06-01").unwrap();
    let s = trialgate::screen(
        &root.join("fixtures/bundles/02-rosa-delgado.json"),
        &cfg,
        as_of,
        &Default::default(),
    )
    .unwrap();
    let r = &s.results[0];
    assert_eq!(r.status, Status::Ineligible);
    let rs = trialgate::writeback::research_subject(&cfg.trials[0], "st1", r, "ineligible", as_of, None);
    let div = rs["text"]["div"].as_str().unwrap();
    assert!(div.contains("<b>ineligible</b>"), "{div}");
    assert!(div.contains("Decided by:") && div.contains("exc-1 (exclusion): egfr 38"), "{div}");
    assert!(div.contains("Needs a person:") && div.contains("inc-1 (inclusion)"), "{div}");
    // Well-formed: every tag closed, no raw '<' from the data (comparators are escaped).
    assert_eq!(div.matches("<li>").count(), div.matches("</li>").count());
    assert!(!div.contains("<0") && !div.contains("< "), "{div}");
}

/// Everything write-back would send for the whole fixture cohort (all five trials, with the
/// ineligible) passes FHIR.js, an R4 validator independent of trialgate. scripts/test installs
/// it and sets TRIALGATE_FHIR_VALIDATOR.
#[tokio::test]
async fn everything_written_is_valid_r4_for_an_independent_validator() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let validator = std::env::var("TRIALGATE_FHIR_VALIDATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/trialgate/fhir-validator"));
    assert!(
        validator.join("node_modules/fhir").is_dir(),
        "the FHIR validator is not installed at {}: run scripts/test, which installs it",
        validator.display()
    );
    let cfg = trialgate::load_config(&root.join("mappings"), &root.join("config/trials"), &[]).unwrap();
    let as_of = Date::parse("2026-06-01").unwrap();
    let s = trialgate::screen(&root.join("fixtures"), &cfg, as_of, &Default::default()).unwrap();
    let server = MockServer::start().await;
    mock::accepts_research_study(&server).await;
    Mock::given(method("GET"))
        .and(path("/ResearchSubject"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            json!({"resourceType": "Bundle", "type": "searchset"}).to_string(),
            "application/fhir+json",
        ))
        .mount(&server)
        .await;
    let opts = WriteOptions {
        write_ineligible: true,
        dry_run: true,
        ..Default::default()
    };
    let w = write_back(&client(&server), &cfg.trials, &s.results, as_of, &opts).await.unwrap();
    assert_eq!(w.planned.len(), s.results.len(), "every screened patient x trial is written");
    let mut entries: Vec<Value> = w.planned.iter().map(|e| json!({"resource": e["resource"]})).collect();
    for t in &cfg.trials {
        entries.push(json!({"resource": trialgate::writeback::research_study(t)}));
    }
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
    let mut child = std::process::Command::new("node")
        .arg(root.join("scripts/validate-fhir.js"))
        .env("NODE_PATH", validator.join("node_modules"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node runs");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(bundle.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "invalid R4 resources:\n{report}");
    assert!(report.contains(&format!("{} valid, 0 invalid", entries.len())), "{report}");
}

/// An update refused with 412 (the version moved since it was read: most often our own earlier
/// attempt, applied before its answer was lost) is read again, never overwritten blindly: done
/// if the subject already has the status wanted, left alone if a person moved it, reported if
/// it still differs.
#[tokio::test]
async fn a_412_is_read_again_not_overwritten() {
    let server = server_with_state(
        &[
            subject("rs-b", "b", "potential-candidate", "3"),
            subject("rs-c", "c", "potential-candidate", "3"),
            subject("rs-d", "d", "potential-candidate", "3"),
        ],
        201,
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/"))
        .respond_with(batch_response(&[
            "412 Precondition Failed",
            "412 Precondition Failed",
            "412 Precondition Failed",
        ]))
        .expect(1)
        .mount(&server)
        .await;
    let now = [
        ("b", subject("rs-b", "b", "ineligible", "4")),
        ("c", subject("rs-c", "c", "withdrawn", "4")),
        ("d", subject("rs-d", "d", "eligible", "4")),
    ];
    for (p, s) in now {
        let page = json!({"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": s}]});
        Mock::given(method("GET"))
            .and(path("/ResearchSubject"))
            .and(query_param("identifier", format!("{SUBJECT_SYSTEM}|NCT06406205:Patient/{p}")))
            .respond_with(ResponseTemplate::new(200).set_body_raw(page.to_string(), "application/fhir+json"))
            .with_priority(1)
            .expect(1)
            .mount(&server)
            .await;
    }
    let results = [
        result("b", Status::Ineligible),
        result("c", Status::Ineligible),
        result("d", Status::Ineligible),
    ];
    let as_of = Date::parse("2026-06-01").unwrap();
    let w = write_back(&client(&server), &[trial()], &results, as_of, &WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (w.created, w.updated, w.left_alone),
        (0, 1, 1),
        "b already done, c moved on by a person"
    );
    assert_eq!(w.failed.len(), 1, "{:?}", w.failed);
    assert_eq!(w.failed[0].0, "NCT06406205:Patient/d");
    assert!(w.failed[0].1.contains("412"), "{}", w.failed[0].1);
    let posts = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path() == "/")
        .count();
    assert_eq!(posts, 1, "nothing is sent again blindly");
}

/// A few patients (a notification, one posted patient) have their subjects looked up by
/// identifier; a whole sweep's worth lists the study's subjects instead of asking hundreds of
/// identifiers.
#[tokio::test]
async fn existing_subjects_are_found_by_identifier_for_a_few_by_study_for_many() {
    for (patients, by_identifier) in [(3usize, true), (25, false)] {
        let server = server_with_state(&[], 201).await;
        let created: Vec<&str> = vec!["201 Created"; patients];
        Mock::given(method("POST"))
            .and(path("/"))
            .respond_with(batch_response(&created))
            .mount(&server)
            .await;
        let names: Vec<String> = (0..patients).map(|i| format!("p{i}")).collect();
        let results: Vec<TrialResult> = names.iter().map(|p| result(p, Status::Eligible)).collect();
        let as_of = Date::parse("2026-06-01").unwrap();
        let w = write_back(&client(&server), &[trial()], &results, as_of, &WriteOptions::default())
            .await
            .unwrap();
        assert_eq!(w.created, patients);
        let searches: Vec<String> = server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.url.path() == "/ResearchSubject")
            .map(|r| r.url.query().unwrap_or_default().to_string())
            .collect();
        assert_eq!(searches.len(), 1, "{searches:?}");
        assert_eq!(searches[0].starts_with("identifier="), by_identifier, "{searches:?}");
    }
}
