//! A sweep killed with SIGKILL mid-run resumes from its last checkpoint: nobody screened twice
//! into the report, nobody missed, the patients already done not fetched again. A later run
//! lists who became eligible or ineligible since.

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, Request, ResponseTemplate};

mod mock;
mod pg;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ok(body: &Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.to_string(), "application/fhir+json")
}

fn searchset(resources: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "searchset",
        "entry": resources.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()})
}

fn ids_of(req: &Request, param: &str) -> Vec<String> {
    req.url
        .query_pairs()
        .find(|(k, _)| k == param)
        .map(|(_, v)| v.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// Where the sweep keeps its state: the argument of `--state`, and how to count who is done.
enum Store {
    File(PathBuf),
    Postgres(String),
}

impl Store {
    fn arg(&self) -> std::ffi::OsString {
        match self {
            Store::File(p) => p.clone().into_os_string(),
            Store::Postgres(url) => url.into(),
        }
    }

    fn screened(&self) -> usize {
        let sql = "SELECT COUNT(DISTINCT patient) FROM results";
        match self {
            Store::File(db) => {
                let Ok(conn) = rusqlite::Connection::open(db) else { return 0 };
                conn.query_row(sql, [], |r| r.get::<_, i64>(0)).map(|n| n as usize).unwrap_or(0)
            }
            Store::Postgres(url) => pg::count(url, sql) as usize,
        }
    }
}

/// The sweep command; `as_of` None is how a schedule runs it (screening "today").
fn command(server: &str, db: &Store, out: &Path, as_of: Option<&str>, changes: &Path) -> Command {
    command_as(server, db, out, as_of, changes, "csv")
}

fn command_as(server: &str, db: &Store, out: &Path, as_of: Option<&str>, changes: &Path, format: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trialgate"));
    c.current_dir(root())
        .env("TRIALGATE_CONFIG", root().join("tests/data/no-such-gateway.toml"))
        .env_remove("RUST_LOG")
        .args([
            "sweep",
            "--server",
            server,
            "--trial",
            "NCT06406205",
            "--batch",
            "1",
            "--concurrency",
            "1",
        ])
        .args(["--format", format, "--state"])
        .arg(db.arg())
        .arg("--changes")
        .arg(changes)
        .arg("-o")
        .arg(out);
    for i in 0..10 {
        c.args(["--patient", &format!("p{i}")]);
    }
    if let Some(d) = as_of {
        c.args(["--as-of", d]);
    }
    c
}

#[tokio::test]
async fn a_killed_sweep_resumes_without_repeating_or_missing_anyone() {
    let dir = std::env::temp_dir().join(format!("trialgate-resume-{}", std::process::id()));
    killed_and_resumed(&dir, Store::File(dir.join("state.sqlite"))).await;
}

/// The same, with the state in PostgreSQL: what processes sharing a cohort use.
#[tokio::test]
async fn a_killed_sweep_resumes_from_state_in_postgres() {
    let dir = std::env::temp_dir().join(format!("trialgate-resume-pg-{}", std::process::id()));
    killed_and_resumed(&dir, Store::Postgres(pg::database("resume"))).await;
}

async fn killed_and_resumed(dir: &Path, db: Store) {
    let server = mock::server_without_capabilities().await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(|req: &Request| {
            let patients = ids_of(req, "_id")
                .into_iter()
                .map(|id| json!({"resourceType": "Patient", "id": id, "gender": "female", "birthDate": "1990-01-01"}))
                .collect();
            ok(&searchset(patients))
        })
        .mount(&server)
        .await;
    // Slow Observation searches, so that the kill lands mid-run.
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .respond_with(ok(&searchset(Vec::new())).set_delay(Duration::from_millis(300)))
        .with_priority(5)
        .mount(&server)
        .await;
    for t in [
        "Condition",
        "MedicationRequest",
        "MedicationStatement",
        "MedicationAdministration",
        "Procedure",
        "Immunization",
        "AllergyIntolerance",
        "DiagnosticReport",
    ] {
        Mock::given(method("GET"))
            .and(path(format!("/{t}")))
            .respond_with(ok(&searchset(Vec::new())))
            .mount(&server)
            .await;
    }

    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let (out, changes) = (dir.join("report.csv"), dir.join("changes.csv"));

    // First run: killed (SIGKILL) once three patients are checkpointed.
    let mut child = command(&server.uri(), &db, &out, Some("2026-06-01"), &changes)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut waited = 0;
    while db.screened() < 3 {
        assert!(waited < 200, "the sweep never checkpointed three patients");
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended before it could be killed");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let saved = db.screened();
    assert!((3..10).contains(&saved), "{saved} patients checkpointed");
    assert!(!out.exists(), "a killed run leaves no report under the final name");
    let before = server.received_requests().await.unwrap().len();

    // Second run, as a schedule starts it (no date, on a later day): it finishes the
    // interrupted run, as of that run's date.
    let second = command(&server.uri(), &db, &out, None, &changes).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert!(err.contains("resuming the interrupted run as of 2026-06-01"), "{err}");
    let report = std::fs::read_to_string(&out).unwrap();
    let patients: Vec<&str> = report.lines().skip(1).filter_map(|l| l.split(',').next()).collect();
    let unique: BTreeSet<&str> = patients.iter().copied().collect();
    assert_eq!(patients.len(), 10, "one row per patient: {report}");
    assert_eq!(unique.len(), 10, "nobody twice: {report}");
    // In patient order. Here the patients checkpointed are the lowest ids, so this checks that
    // the verdicts kept from before the interruption come first; the merge of interleaved ones
    // is tested in `sweep::tests`.
    assert!(patients.is_sorted(), "{report}");
    let reqs = server.received_requests().await.unwrap();
    let refetched: BTreeSet<String> = reqs[before..]
        .iter()
        .filter(|r| r.url.path() == "/Patient")
        .flat_map(|r| ids_of(r, "_id"))
        .collect();
    assert_eq!(
        refetched.len(),
        10 - saved,
        "only the patients not checkpointed are fetched again: {refetched:?}"
    );
    assert!(err.contains("first finished run of this cohort"), "{err}");

    // A later run (the next day, after a low eGFR for p3 arrived) lists what changed.
    Mock::given(method("GET"))
        .and(path("/Observation"))
        .and(query_param("patient", "p3"))
        .respond_with(ok(&searchset(vec![
            json!({"resourceType": "Observation", "id": "o3", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "98979-8"}]},
            "subject": {"reference": "Patient/p3"}, "effectiveDateTime": "2026-06-01T09:00:00Z",
            "valueQuantity": {"value": 40, "unit": "mL/min/{1.73_m2}", "system": "http://unitsofmeasure.org", "code": "mL/min/{1.73_m2}"}}),
        ])))
        .with_priority(1)
        .mount(&server)
        .await;
    let page = dir.join("page.html");
    let third = command_as(&server.uri(), &db, &page, Some("2026-06-02"), &changes, "html")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success(), "{err}");
    assert!(!err.contains("resuming"), "a new date is a new run: {err}");
    assert!(
        err.contains("changes since the run as of 2026-06-01: 0 newly eligible or potentially eligible, 1 newly ineligible"),
        "{err}"
    );
    let listed = std::fs::read_to_string(&changes).unwrap();
    assert_eq!(
        listed,
        "patient,trial,from,to\nPatient/p3,NCT06406205,potentially-eligible,ineligible\n"
    );
    // The sweep's page marks the same change, with the status before.
    let page = std::fs::read_to_string(&page).unwrap();
    let p3 = page
        .split("<td data-key=\"Patient/p3\">Patient/p3</td>")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_default();
    assert!(
        p3.contains("<mark class=\"newly-ineligible\">newly ineligible</mark><br><small>was potentially eligible</small>"),
        "{p3}"
    );
    assert_eq!(page.matches("<mark class=").count(), 1, "nobody else changed");
    let _ = std::fs::remove_dir_all(dir);
}
