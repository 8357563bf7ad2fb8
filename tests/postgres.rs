//! Sweep state in PostgreSQL, shared by processes: four shard processes started at once on one
//! database give exactly the single process's verdicts, and one run cannot be run twice at once.

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use trialgate::state::{Location, State, StateError};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

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

/// Twelve patients; the odd ones are too young for the trial, so verdicts differ.
async fn cohort_server() -> MockServer {
    let server = mock::server_without_capabilities().await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(|req: &Request| {
            let ids: Vec<String> = req
                .url
                .query_pairs()
                .find(|(k, _)| k == "_id")
                .map(|(_, v)| v.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            let patients = ids
                .into_iter()
                .map(|id| {
                    let n: u32 = id.trim_start_matches('p').parse().unwrap_or(0);
                    let born = if n % 2 == 1 { "2015-01-01" } else { "1985-01-01" };
                    json!({"resourceType": "Patient", "id": id, "gender": "female", "birthDate": born})
                })
                .collect();
            ok(&searchset(patients))
        })
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ok(&searchset(Vec::new())))
        .with_priority(10)
        .mount(&server)
        .await;
    server
}

fn sweep(server: &str, out: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"));
    c.current_dir(root())
        .env("TRIALGATE_CONFIG", root().join("tests/data/no-such-gateway.toml"))
        .env_remove("RUST_LOG")
        .args(["sweep", "--server", server, "--trial", "NCT06406205", "--as-of", "2026-06-01"])
        .args(["--batch", "2", "--format", "csv", "-o"])
        .arg(out);
    for i in 0..12 {
        c.args(["--patient", &format!("p{i}")]);
    }
    c
}

fn rows(out: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn four_shard_processes_share_one_postgres_state() {
    let server = cohort_server().await;
    let url = pg::database("shards");
    let dir = std::env::temp_dir().join(format!("trialgate-pg-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let single = dir.join("single.csv");
    let whole = sweep(&server.uri(), &single).output().unwrap();
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));

    // All four at once, on one fresh database: they create its tables together.
    let children: Vec<_> = (1..=4)
        .map(|k| {
            sweep(&server.uri(), &dir.join(format!("shard{k}.csv")))
                .args(["--shard", &format!("{k}/4"), "--state", &url])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut union = Vec::new();
    for k in 1..=4 {
        union.extend(rows(&dir.join(format!("shard{k}.csv"))));
    }
    let mut expected = rows(&single);
    union.sort();
    expected.sort();
    assert_eq!(expected.len(), 12);
    assert_eq!(union, expected, "the shards together are the single process");
    let patients: BTreeSet<&str> = union.iter().filter_map(|r| r.split(',').next()).collect();
    assert_eq!(patients.len(), 12, "no patient in two shards");
    assert!(union.iter().any(|r| r.contains(",ineligible,")) && union.iter().any(|r| !r.contains(",ineligible,")));

    // The shared state holds each shard's finished run and every patient once.
    assert_eq!(pg::count(&url, "SELECT COUNT(*) FROM runs WHERE finished IS NOT NULL"), 4);
    assert_eq!(pg::count(&url, "SELECT COUNT(DISTINCT patient) FROM results"), 12);
    assert_eq!(pg::count(&url, "SELECT COUNT(*) FROM results"), 12);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_run_is_not_run_twice_at_once() {
    let url = Location::parse(&pg::database("busy"));
    let first = State::open(&url, "cohort|2026-06-01", "cohort", "2026-06-01").unwrap();
    assert!(!first.resumed);
    match State::open(&url, "cohort|2026-06-01", "cohort", "2026-06-01") {
        Err(e @ StateError::Busy { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("another process is running this sweep"), "{msg}");
            assert!(!msg.contains("password"), "{msg}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second process got the run"),
    }
    // Another date of the same cohort is another run, and may go on at the same time.
    assert!(State::open(&url, "cohort|2026-06-02", "cohort", "2026-06-02").is_ok());
    drop(first);
    let again = State::open(&url, "cohort|2026-06-01", "cohort", "2026-06-01").unwrap();
    assert!(again.resumed, "once the first process is gone its unfinished run is picked up");
}

#[test]
fn an_unreachable_database_is_a_clear_error() {
    let url = Location::parse("postgres://nobody:secret@127.0.0.1:1/none");
    let err = State::open(&url, "k", "c", "2026-06-01")
        .err()
        .expect("no server listens on port 1");
    let msg = err.to_string();
    assert!(msg.contains("cannot connect"), "{msg}");
    assert!(msg.contains("postgres://nobody:***@127.0.0.1:1/none"), "{msg}");
    assert!(!msg.contains("secret"), "{msg}");
}

/// The state travels encrypted when its URL asks, libpq's way: `sslmode=verify-full` (or
/// `verify-ca`) with the server's CA in `sslrootcert`. A CA that did not sign the server's
/// certificate is refused, never talked to in the clear; a URL without `sslmode` stays plain.
/// scripts/test starts the server with TLS on and names the two CAs.
#[test]
fn the_state_goes_over_tls_when_its_url_asks() {
    let ca = |var: &str| {
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests through scripts/test, which makes the test CAs"))
    };
    let (ours, other) = (ca("TRIALGATE_PG_CA"), ca("TRIALGATE_PG_OTHER_CA"));
    let plain = pg::database("tls");
    let with = |mode: &str, root: &str| Location::parse(&format!("{plain}?sslmode={mode}&sslrootcert={root}"));
    let full = State::open(&with("verify-full", &ours), "a|2026-06-01", "a", "2026-06-01").unwrap();
    let ca_only = State::open(&with("verify-ca", &ours), "b|2026-06-01", "b", "2026-06-01").unwrap();
    let clear = State::open(&Location::parse(&plain), "c|2026-06-01", "c", "2026-06-01").unwrap();
    assert_eq!(pg::connections(&plain), (2, 3), "two encrypted connections and one plain");
    drop((full, ca_only, clear));

    let err = State::open(&with("verify-full", &other), "d|2026-06-01", "d", "2026-06-01")
        .err()
        .expect("a server whose certificate the given CA did not sign is refused");
    let msg = err.to_string();
    assert!(msg.contains("cannot connect") && msg.contains("certificate"), "{msg}");
    let err = State::open(&with("verify-full", "/nonexistent/ca.pem"), "d|2026-06-01", "d", "2026-06-01")
        .err()
        .expect("a missing CA file is an error");
    assert!(err.to_string().contains("sslrootcert /nonexistent/ca.pem"), "{err}");
}

#[test]
fn the_verdict_history_keeps_transitions_in_postgres() {
    let url = Location::parse(&pg::database("ledger"));
    let cfg = trialgate::load_config(
        &root().join("mappings"),
        &root().join("config/trials"),
        &["NCT06406205".to_string()],
    )
    .unwrap();
    let as_of = trialgate::time::Date::parse("2026-06-01").unwrap();
    let young = root().join("fixtures/bundles");
    let screened = trialgate::screen(&young, &cfg, as_of, &trialgate::criteria::decisions::Decisions::default()).unwrap();
    let mut ledger = trialgate::state::Ledger::open(&url).unwrap();
    let first = ledger.record(&screened.results, "notification").unwrap();
    let counted = screened
        .results
        .iter()
        .filter(|r| r.status != trialgate::criteria::Status::Error)
        .count();
    assert_eq!(first.len(), counted, "every verdict is new");
    assert!(
        ledger.record(&screened.results, "notification").unwrap().is_empty(),
        "the same verdicts again change nothing"
    );
    // One patient's status moves.
    let mut moved = screened.results[0].clone();
    let to = if moved.status == trialgate::criteria::Status::Ineligible {
        trialgate::criteria::Status::PotentiallyEligible
    } else {
        trialgate::criteria::Status::Ineligible
    };
    let from = moved.status.as_str().to_string();
    moved.status = to;
    let changes = ledger.record(std::slice::from_ref(&moved), "$screen").unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].from.as_deref(), Some(from.as_str()));
    let history = ledger.history(&moved.patient, &moved.trial).unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].source, "$screen");
    // The last Subscription event seen: the highest kept, a late lower one ignored.
    for (n, when) in [(5, "t5"), (3, "t3"), (6, "t6")] {
        ledger.event_seen("s1", n, when).unwrap();
    }
    assert_eq!(ledger.events_seen().unwrap(), [("s1".to_string(), 6, "t6".to_string())]);
    // The database drops the connection (a restart, a failover): the history reconnects.
    pg::drop_connections(match &url {
        Location::Postgres(u) => u,
        Location::File(_) => unreachable!(),
    });
    let latest = ledger.latest().unwrap();
    assert_eq!(latest.len(), counted);
    pg::drop_connections(match &url {
        Location::Postgres(u) => u,
        Location::File(_) => unreachable!(),
    });
    assert!(ledger.record(std::slice::from_ref(&moved), "$screen").unwrap().is_empty());
    let mine = latest
        .iter()
        .find(|l| l.result.patient == moved.patient && l.result.trial == moved.trial)
        .unwrap();
    assert_eq!((mine.result.status, mine.previous.as_deref()), (to, Some(from.as_str())));
}
