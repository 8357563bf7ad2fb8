//! The coordinator's page in a real browser: the built `trialgate serve` on 127.0.0.1, filled
//! by POSTing the fixture cohort to /screen, opened in headless Chromium driven through
//! chromedriver's W3C WebDriver HTTP protocol (with reqwest; no WebDriver crate). It checks
//! the sign-in form and that nothing about a patient shows before sign-in, the patients by
//! name and MRN with their deciding reasons per trial, the newly eligible first, the filter
//! box, and saves a screenshot to target/test-output/coordinator-page.png.
//!
//! Needs Debian's `chromium` and `chromium-driver`, which scripts/test installs: without them
//! the test fails (it never skips).

use base64::Engine as _;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "browser-test-token";
const FHIR_BASE: &str = "https://fhir.example.org/r4";
const AS_OF: &str = "2026-06-01";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Kills a child process when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.exists(),
        "{} is missing: run scripts/test, which installs Debian's chromium and chromium-driver \
         (apt-get install -y --no-install-recommends chromium chromium-driver), or set {var}",
        path.display()
    );
    path
}

fn client() -> reqwest::Client {
    // Everything here is on 127.0.0.1: never through a configured proxy.
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client")
}

/// Polls `url` until it answers at all, for up to `secs` seconds (a start-up wait, not an
/// assertion on time; /health may well say 503, since the FHIR server named is not there).
async fn wait_for(http: &reqwest::Client, url: &str, secs: u64, what: &str) {
    for _ in 0..secs * 10 {
        if http.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not start answering at {url}");
}

/// A W3C WebDriver session on chromedriver.
struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("WebDriver {method} {path}: not JSON ({e}): {text}"));
        assert!(status.is_success(), "WebDriver {method} {path}: {status} {v}");
        v["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    /// Runs `script` in the page and returns what it returns.
    async fn js(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({"script": script, "args": []})))
            .await
    }

    /// The text a person sees: hidden rows are not in `innerText`.
    async fn visible_text(&self) -> String {
        self.js("return document.body.innerText;")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The visible text once it shows `marker` (a form posted navigates while WebDriver
    /// answers), or as it is after ten seconds, for the check that follows to report.
    async fn text_showing(&self, marker: &str) -> String {
        let mut text = String::new();
        for _ in 0..100 {
            text = self.visible_text().await;
            if text.contains(marker) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        text
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element id for {css}: {v}"))
            .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/value"), Some(json!({"text": text})))
            .await;
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/click"), Some(json!({})))
            .await;
    }
}

/// The fixture cohort as the bodies an integration engine would post: each patient Bundle,
/// the Synthea transaction, and the Bulk NDJSON files as one NDJSON body.
fn cohort() -> Vec<(String, Vec<u8>)> {
    let mut bodies = Vec::new();
    for dir in ["fixtures/bundles", "fixtures/synthea"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
            .expect("the fixtures")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for f in files {
            bodies.push((f.display().to_string(), std::fs::read(&f).expect("a fixture")));
        }
    }
    let mut ndjson = Vec::new();
    for f in ["Patient", "Condition", "Observation"] {
        ndjson.extend(std::fs::read(root().join(format!("fixtures/bulk/{f}.ndjson"))).expect("a fixture"));
        ndjson.push(b'\n');
    }
    bodies.push(("fixtures/bulk".into(), ndjson));
    bodies
}

/// A fixture Bundle with one resource changed: what the same patient's data looked like
/// before (or after) a correction, so that the board sees a status change.
fn bundle_with(file: &str, change: impl Fn(&mut Vec<Value>)) -> Vec<u8> {
    let mut b: Value = serde_json::from_slice(&std::fs::read(root().join(file)).expect("a fixture")).expect("JSON");
    if let Some(entries) = b["entry"].as_array_mut() {
        change(entries);
    }
    serde_json::to_vec(&b).expect("JSON")
}

async fn screen(http: &reqwest::Client, base: &str, name: &str, body: Vec<u8>) -> Value {
    let resp = http
        .post(format!("{base}/screen?as_of={AS_OF}"))
        .bearer_auth(TOKEN)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /screen {name}: {e}"));
    assert_eq!(resp.status(), 200, "POST /screen {name}");
    serde_json::from_str(&resp.text().await.unwrap_or_default()).expect("a JSON report")
}

fn status_in(report: &Value, patient: &str, trial: &str) -> String {
    report["results"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["patient"] == patient && r["trial"] == trial)
        .and_then(|r| r["status"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_page_in_headless_chromium() {
    let chromium = tool("TRIALGATE_CHROMIUM", "/usr/bin/chromium");
    let chromedriver = tool("TRIALGATE_CHROMEDRIVER", "/usr/bin/chromedriver");
    let http = client();
    let scratch = std::env::temp_dir().join(format!("trialgate-browser-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("a scratch folder");

    // The service, as the README starts it, with evidence linked to a FHIR server's base.
    let port = free_port();
    let config = scratch.join("gateway.toml");
    std::fs::write(&config, format!("[server]\nurl = \"{FHIR_BASE}\"\n[schedule]\nstate = \"\"\n")).expect("config");
    let service = Command::new(env!("CARGO_BIN_EXE_trialgate"))
        .current_dir(root())
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("TRIALGATE_API_TOKENS", TOKEN)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.join("serve.log")).expect("a log file"))
        .spawn()
        .expect("starting trialgate serve");
    let _service = Reaped(service);
    let base = format!("http://127.0.0.1:{port}");
    wait_for(&http, &format!("{base}/health"), 60, "trialgate serve").await;

    // Aisha Bello first with her mislabelled eGFR of 31 still counted (before it was marked
    // entered-in-error): ineligible; then her record as it is now. Meilin Zhou first as she
    // is, then with a new eGFR of 30. The board keeps both changes.
    let aisha_before = bundle_with("fixtures/bundles/03-aisha-bello.json", |entries| {
        for e in entries.iter_mut() {
            if e["resource"]["id"] == "aisha-egfr-20260509-eie" {
                e["resource"]["status"] = json!("final");
            }
        }
    });
    let r = screen(&http, &base, "Aisha before", aisha_before).await;
    assert_eq!(status_in(&r, "Patient/aisha-bello", "NCT06406205"), "ineligible");
    for (name, body) in cohort() {
        screen(&http, &base, &name, body).await;
    }
    let meilin_after = bundle_with("fixtures/bundles/01-meilin-zhou.json", |entries| {
        let mut egfr = entries
            .iter()
            .find(|e| e["resource"]["id"] == "meilin-egfr-20260512")
            .map(|e| e["resource"].clone())
            .expect("Meilin's eGFR");
        egfr["id"] = json!("meilin-egfr-20260528");
        egfr["effectiveDateTime"] = json!("2026-05-28T08:00:00+08:00");
        egfr["valueQuantity"]["value"] = json!(30);
        entries.push(json!({"resource": egfr}));
    });
    let r = screen(&http, &base, "Meilin after", meilin_after).await;
    assert_eq!(status_in(&r, "Patient/meilin-zhou", "NCT06406205"), "ineligible");

    // No patient data without signing in, over plain HTTP too.
    let anonymous = http
        .get(format!("{base}/"))
        .send()
        .await
        .expect("GET /")
        .text()
        .await
        .unwrap_or_default();
    assert!(anonymous.contains("action=\"/login\""), "{anonymous}");
    for secret in ["Zhou", "SH-204417", "Delgado", "exc-1", "Patient/"] {
        assert!(!anonymous.contains(secret), "`{secret}` shown before sign-in");
    }

    // Chromium through chromedriver.
    let driver_port = free_port();
    let driver = Command::new(&chromedriver)
        .arg(format!("--port={driver_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromedriver");
    let _driver = Reaped(driver);
    let driver_base = format!("http://127.0.0.1:{driver_port}");
    wait_for(&http, &format!("{driver_base}/status"), 30, "chromedriver").await;
    let profile = scratch.join("chromium-profile");
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-proxy-server", "--window-size=1440,2200",
                     format!("--user-data-dir={}", profile.display())]
        }
    }}});
    let session = http
        .post(format!("{driver_base}/session"))
        .header("content-type", "application/json")
        .body(caps.to_string())
        .send()
        .await
        .expect("a WebDriver session");
    let session: Value = serde_json::from_str(&session.text().await.unwrap_or_default()).expect("JSON");
    let id = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {session}"))
        .to_string();
    let browser = Browser {
        http: http.clone(),
        base: format!("{driver_base}/session/{id}"),
    };

    let outcome = drive(&browser, &base).await;
    let _ = http.delete(browser.base.clone()).send().await;
    let _ = std::fs::remove_dir_all(&scratch);
    outcome.unwrap_or_else(|why| panic!("{why}"));
}

/// What a coordinator does on the page. An `Err` says what was wrong (so the browser session
/// is closed before the test fails).
async fn drive(b: &Browser, base: &str) -> Result<(), String> {
    let check = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };

    // Before sign-in: the form, and nothing about anyone.
    b.open(&format!("{base}/")).await;
    let text = b.text_showing("Sign in").await;
    check(text.contains("Sign in"), format!("no sign-in form: {text}"))?;
    check(
        !text.contains("Zhou") && !text.contains("SH-204417"),
        format!("patient data before sign-in: {text}"),
    )?;

    // A wrong token is refused with a plain message; the right one signs in.
    b.type_into("#token", "not-the-token").await;
    b.click("button[type=submit]").await;
    let text = b.text_showing("That token is not accepted").await;
    check(text.contains("That token is not accepted"), format!("no refusal: {text}"))?;
    check(!text.contains("Zhou"), format!("patient data after a refused sign-in: {text}"))?;
    b.type_into("#token", TOKEN).await;
    b.click("button[type=submit]").await;
    let text = b.text_showing("Signed in").await;
    check(text.contains("Signed in"), format!("not signed in: {text}"))?;
    let url = b.call(reqwest::Method::GET, "/url", None).await;
    check(
        url.as_str().is_some_and(|u| !u.contains(TOKEN)),
        format!("the token is in the URL: {url}"),
    )?;
    let cookie_js = b.js("return document.cookie;").await;
    check(
        cookie_js == json!(""),
        format!("the session cookie is readable by script: {cookie_js}"),
    )?;

    // Per trial, the patients by name and MRN, with their status and reasons.
    let rows = |trial: &str| {
        format!(
            "return [...document.querySelectorAll('#trial-{trial} tbody tr')].filter(r => r.getClientRects().length > 0)\
             .map(r => r.innerText.replace(/\\s+/g, ' '));"
        )
    };
    let visible = |v: Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let nct = visible(b.js(&rows("NCT06406205")).await);
    let row_of = |rows: &[String], name: &str| rows.iter().find(|r| r.contains(name)).cloned();
    // The newly eligible first: Aisha, whose mislabelled eGFR no longer counts.
    check(
        nct.first().is_some_and(|r| {
            r.contains("Aisha Bello") && r.contains("LG-551902") && r.contains("newly eligible") && r.contains("was ineligible")
        }),
        format!("Aisha is not first as newly eligible: {nct:#?}"),
    )?;
    // Meilin, ineligible since her new eGFR, is shown (newly ineligible) with the reason.
    let meilin = row_of(&nct, "Mei Lin Zhou").ok_or(format!("no row for Meilin: {nct:#?}"))?;
    check(
        meilin.contains("SH-204417")
            && meilin.contains("newly ineligible")
            && meilin.contains("was potentially eligible")
            && meilin.contains("exc-1")
            && meilin.contains("egfr 30"),
        format!("Meilin's row: {meilin}"),
    )?;
    for (name, mrn) in [
        ("Grace Okafor", "NY-330781"),
        ("Thomas James Whitfield", "NHS-943 476 5919"),
        ("Ka Yan Wong", "HK-000231"),
    ] {
        let row = row_of(&nct, name).ok_or(format!("no row for {name}: {nct:#?}"))?;
        check(row.contains(mrn) && row.contains("potentially eligible"), format!("{name}: {row}"))?;
    }
    // The ineligible are hidden until asked for; then each shows why.
    check(
        row_of(&nct, "Rosa María Delgado").is_none(),
        format!("ineligible Rosa shown by default: {nct:#?}"),
    )?;
    b.click("input.status[value=ineligible]").await;
    let nct = visible(b.js(&rows("NCT06406205")).await);
    let expect = [
        ("Rosa María Delgado", "TX-880153", "exc-1", "egfr 38"),
        ("Lucia Ferreira", "SP-771020", "record", "deceased (2026-02-11T03:20:00-03:00)"),
        ("Sofia Marquez", "CA-PED-60218", "inc-2", "16"),
        ("Priya Raman", "BLR-420977", "inc-4b", "upcr"),
        ("Marisol467 Reyes693", "5f0e2a1c-93d4-4b8e-a6f7-2c1d9e8b3a40", "exc-1", "egfr"),
    ];
    for (name, mrn, criterion, reason) in expect {
        let row = row_of(&nct, name).ok_or(format!("no row for {name}: {nct:#?}"))?;
        check(
            row.contains(mrn) && row.contains("ineligible") && row.contains(criterion) && row.contains(reason),
            format!("{name} should show {mrn}, {criterion} and `{reason}`: {row}"),
        )?;
    }
    check(nct.len() == 13, format!("13 patients in NCT06406205: {nct:#?}"))?;
    // Another trial has its own reasons: Grace is out of belimumab-multitarget-ln by exc-2.
    let bel = visible(b.js(&rows("belimumab-multitarget-ln")).await);
    let grace = row_of(&bel, "Grace Okafor").ok_or(format!("no Grace in belimumab: {bel:#?}"))?;
    check(
        grace.contains("exc-2") && grace.contains("ineligible"),
        format!("Grace in belimumab: {grace}"),
    )?;

    // Evidence links to the resource on the FHIR server.
    let href = b
        .js("const a = [...document.querySelectorAll('#trial-NCT06406205 a')].find(a => a.textContent === 'Observation/rosa-egfr-20260505'); return a ? a.href : null;")
        .await;
    check(
        href == json!(format!("{FHIR_BASE}/Observation/rosa-egfr-20260505")),
        format!("Rosa's eGFR is not linked to the server: {href}"),
    )?;

    // The filter box hides the rows that do not match, in every trial.
    b.type_into("#q", "SH-204417").await;
    let nct = visible(b.js(&rows("NCT06406205")).await);
    check(
        nct.len() == 1 && nct[0].contains("Mei Lin Zhou"),
        format!("the filter left: {nct:#?}"),
    )?;
    let bel = visible(b.js(&rows("belimumab-multitarget-ln")).await);
    check(bel.len() == 1, format!("the filter left in belimumab: {bel:#?}"))?;
    // Cleared, every row comes back, and the page is photographed as a coordinator sees it.
    b.js("const q = document.getElementById('q'); q.value = ''; q.dispatchEvent(new Event('input')); return null;")
        .await;
    let nct = visible(b.js(&rows("NCT06406205")).await);
    check(nct.len() == 13, format!("after clearing the filter: {}", nct.len()))?;
    b.js("window.scrollTo(0, 0); return null;").await;
    let png = b.call(reqwest::Method::GET, "/screenshot", None).await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap_or_default())
        .map_err(|e| format!("the screenshot is not base64: {e}"))?;
    check(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG".into())?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-output");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::write(out.join("coordinator-page.png"), &png).map_err(|e| e.to_string())?;

    // Signing out ends the session: the form again, and nothing about anyone.
    b.click("header form button[type=submit]").await;
    let text = b.text_showing("Sign in to see").await;
    check(
        text.contains("Sign in") && !text.contains("Zhou"),
        format!("after signing out: {text}"),
    )?;
    Ok(())
}
