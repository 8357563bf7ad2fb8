//! Against a real FHIR server (the Helios FHIR Server, which scripts/test installs and this
//! test starts on 127.0.0.1): load the fixture cohort, sweep with write-back, sweep again, and
//! check that the second run wrote nothing new, that the statuses are the ones `screen` gives
//! for the same files, and that a ResearchSubject a person moved on-study is left alone.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use trialgate::criteria::decisions::Decisions;
use trialgate::fhir::client::{ClientOptions, FhirClient};
use trialgate::sweep::{SweepOptions, sweep};
use trialgate::time::Date;
use trialgate::writeback::{WriteOptions, write_back};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Stops the server however the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start() -> (Server, String, PathBuf) {
    let cache = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/trialgate");
    let hfs = std::env::var("TRIALGATE_HFS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache.join("hfs/bin/hfs"));
    let data = std::env::var("TRIALGATE_HFS_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache.join("hfs-data"));
    assert!(
        hfs.is_file(),
        "the Helios FHIR Server is not installed at {}: run scripts/test, which installs it",
        hfs.display()
    );
    let dir = std::env::temp_dir().join(format!("trialgate-hfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::copy(data.join("search-parameters-r4.json"), dir.join("data/search-parameters-r4.json"))
        .expect("the R4 SearchParameter bundle (scripts/test fetches it)");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let child = Command::new(&hfs)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--database-url")
        .arg(dir.join("fhir.db"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("HFS_BASE_URL", &base)
        .env("HFS_UI_ENABLED", "false")
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hfs starts");
    let server = Server(child);
    let http = reqwest::Client::new();
    for _ in 0..120 {
        if http
            .get(format!("{base}/metadata"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return (server, base, dir);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("hfs did not answer /metadata within 60 s");
}

/// Each fixture Bundle as a transaction of PUTs, so the server keeps the fixture ids.
async fn load(base: &str) {
    let http = reqwest::Client::new();
    for f in std::fs::read_dir(root().join("fixtures/bundles")).unwrap() {
        let b: Value = serde_json::from_str(&std::fs::read_to_string(f.unwrap().path()).unwrap()).unwrap();
        let entries: Vec<Value> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let r = &e["resource"];
                json!({"resource": r, "request": {"method": "PUT", "url": format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap())}})
            })
            .collect();
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let resp = http
            .post(base)
            .header("Content-Type", "application/fhir+json")
            .body(tx.to_string())
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "loading a fixture: {}",
            resp.text().await.unwrap_or_default()
        );
    }
}

async fn subjects(base: &str) -> Vec<Value> {
    let text = reqwest::get(format!("{base}/ResearchSubject?_count=1000"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    body["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e["resource"].clone())
        .collect()
}

#[tokio::test]
async fn sweep_and_write_back_against_a_real_fhir_server() {
    let (_server, base, dir) = start().await;
    load(&base).await;
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let as_of = Date::parse("2026-06-01").unwrap();
    let client = FhirClient::new(&base, ClientOptions::default()).unwrap();
    let all = WriteOptions {
        write_ineligible: true,
        dry_run: false,
    };

    let (swept, summary) = sweep(&client, &cfg, as_of, &Decisions::default(), &SweepOptions::default())
        .await
        .unwrap();
    assert_eq!(summary.errors, 0);
    let screened = trialgate::screen(&root().join("fixtures/bundles"), &cfg, as_of, &Decisions::default()).unwrap();
    let statuses = |rs: &[trialgate::criteria::eval::TrialResult]| -> BTreeMap<(String, String), &'static str> {
        rs.iter()
            .map(|r| ((r.patient.clone(), r.trial.clone()), r.status.as_str()))
            .collect()
    };
    assert_eq!(
        statuses(&swept.results),
        statuses(&screened.results),
        "the server's data gives the files' verdicts"
    );

    let w1 = write_back(&client, &cfg.trials, &swept.results, as_of, &all).await.unwrap();
    assert!(w1.failed.is_empty(), "{:?}", w1.failed);
    assert_eq!(w1.created, swept.results.len());
    let first = subjects(&base).await;
    assert_eq!(first.len(), swept.results.len(), "one ResearchSubject per patient and trial");

    // A coordinator moves one subject on-study; trialgate must leave it alone.
    let mut moved = first[0].clone();
    moved["status"] = json!("on-study");
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{base}/ResearchSubject/{}", moved["id"].as_str().unwrap()))
        .header("Content-Type", "application/fhir+json")
        .body(moved.to_string())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());

    let (again, _) = sweep(&client, &cfg, as_of, &Decisions::default(), &SweepOptions::default())
        .await
        .unwrap();
    let w2 = write_back(&client, &cfg.trials, &again.results, as_of, &all).await.unwrap();
    assert_eq!((w2.created, w2.updated, w2.left_alone), (0, 0, 1), "the second run writes nothing");
    assert_eq!(w2.unchanged, again.results.len() - 1);
    let second = subjects(&base).await;
    assert_eq!(second.len(), first.len(), "no duplicates");
    let r4: BTreeMap<&str, &str> = [
        ("eligible", "eligible"),
        ("potentially-eligible", "potential-candidate"),
        ("ineligible", "ineligible"),
    ]
    .into();
    let want = statuses(&screened.results);
    for s in &second {
        let ident = s["identifier"][0]["value"].as_str().unwrap();
        let (trial, patient) = ident.split_once(':').unwrap();
        let expected = if s["id"] == moved["id"] {
            "on-study"
        } else {
            r4[want[&(patient.to_string(), trial.to_string())]]
        };
        assert_eq!(s["status"], expected, "{ident}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
