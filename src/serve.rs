//! `trialgate serve`: the screening engine over HTTP, for integration engines that send one
//! patient at a time. Same configuration, same path (`screen_read`) and same report as `screen`.
//!
//! Every error is a FHIR OperationOutcome with a code and a message that says what to fix.
//! Every API route (all but `/health` and the page's, `console::PAGE_ROUTES`) needs
//! `Authorization: Bearer <token>` (compared in constant time); the page signs in on its own.
//! Logs carry a request id, the route, the status and the time taken: never a name, a birth
//! date, a value or an id from the body.

use crate::criteria::decisions::Decisions;
use crate::time::Date;
use crate::{Config, SourceFile};
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The OpenAPI description of these routes, kept in the repository and served as is.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Counters for `/metrics` (Prometheus text format).
#[derive(Default)]
struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    seconds: Mutex<BTreeMap<String, (f64, u64)>>,
    verdicts: Mutex<BTreeMap<(String, &'static str), u64>>,
}

pub struct App {
    cfg: Config,
    /// Screenings at once: each holds its body and its facts, so their number bounds memory.
    slots: tokio::sync::Semaphore,
    /// Accepted bearer tokens; empty only when started with authentication off.
    tokens: Vec<String>,
    max_body: usize,
    metrics: Metrics,
    next_id: AtomicU64,
    /// What `/health` checks besides the service itself.
    fhir: Option<crate::fhir::client::FhirClient>,
    state: Option<crate::state::Location>,
    /// The configured FHIR server, for `$screen`, `/notify` and write-back.
    live: Option<Arc<crate::live::Live>>,
    /// The coordinator's page: its board of latest verdicts, sessions and options.
    console: crate::console::Console,
}

/// What a service may have besides its trials and tokens; each part left out is a feature
/// not served (the default: none of them).
#[derive(Default)]
pub struct Services {
    /// The FHIR server `/health` checks (`GET metadata`).
    pub fhir: Option<crate::fhir::client::FhirClient>,
    /// The state database `/health` checks and the page's verdict history is read from.
    pub state: Option<crate::state::Location>,
    /// The configured FHIR server, for `$screen`, `/notify` and write-back.
    pub live: Option<Arc<crate::live::Live>>,
    /// How the coordinator's page is served.
    pub page: crate::console::PageOptions,
}

impl App {
    pub fn new(cfg: Config, tokens: Vec<String>, max_body: usize) -> Arc<App> {
        App::with(cfg, tokens, max_body, Services::default())
    }

    /// A service with the `services` given.
    pub fn with(cfg: Config, tokens: Vec<String>, max_body: usize, services: Services) -> Arc<App> {
        let Services { fhir, state, live, page } = services;
        let trial_ids = cfg.trials.iter().map(|t| t.id.clone()).collect();
        let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        Arc::new(App {
            slots: tokio::sync::Semaphore::new(cores * 2),
            cfg,
            tokens,
            max_body,
            metrics: Metrics::default(),
            next_id: AtomicU64::new(1),
            fhir,
            state,
            live,
            console: crate::console::Console::new(page, trial_ids),
        })
    }

    /// The page's board, sessions and options.
    pub fn console(&self) -> &crate::console::Console {
        &self.console
    }

    /// The configured FHIR server's side of the service, whose verdict history the page reads.
    pub(crate) fn live_server(&self) -> Option<&Arc<crate::live::Live>> {
        self.live.as_ref()
    }

    /// Whether `token` is one of the accepted API tokens.
    pub(crate) fn accepts(&self, token: &str) -> bool {
        self.tokens.iter().any(|k| same(k.as_bytes(), token.trim().as_bytes()))
    }

    /// Started with authentication off (`--no-auth`).
    pub(crate) fn open_access(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// An OperationOutcome response: `code` from the FHIR issue-type value set.
fn outcome(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({"resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": message.into()}]});
    fhir_json(status, body.to_string())
}

fn fhir_json(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+json"));
    r
}

/// Equal in time whatever the first differing byte, so a token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Authentication, request ids, logging and request metrics for every route.
async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    // The page's routes sign in on their own (a session cookie, a proxy's header) and answer
    // HTML; a session never opens an API route.
    let page = crate::console::PAGE_ROUTES.contains(&path.as_str());
    let open = path == "/health" || page;
    let authorized = open
        || app.open_access()
        || req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| app.accepts(t));
    let mut resp = if authorized {
        next.run(req).await
    } else {
        let mut r = outcome(
            StatusCode::UNAUTHORIZED,
            "login",
            "send Authorization: Bearer <token> with one of the tokens the service was started with",
        );
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    };
    let status = resp.status().as_u16();
    let secs = started.elapsed().as_secs_f64();
    // Routes are fixed strings: anything else is counted as one, so a scanner cannot grow the map.
    let route = if ["/screen", "/notify", "/trials", "/health", "/metrics", "/openapi.json"].contains(&path.as_str()) || page {
        path.clone()
    } else if path.starts_with("/fhir/Patient/") && path.ends_with("/$screen") {
        "/fhir/Patient/{id}/$screen".to_string()
    } else {
        "other".to_string()
    };
    if let Ok(mut m) = app.metrics.requests.lock() {
        *m.entry((route.clone(), status)).or_default() += 1;
    }
    if let Ok(mut m) = app.metrics.seconds.lock() {
        let e = m.entry(route.clone()).or_default();
        e.0 += secs;
        e.1 += 1;
    }
    tracing::info!(request = id, %method, route = %route, status, ms = (secs * 1000.0).round() as u64, "served");
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Liveness, and whether the FHIR server and the state database answer: 503 when one that is
/// configured does not, so a load balancer or orchestrator can tell.
async fn health(State(app): State<Arc<App>>) -> Response {
    let mut ok = true;
    let fhir = match &app.fhir {
        None => "not configured".to_string(),
        Some(c) => match c.get("metadata").await {
            Ok(_) => "ok".to_string(),
            Err(e) => {
                ok = false;
                format!("not answering: {}", e.brief())
            }
        },
    };
    let database = match app.state.clone() {
        None => "not configured".to_string(),
        // A blocking connect and query, kept off the async workers.
        Some(loc) => match tokio::task::spawn_blocking(move || loc.ping()).await {
            Ok(Ok(said)) => said.to_string(),
            Ok(Err(e)) => {
                ok = false;
                format!("not answering: {e}")
            }
            Err(_) => {
                ok = false;
                "the check itself failed".to_string()
            }
        },
    };
    let body = json!({"status": if ok { "ok" } else { "degraded" }, "trials": app.cfg.trials.len(),
        "version": app.cfg.provenance.version, "fhir_server": fhir, "database": database});
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn trials(State(app): State<Arc<App>>) -> Response {
    let list: Vec<Value> = app
        .cfg
        .trials
        .iter()
        .map(|t| {
            json!({"id": t.id, "title": t.title, "source": t.source,
                "criteria": t.criteria.iter().map(|c| json!({"id": c.id, "kind": c.kind, "text": c.text})).collect::<Vec<_>>()})
        })
        .collect();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Value::Array(list).to_string(),
    )
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP trialgate_http_requests_total HTTP requests by route and status.");
    let _ = writeln!(out, "# TYPE trialgate_http_requests_total counter");
    if let Ok(m) = app.metrics.requests.lock() {
        for ((route, status), n) in m.iter() {
            let _ = writeln!(out, "trialgate_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
    }
    let _ = writeln!(out, "# HELP trialgate_http_request_seconds Time to answer, by route.");
    let _ = writeln!(out, "# TYPE trialgate_http_request_seconds summary");
    if let Ok(m) = app.metrics.seconds.lock() {
        for (route, (sum, count)) in m.iter() {
            let _ = writeln!(out, "trialgate_http_request_seconds_sum{{route=\"{route}\"}} {sum}");
            let _ = writeln!(out, "trialgate_http_request_seconds_count{{route=\"{route}\"}} {count}");
        }
    }
    let _ = writeln!(out, "# HELP trialgate_verdicts_total Verdicts given, by trial and status.");
    let _ = writeln!(out, "# TYPE trialgate_verdicts_total counter");
    if let Ok(m) = app.metrics.verdicts.lock() {
        for ((trial, status), n) in m.iter() {
            let _ = writeln!(out, "trialgate_verdicts_total{{trial=\"{trial}\",status=\"{status}\"}} {n}");
        }
    }
    if let Some(live) = &app.live {
        live_metrics(&mut out, live);
    }
    let p = &crate::pipeline::PROGRESS;
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {v}");
    };
    gauge(
        &mut out,
        "trialgate_sweep_patients_done",
        "Patients screened by the running (or last) sweep in this process.",
        p.patients_done.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "trialgate_sweep_patients_total",
        "Patients in the running (or last) sweep's cohort, when known.",
        p.patients_total.load(Ordering::Relaxed),
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Notifications, re-screens, write-back and the FHIR server's calls, for `/metrics`.
fn live_metrics(out: &mut String, live: &crate::live::Live) {
    use std::fmt::Write;
    let st = &live.stats;
    let _ = writeln!(
        out,
        "# HELP trialgate_notifications_total Subscription notifications received, by type."
    );
    let _ = writeln!(out, "# TYPE trialgate_notifications_total counter");
    if let Ok(m) = st.notifications.lock() {
        for (kind, n) in m.iter() {
            let _ = writeln!(out, "trialgate_notifications_total{{type=\"{kind}\"}} {n}");
        }
    }
    let counters = [
        (
            "trialgate_rescreens_total",
            "Patients screened again from the FHIR server.",
            &st.rescreens,
        ),
        (
            "trialgate_rescreen_failures_total",
            "Re-screens that failed (server or database).",
            &st.rescreen_failures,
        ),
        (
            "trialgate_status_changes_total",
            "Verdicts whose status changed on a re-screen.",
            &st.status_changes,
        ),
        (
            "trialgate_subjects_written_total",
            "ResearchSubjects created or updated by the service.",
            &st.written,
        ),
        (
            "trialgate_notification_gaps_total",
            "Gaps in a Subscription's event numbers, repaired.",
            &st.gaps,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
    let _ = writeln!(
        out,
        "# HELP trialgate_notify_to_written_seconds From a notification's arrival to its status change written back."
    );
    let _ = writeln!(out, "# TYPE trialgate_notify_to_written_seconds summary");
    let _ = writeln!(
        out,
        "trialgate_notify_to_written_seconds_sum {}",
        st.notify_to_written_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "trialgate_notify_to_written_seconds_count {}",
        st.notify_to_written_count.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP trialgate_fhir_requests_total Requests to the FHIR server, by use and outcome."
    );
    let _ = writeln!(out, "# TYPE trialgate_fhir_requests_total counter");
    let mut clients = vec![("read", &live.client)];
    if let Some(w) = &live.writer {
        clients.push(("write", w));
    }
    for (role, c) in clients {
        let s = &c.stats;
        for (outcome, n) in [("sent", &s.requests), ("retried", &s.retries), ("failed", &s.failures)] {
            let _ = writeln!(
                out,
                "trialgate_fhir_requests_total{{use=\"{role}\",outcome=\"{outcome}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

async fn openapi() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// What `/screen` and `$screen` take in their query string.
struct ScreenQuery {
    as_of: Date,
    selected: Vec<String>,
    as_bundle: bool,
    write_back: bool,
}

fn screen_query(app: &App, q: &HashMap<String, String>) -> Result<ScreenQuery, Box<Response>> {
    let as_of = match q.get("as_of") {
        Some(s) => Date::parse(s).ok_or_else(|| {
            Box::new(outcome(
                StatusCode::BAD_REQUEST,
                "value",
                format!("as_of `{s}` is not a date: write YYYY-MM-DD"),
            ))
        })?,
        None => Date::today_utc(),
    };
    let selected: Vec<String> = q
        .get("trial")
        .map(|t| t.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    if let Some(unknown) = selected.iter().find(|id| !app.cfg.trials.iter().any(|t| &t.id == *id)) {
        let known: Vec<&str> = app.cfg.trials.iter().map(|t| t.id.as_str()).collect();
        return Err(Box::new(outcome(
            StatusCode::BAD_REQUEST,
            "not-found",
            format!(
                "unknown trial `{unknown}`; the loaded trials are {} (GET /trials)",
                known.join(", ")
            ),
        )));
    }
    let as_bundle = match q.get("format").map(String::as_str) {
        None | Some("report") => false,
        Some("bundle") => true,
        Some(other) => {
            return Err(Box::new(outcome(
                StatusCode::BAD_REQUEST,
                "value",
                format!("format `{other}`: use report (the JSON report, the default) or bundle (FHIR ResearchSubjects)"),
            )));
        }
    };
    let write_back = match q.get("write_back").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Box::new(outcome(
                StatusCode::BAD_REQUEST,
                "value",
                format!("write_back `{other}`: use true or false"),
            )));
        }
    };
    if write_back && app.live.as_ref().is_none_or(|l| l.writer.is_none()) {
        return Err(Box::new(outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-supported",
            "write_back=true needs a FHIR server to write to: set [server] url and [write_back] enabled = true in the gateway configuration",
        )));
    }
    Ok(ScreenQuery {
        as_of,
        selected,
        as_bundle,
        write_back,
    })
}

/// `POST /screen`: a Bundle, a single resource or NDJSON in; the JSON report of `screen` out,
/// or with `format=bundle` a FHIR Bundle of ResearchStudy and ResearchSubject resources.
/// With `write_back=true` the posted patient is found on the configured server by MRN and
/// its ResearchSubjects written there.
async fn screen(State(app): State<Arc<App>>, Query(q): Query<HashMap<String, String>>, body: Body) -> Response {
    // Waiting for a slot before reading the body keeps at most a few bodies in memory.
    let Ok(_slot) = app.slots.acquire().await else {
        return outcome(StatusCode::SERVICE_UNAVAILABLE, "transient", "the service is shutting down");
    };
    let Ok(bytes) = axum::body::to_bytes(body, app.max_body).await else {
        return too_large(&app);
    };
    let sq = match screen_query(&app, &q) {
        Ok(sq) => sq,
        Err(r) => return *r,
    };
    let work = {
        let app = app.clone();
        let (as_of, want_patients) = (sq.as_of, sq.write_back);
        move || screen_body(&app, &bytes, as_of, want_patients)
    };
    let (mut s, posted) = match tokio::task::spawn_blocking(work).await {
        Ok(Ok(x)) => x,
        Ok(Err(r)) => return *r,
        Err(_) => {
            return outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "the screening failed; see the service log",
            );
        }
    };
    if !sq.selected.is_empty() {
        s.results.retain(|r| sq.selected.contains(&r.trial));
    }
    count_verdicts(&app, &s);
    let mut written = None;
    if sq.write_back {
        match write_posted(&app, s, &posted, sq.as_of).await {
            Ok((back, w)) => {
                s = back;
                written = w;
            }
            Err(r) => return *r,
        }
    }
    on_board(&app, &s);
    respond(&app, &s, sq.as_of, sq.as_bundle, written.as_ref())
}

fn too_large(app: &App) -> Response {
    outcome(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-long",
        format!(
            "the body is larger than {} bytes: post one patient's data, or raise [serve] max_body_mb",
            app.max_body
        ),
    )
}

/// Puts the verdicts on the page's board, as of the date they were screened.
fn on_board(app: &App, s: &crate::Screening) {
    app.console.board.record(&s.results, s.as_of, crate::time::Instant::now());
}

fn count_verdicts(app: &App, s: &crate::Screening) {
    if let Ok(mut m) = app.metrics.verdicts.lock() {
        for r in &s.results {
            *m.entry((r.trial.clone(), r.status.as_str())).or_default() += 1;
        }
    }
}

/// Reads and screens a posted body; with `want_patients`, also returns its Patient resources
/// (write-back needs their identifiers; a second parse of the body is not paid otherwise).
fn screen_body(app: &App, bytes: &[u8], as_of: Date, want_patients: bool) -> Result<(crate::Screening, Vec<Value>), Box<Response>> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(Box::new(outcome(
            StatusCode::BAD_REQUEST,
            "structure",
            "the body is not UTF-8 text: post FHIR JSON",
        )));
    };
    let text = text.trim_start_matches('\u{feff}');
    if text.trim().is_empty() {
        return Err(Box::new(outcome(
            StatusCode::BAD_REQUEST,
            "required",
            "the body is empty: post a FHIR Bundle (or NDJSON) holding a Patient",
        )));
    }
    let mut read = crate::fhir::files::ReadOutput::default();
    crate::fhir::files::read_text("request body", text, false, crate::read_options(&app.cfg), &mut read);
    if read.resources.is_empty() {
        let why = read
            .issues
            .first()
            .map(|i| format!("{}: {}", i.location, i.message))
            .unwrap_or_else(|| "it holds no resource trialgate reads".into());
        return Err(Box::new(outcome(
            StatusCode::BAD_REQUEST,
            "structure",
            format!("the body cannot be screened: {why}"),
        )));
    }
    if !read
        .resources
        .iter()
        .any(|p| matches!(p.resource, crate::fhir::Resource::Patient(_)))
    {
        return Err(Box::new(outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "required",
            "the posted data holds no Patient: include the Patient resource the other resources refer to",
        )));
    }
    let input = SourceFile {
        kind: "request",
        path: "POST /screen".into(),
        sha256: None,
        bytes: Some(bytes.len() as u64),
    };
    // Full detail: the page and the JSON answer show the reasons and evidence.
    let s = crate::screen_read(
        read,
        vec![input],
        &app.cfg,
        as_of,
        &Decisions::default(),
        crate::criteria::Detail::Full,
    );
    let patients = if want_patients {
        crate::live::posted_patients(text)
    } else {
        Vec::new()
    };
    Ok((s, patients))
}

/// Finds the posted patient on the configured server by MRN, points the verdicts at that
/// Patient, and writes them: never a ResearchSubject for a patient the server does not have.
async fn write_posted(
    app: &App,
    mut s: crate::Screening,
    posted: &[Value],
    as_of: Date,
) -> Result<(crate::Screening, Option<crate::writeback::WriteSummary>), Box<Response>> {
    let Some(live) = &app.live else {
        return Err(Box::new(outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-supported",
            "no FHIR server is configured",
        )));
    };
    let [patient] = posted else {
        return Err(Box::new(outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            format!(
                "write_back=true takes one patient at a time; this body holds {} Patient resources",
                posted.len()
            ),
        )));
    };
    let mrns = crate::live::mrns(patient);
    if mrns.is_empty() {
        return Err(Box::new(outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "required",
            "the posted Patient has no MRN (an identifier whose type is MR, http://terminology.hl7.org/CodeSystem/v2-0203), so it cannot be matched to the server's Patient: nothing was written",
        )));
    }
    let mut found = None;
    for (system, value) in &mrns {
        match live.resolve_mrn(system.as_deref(), value).await {
            Ok(crate::live::Resolved::One(id)) => {
                found = Some(id);
                break;
            }
            Ok(crate::live::Resolved::Many(n)) => {
                return Err(Box::new(outcome(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "multiple-matches",
                    format!(
                        "{n} Patients on the server share the posted MRN (system {}): not written; merge or fix them first",
                        system.as_deref().unwrap_or("not given")
                    ),
                )));
            }
            Ok(crate::live::Resolved::None) => {}
            Err(e) => {
                tracing::warn!("finding a posted patient by MRN failed: {}", crate::live::brief(&e));
                return Err(Box::new(outcome(
                    StatusCode::BAD_GATEWAY,
                    "transient",
                    format!("the FHIR server could not be searched by MRN: {}", crate::live::brief(&e)),
                )));
            }
        }
    }
    let Some(id) = found else {
        let systems: Vec<&str> = mrns.iter().map(|(s, _)| s.as_deref().unwrap_or("no system")).collect();
        return Err(Box::new(outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-found",
            format!(
                "no Patient on the server has the posted MRN ({}): nothing was written, so no ResearchSubject points nowhere",
                systems.join(", ")
            ),
        )));
    };
    let reference = format!("Patient/{id}");
    for r in &mut s.results {
        r.patient = reference.clone();
    }
    match live.record_and_write(&app.cfg, s, as_of, "screen", true).await {
        Ok(r) => Ok((r.screening, r.written)),
        Err(e) => {
            tracing::warn!("write-back after POST /screen failed: {}", crate::live::brief(&e));
            Err(Box::new(outcome(
                StatusCode::BAD_GATEWAY,
                "transient",
                format!("the verdicts could not be written back: {}", crate::live::brief(&e)),
            )))
        }
    }
}

/// The answer to a screening: the JSON report (with what write-back did), or a Bundle.
fn respond(app: &App, s: &crate::Screening, as_of: Date, as_bundle: bool, written: Option<&crate::writeback::WriteSummary>) -> Response {
    if !as_bundle {
        let report = crate::report::json(s);
        let Some(w) = written else {
            return fhir_json_report(report);
        };
        let mut v: Value = serde_json::from_str(&report).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "write_back".into(),
                json!({"created": w.created, "updated": w.updated, "unchanged": w.unchanged,
                    "left_alone": w.left_alone, "not_written": w.not_written,
                    "refused": w.failed.iter().map(|(id, why)| json!({"subject": id, "reason": why})).collect::<Vec<_>>()}),
            );
        }
        return fhir_json_report(v.to_string());
    }
    let mut entries = Vec::new();
    for t in app.cfg.trials.iter().filter(|t| s.results.iter().any(|r| r.trial == t.id)) {
        let mut study = crate::writeback::research_study(t);
        study["id"] = json!(t.id);
        entries.push(json!({"fullUrl": format!("ResearchStudy/{}", t.id), "resource": study}));
    }
    for r in &s.results {
        let (Some(t), Some(status)) = (
            app.cfg.trials.iter().find(|t| t.id == r.trial),
            crate::writeback::r4_status(r.status),
        ) else {
            continue;
        };
        entries.push(json!({"resource": crate::writeback::research_subject(t, &t.id, r, status, as_of, None)}));
    }
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
    fhir_json(StatusCode::OK, bundle.to_string())
}

/// `POST /fhir/Patient/{id}/$screen`: reads the patient from the configured FHIR server and
/// screens them, as a sweep of that one patient would; `write_back=true` writes the changed
/// verdicts back.
async fn screen_operation(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(live) = app.live.clone() else {
        return outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-supported",
            "$screen reads the patient from the FHIR server: set [server] url in the gateway configuration",
        );
    };
    let sq = match screen_query(&app, &q) {
        Ok(sq) => sq,
        Err(r) => return *r,
    };
    let valid = !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !valid {
        return outcome(
            StatusCode::BAD_REQUEST,
            "value",
            "a Patient id is 1 to 64 letters, digits, '-' and '.'",
        );
    }
    let Ok(_slot) = app.slots.acquire().await else {
        return outcome(StatusCode::SERVICE_UNAVAILABLE, "transient", "the service is shutting down");
    };
    match live
        .rescreen(&app.cfg, vec![id.clone()], sq.as_of, "$screen", sq.write_back, &sq.selected)
        .await
    {
        Ok(r) => {
            let mut s = r.screening;
            if !s.results.is_empty() && s.results.iter().all(|r| r.status == crate::criteria::Status::Error) {
                let why = s.results.first().and_then(|r| r.record.clone()).unwrap_or_default();
                let (status, code) = if why.contains("no Patient resource") {
                    (StatusCode::NOT_FOUND, "not-found")
                } else {
                    (StatusCode::BAD_GATEWAY, "transient")
                };
                return outcome(status, code, format!("Patient/{id} could not be screened: {why}"));
            }
            if !sq.selected.is_empty() {
                s.results.retain(|r| sq.selected.contains(&r.trial));
            }
            count_verdicts(&app, &s);
            on_board(&app, &s);
            respond(&app, &s, sq.as_of, sq.as_bundle, r.written.as_ref())
        }
        Err(e) => {
            tracing::warn!("$screen failed: {}", crate::live::brief(&e));
            outcome(
                StatusCode::BAD_GATEWAY,
                "transient",
                format!("the patient could not be read or written: {}", crate::live::brief(&e)),
            )
        }
    }
}

/// `POST /notify`: a FHIR Subscription rest-hook (R4 Backport, R4B or R5 shape). Handshakes
/// and heartbeats are acknowledged; an event has its patients screened again in the
/// background (the sender is answered at once), and a gap in the event numbers is repaired.
async fn notify(State(app): State<Arc<App>>, body: Body) -> Response {
    let received = std::time::Instant::now();
    let Ok(bytes) = axum::body::to_bytes(body, app.max_body).await else {
        return too_large(&app);
    };
    let n = match crate::notify::parse(&bytes) {
        Ok(n) => n,
        Err(e) => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "structure",
                format!("not a subscription notification: {e}"),
            );
        }
    };
    use crate::notify::Kind;
    let Some(live) = app.live.clone() else {
        if matches!(n.kind, Kind::Handshake | Kind::Heartbeat | Kind::QueryStatus) {
            return info(format!("{} acknowledged", n.kind.as_str()));
        }
        return outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-supported",
            "notifications need the FHIR server the changed records are read from: set [server] url in the gateway configuration",
        );
    };
    let gap = live.note(&n);
    if matches!(n.kind, Kind::Handshake | Kind::QueryStatus) {
        return info(format!("{} acknowledged", n.kind.as_str()));
    }
    let (events, kind) = (n.events.len(), n.kind);
    let task_app = app.clone();
    let working = live.begin();
    tokio::spawn(async move {
        let _working = working;
        let cfg = &task_app.cfg;
        let mut patients = std::collections::BTreeSet::new();
        if let Some((sub, from, to)) = gap {
            tracing::warn!(from, to, "notification events were missed: asking the server for them");
            match live.repair(cfg, &sub, from, to).await {
                Ok(p) => patients.extend(p),
                Err(e) => tracing::warn!("repairing missed notifications failed: {}", crate::live::brief(&e)),
            }
        }
        if matches!(n.kind, Kind::EventNotification | Kind::QueryEvent) {
            match live.patients_of(cfg, &n).await {
                Ok(p) => patients.extend(p),
                Err(e) => tracing::warn!("reading what a notification names failed: {}", crate::live::brief(&e)),
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for p in patients {
            let (live, app) = (live.clone(), task_app.clone());
            tasks.spawn(async move { live.rescreen_serially(&app.cfg, p, received).await });
        }
        while tasks.join_next().await.is_some() {}
    });
    info(format!(
        "{} accepted: {events} event(s); the patients are screened again now",
        kind.as_str()
    ))
}

/// A 200 with an informational OperationOutcome.
fn info(message: String) -> Response {
    let body = json!({"resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": message}]});
    fhir_json(StatusCode::OK, body.to_string())
}

fn fhir_json_report(body: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn not_found() -> Response {
    outcome(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such route: POST /screen, GET /trials, /health, /metrics, /openapi.json, / (the coordinator's page)",
    )
}

async fn wrong_method() -> Response {
    outcome(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        "wrong method for this route: POST /screen, /notify, /fhir/Patient/{id}/$screen; GET /trials, /health, /metrics, /openapi.json",
    )
}

/// The routes, with authentication, logging and metrics.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/screen", post(screen))
        .route("/fhir/Patient/{id}/$screen", post(screen_operation))
        .route("/notify", post(notify))
        .route("/trials", get(trials))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(crate::console::index).fallback(crate::console::wrong_method))
        .route(
            "/login",
            get(crate::console::login_form)
                .post(crate::console::login)
                .fallback(crate::console::wrong_method),
        )
        .route("/logout", post(crate::console::logout).fallback(crate::console::wrong_method))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(app.clone(), track))
        // The body limit is applied by the handler, which answers with an OperationOutcome.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(app)
}

/// Serves until Ctrl-C or SIGTERM, then lets requests in flight finish, and the
/// notifications already accepted be screened and written (up to 30 s).
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<App>) -> std::io::Result<()> {
    let live = app.live.clone();
    axum::serve(listener, router(app)).with_graceful_shutdown(shutdown()).await?;
    drain(live).await;
    Ok(())
}

async fn drain(live: Option<Arc<crate::live::Live>>) {
    if let Some(live) = live {
        let left = live.drain(std::time::Duration::from_secs(30)).await;
        if left > 0 {
            tracing::warn!(
                left,
                "stopping with notifications still being worked on; a sweep will catch them up"
            );
        }
    }
}

/// The server's certificate chain and key (PEM files), for HTTPS.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("[serve] tls_cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("[serve] tls_cert {}: no PEM certificate in it", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("[serve] tls_key {}: {e}", key.display()))?;
    // The provider named, not the process default: two linked providers would make that panic.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("[serve] tls_cert and tls_key do not make a usable pair: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Connections whose TLS handshake is done. Handshakes run in tasks of their own (with a
/// time limit), so a client that stalls in one holds up nobody else.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task is gone (its socket failed): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// As `serve`, over HTTPS.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (tx, ready) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as axum's own loop does.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    let live = app.live.clone();
    axum::serve(TlsListener { ready, local }, router(app))
        .with_graceful_shutdown(shutdown())
        .await?;
    drain(live).await;
    Ok(())
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing the requests in flight");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_is_exact() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }
}
