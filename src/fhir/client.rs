//! FHIR REST reads: the one place trialgate talks to a FHIR server.
//!
//! Real servers time out, throttle (429), fail (5xx), reset connections and now and then send
//! a truncated body. Every GET here therefore has connect and read timeouts and is retried
//! with exponential backoff and full jitter on connection errors, 429, 5xx (not 501 or 505) and unreadable
//! bodies, honouring `Retry-After`, under a per-request limit and a budget shared by the whole
//! run (a server that is down must not be hammered for hours). When a request still fails, the
//! error carries the server's OperationOutcome in its own words.

use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Whether an error status may pass if asked again: throttling and server errors, except the
/// two that say the server cannot do this at all (501 Not Implemented, 505 HTTP Version Not
/// Supported): retrying those only waits out the backoff (a server that cannot DELETE a
/// finished export answered 501 five times).
fn transient(status: reqwest::StatusCode) -> bool {
    status.as_u16() == 429 || (status.is_server_error() && !matches!(status.as_u16(), 501 | 505))
}

#[derive(Clone)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Retries of one request after its first attempt.
    pub max_retries: u32,
    /// Retries allowed over the whole run.
    pub retry_budget: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// A bearer token sent as `Authorization: Bearer ...`; never logged.
    pub bearer: Option<String>,
    /// SMART Backend Services: tokens are requested, cached and refreshed as needed.
    pub smart: Option<super::smart::SmartClient>,
}

// By hand, so that no `{:?}` can print the token.
impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_budget", &self.retry_budget)
            .field("bearer", &self.bearer.as_ref().map(|_| "(redacted)"))
            .field("smart", &self.smart)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            max_retries: 5,
            retry_budget: 500,
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            bearer: None,
            smart: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: HTTP {status}: {message}")]
    Status { url: String, status: u16, message: String },
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: the response is not a FHIR JSON resource: {message}")]
    Body { url: String, message: String },
    #[error("{url}: not retried: the run's retry budget of {budget} is spent")]
    Budget { url: String, budget: u32 },
    #[error("invalid server URL `{0}`")]
    BadUrl(String),
}

impl ClientError {
    /// The fault without the URL (whose query may name patients), for logs.
    pub fn brief(&self) -> String {
        match self {
            ClientError::Status { status, .. } => format!("HTTP {status}"),
            ClientError::Transport { message, .. } | ClientError::Body { message, .. } => message.chars().take(200).collect(),
            ClientError::Budget { budget, .. } => format!("retry budget of {budget} spent"),
            ClientError::BadUrl(_) => "invalid URL".into(),
        }
    }
}

/// Requests made, for the run summary.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub failures: AtomicU64,
}

#[derive(Clone)]
pub struct FhirClient {
    http: reqwest::Client,
    base: String,
    opts: ClientOptions,
    budget_left: Arc<AtomicU32>,
    token: Arc<tokio::sync::Mutex<Option<super::smart::CachedToken>>>,
    pub stats: Arc<Stats>,
}

#[derive(Deserialize)]
struct OperationOutcome {
    #[serde(default)]
    issue: Vec<OutcomeIssue>,
}

#[derive(Deserialize)]
struct OutcomeIssue {
    severity: Option<String>,
    code: Option<String>,
    diagnostics: Option<String>,
    details: Option<super::model::CodeableConcept>,
}

/// The issues of an OperationOutcome body, in the server's words; None if it is not one.
pub fn outcome_text(body: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "resourceType")]
        rt: Option<String>,
    }
    if serde_json::from_str::<Peek>(body).ok()?.rt.as_deref() != Some("OperationOutcome") {
        return None;
    }
    let oo: OperationOutcome = serde_json::from_str(body).ok()?;
    let parts: Vec<String> = oo
        .issue
        .iter()
        .map(|i| {
            let text = i
                .diagnostics
                .clone()
                .or_else(|| i.details.as_ref().and_then(|d| d.text.clone()))
                .unwrap_or_else(|| "no details".into());
            format!(
                "{} ({}): {text}",
                i.severity.as_deref().unwrap_or("error"),
                i.code.as_deref().unwrap_or("?")
            )
        })
        .collect();
    Some(if parts.is_empty() {
        "OperationOutcome without issues".into()
    } else {
        parts.join("; ")
    })
}

/// Seconds from a `Retry-After` header (delta-seconds form; an HTTP date falls back to backoff).
fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let v = resp.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A number in [0, 1) that differs from call to call, for jitter. Retry timing needs spread,
/// not unpredictability, so the clock's nanoseconds through a mixer are enough.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut x = u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    (x % 1_000_000) as f64 / 1_000_000.0
}

/// A request as sent (and re-sent on retry).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: reqwest::Method,
    pub url: String,
    pub body: Option<String>,
    pub headers: Vec<(&'static str, String)>,
    /// The answer must be a FHIR resource (false for Bulk Data's status and manifest, which
    /// may be empty or plain JSON).
    pub fhir: bool,
}

impl Request {
    pub fn get(url: String) -> Request {
        Request {
            method: reqwest::Method::GET,
            url,
            body: None,
            headers: Vec::new(),
            fhir: true,
        }
    }
}

/// A successful response: its status, the headers write-back and Bulk Data need, and the body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub location: Option<String>,
    pub content_location: Option<String>,
    pub etag: Option<String>,
    pub retry_after: Option<Duration>,
    /// Bulk Data's `X-Progress`, shown to the user as the server wrote it.
    pub progress: Option<String>,
    pub body: String,
}

impl Response {
    /// The id of the resource a create or update answered with: from the body when the
    /// server returns it, else from the `Location` header.
    pub fn resource_id(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Id {
            id: Option<String>,
        }
        let from_body = serde_json::from_str::<Id>(&self.body).ok().and_then(|i| i.id);
        from_body.or_else(|| {
            let l = self.location.as_deref()?.split("/_history/").next()?;
            l.rsplit('/').next().map(str::to_string)
        })
    }
}

enum Attempt {
    Done(Response),
    Retry { error: ClientError, wait: Option<Duration> },
    Fail(ClientError),
}

impl FhirClient {
    pub fn new(base: &str, opts: ClientOptions) -> Result<FhirClient, ClientError> {
        let base = base.trim().trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl(base));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .user_agent(concat!("trialgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Transport {
                url: base.clone(),
                message: e.to_string(),
            })?;
        Ok(FhirClient {
            http,
            budget_left: Arc::new(AtomicU32::new(opts.retry_budget)),
            token: Arc::default(),
            opts,
            base,
            stats: Arc::default(),
        })
    }

    /// A transport error in words a person can act on: reqwest's own message names only the
    /// URL, the cause is in its source chain.
    fn describe(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("timed out: no answer within {} s", self.opts.read_timeout.as_secs_f64());
        }
        // reqwest's own text only repeats the URL ("error sending request for url (...)"), which
        // the error already names: the causes are what a person needs.
        let mut parts = Vec::new();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            parts.push(s.to_string());
            source = s.source();
        }
        if parts.is_empty() { e.to_string() } else { parts.join(": ") }
    }

    /// A SMART access token: the cached one while fresh, else a new one from the token
    /// endpoint. Errors never include the assertion or the token.
    async fn smart_token(&self) -> Result<String, ClientError> {
        let Some(smart) = &self.opts.smart else {
            return Err(ClientError::BadUrl("no SMART client configured".into()));
        };
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| t.fresh()) {
            return Ok(t.token.clone());
        }
        let endpoint = match &smart.token_endpoint {
            Some(e) => e.clone(),
            None => {
                let url = self.url(".well-known/smart-configuration");
                let body = self
                    .plain(self.http.get(&url).header(reqwest::header::ACCEPT, "application/json"), &url)
                    .await?;
                serde_json::from_str::<super::smart::SmartConfiguration>(&body)
                    .map_err(|e| ClientError::Body {
                        url: url.clone(),
                        message: format!("no token_endpoint: {e}"),
                    })?
                    .token_endpoint
            }
        };
        let form = smart.token_request(&endpoint).map_err(|e| ClientError::Transport {
            url: endpoint.clone(),
            message: e.to_string(),
        })?;
        let req = self
            .http
            .post(&endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form);
        let body = self.plain(req, &endpoint).await?;
        let token: super::smart::TokenResponse = serde_json::from_str(&body).map_err(|_| ClientError::Body {
            url: endpoint.clone(),
            message: "the token response holds no access_token".into(),
        })?;
        tracing::info!(expires_in = token.expires_in, "obtained a SMART access token");
        let t = super::smart::CachedToken::new(token);
        let out = t.token.clone();
        *cached = Some(t);
        Ok(out)
    }

    /// A non-FHIR JSON exchange (SMART discovery, the token endpoint): the body on success, the
    /// server's `error`/`error_description` (never the request) on failure.
    async fn plain(&self, req: reqwest::RequestBuilder, url: &str) -> Result<String, ClientError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let resp = req.send().await.map_err(|e| ClientError::Transport {
            url: url.into(),
            message: self.describe(&e),
        })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| ClientError::Transport {
            url: url.into(),
            message: self.describe(&e),
        })?;
        if status.is_success() {
            return Ok(body);
        }
        #[derive(Deserialize)]
        struct OAuthError {
            error: Option<String>,
            error_description: Option<String>,
        }
        let message = serde_json::from_str::<OAuthError>(&body)
            .ok()
            .map(|e| {
                format!("{} {}", e.error.unwrap_or_default(), e.error_description.unwrap_or_default())
                    .trim()
                    .to_string()
            })
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
        Err(ClientError::Status {
            url: url.into(),
            status: status.as_u16(),
            message,
        })
    }

    /// The same client (connection pool, token cache) counting its requests apart, so that a
    /// sweep can report reads and writes separately when both go to one server.
    pub fn counted_apart(&self) -> FhirClient {
        FhirClient {
            stats: Arc::new(Stats::default()),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// An absolute URL for a path relative to the base (`Patient?_count=10`), or the URL itself.
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else if path_or_url.is_empty() {
            self.base.clone() // a batch or transaction Bundle goes to the base itself
        } else {
            format!("{}/{}", self.base, path_or_url.trim_start_matches('/'))
        }
    }

    async fn attempt(&self, r: &Request) -> Attempt {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let url = r.url.as_str();
        let mut req = self
            .http
            .request(r.method.clone(), url)
            .header(reqwest::header::ACCEPT, "application/fhir+json");
        for (k, v) in &r.headers {
            req = req.header(*k, v);
        }
        if let Some(b) = &r.body {
            // A search sent as a form names its own type; everything else written is FHIR JSON.
            if !r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
                req = req.header(reqwest::header::CONTENT_TYPE, "application/fhir+json");
            }
            req = req.body(b.clone());
        }
        if let Some(t) = &self.opts.bearer {
            req = req.bearer_auth(t);
        }
        if self.opts.smart.is_some() {
            match self.smart_token().await {
                Ok(t) => req = req.bearer_auth(t),
                // A refused client (4xx: wrong id, key or scope) will not get better by retrying.
                Err(error @ ClientError::Status { status: 400..=499, .. }) => return Attempt::Fail(error),
                Err(error) => return Attempt::Retry { error, wait: None },
            }
        }
        let resp = match req.send().await {
            Ok(r) => r,
            // Connection refused or reset, timeouts: transient by nature.
            Err(e) => {
                return Attempt::Retry {
                    error: ClientError::Transport {
                        url: url.into(),
                        message: self.describe(&e),
                    },
                    wait: None,
                };
            }
        };
        let status = resp.status();
        let wait = retry_after(&resp);
        let header = |name: reqwest::header::HeaderName| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (location, etag) = (header(reqwest::header::LOCATION), header(reqwest::header::ETAG));
        let content_location = header(reqwest::header::CONTENT_LOCATION);
        let progress = header(reqwest::header::HeaderName::from_static("x-progress"));
        let body = match resp.text().await {
            Ok(b) => b,
            Err(e) => {
                return Attempt::Retry {
                    error: ClientError::Transport {
                        url: url.into(),
                        message: self.describe(&e),
                    },
                    wait,
                };
            }
        };
        if !status.is_success() {
            let message = outcome_text(&body).unwrap_or_else(|| {
                let snippet: String = body.chars().take(200).collect();
                format!("{} {}", status.canonical_reason().unwrap_or(""), snippet.trim())
                    .trim()
                    .to_string()
            });
            let error = ClientError::Status {
                url: url.into(),
                status: status.as_u16(),
                message,
            };
            // An expired or revoked SMART token: drop it, so the retry fetches a new one.
            if status.as_u16() == 401 && self.opts.smart.is_some() {
                *self.token.lock().await = None;
                return Attempt::Retry { error, wait: None };
            }
            return if transient(status) {
                Attempt::Retry { error, wait }
            } else {
                Attempt::Fail(error)
            };
        }
        // A truncated or garbled body is usually a dropped connection: worth another try.
        #[derive(Deserialize)]
        struct Peek {
            #[serde(rename = "resourceType")]
            rt: Option<String>,
        }
        let done = |body: String| {
            Attempt::Done(Response {
                status: status.as_u16(),
                location,
                content_location,
                etag,
                retry_after: wait,
                progress,
                body,
            })
        };
        // A write answered with `return=minimal` has no body at all, which is fine.
        if !r.fhir || (r.method != reqwest::Method::GET && body.trim().is_empty()) {
            return done(body);
        }
        match serde_json::from_str::<Peek>(&body) {
            Ok(Peek { rt: Some(rt) }) if rt == "OperationOutcome" => Attempt::Fail(ClientError::Body {
                url: url.into(),
                message: format!(
                    "the server answered with an OperationOutcome: {}",
                    outcome_text(&body).unwrap_or_default()
                ),
            }),
            Ok(Peek { rt: Some(_) }) => done(body),
            Ok(Peek { rt: None }) => Attempt::Fail(ClientError::Body {
                url: url.into(),
                message: "JSON without a resourceType".into(),
            }),
            Err(e) => Attempt::Retry {
                error: ClientError::Body {
                    url: url.into(),
                    message: e.to_string(),
                },
                wait: None,
            },
        }
    }

    /// GETs one URL (absolute, or relative to the base) and returns its body, a FHIR resource.
    pub async fn get(&self, path_or_url: &str) -> Result<String, ClientError> {
        Ok(self.send(&Request::get(self.url(path_or_url))).await?.body)
    }

    /// POSTs a resource (a conditional create, a batch Bundle). Only idempotent writes are
    /// sent this way (conditional creates, batches of conditional operations), which is what
    /// makes retrying them safe.
    pub async fn post(&self, path_or_url: &str, body: String, headers: Vec<(&'static str, String)>) -> Result<Response, ClientError> {
        let req = Request {
            method: reqwest::Method::POST,
            url: self.url(path_or_url),
            body: Some(body),
            headers,
            fhir: true,
        };
        self.send(&req).await
    }

    /// Sends a request, retrying what is worth retrying.
    pub async fn send(&self, req: &Request) -> Result<Response, ClientError> {
        let mut retries = 0u32;
        loop {
            match self.attempt(req).await {
                Attempt::Done(r) => return Ok(r),
                Attempt::Fail(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
                Attempt::Retry { error, wait } => self.backoff(&req.url, &mut retries, error, wait).await?,
            }
        }
    }

    /// Waits before retry number `retries + 1`, or gives the error back when the request's
    /// retries or the run's budget are spent.
    async fn backoff(&self, url: &str, retries: &mut u32, error: ClientError, wait: Option<Duration>) -> Result<(), ClientError> {
        if *retries >= self.opts.max_retries {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            return Err(error);
        }
        let spent = self
            .budget_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1));
        if spent.is_err() {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(fault = %error.brief(), "retry budget spent");
            return Err(ClientError::Budget {
                url: url.to_string(),
                budget: self.opts.retry_budget,
            });
        }
        // Full jitter over an exponential ceiling, unless the server said how long to wait.
        let ceiling = self
            .opts
            .base_backoff
            .saturating_mul(1u32 << (*retries).min(16))
            .min(self.opts.max_backoff);
        let pause = wait
            .map(|w| w.min(self.opts.max_backoff.max(w.min(Duration::from_secs(300)))))
            .unwrap_or_else(|| ceiling.mul_f64(jitter()));
        *retries += 1;
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        // The query names patients (`patient=a,b`): the log gets the path and the kind of fault.
        let path = url.split('?').next().unwrap_or(url);
        tracing::info!(path, fault = %error.brief(), retry = *retries, wait_ms = pause.as_millis() as u64, "retrying");
        tokio::time::sleep(pause).await;
        Ok(())
    }

    /// Downloads `url` into `path` as it arrives, never holding the whole body: Bulk Data
    /// files run to gigabytes. `auth` sends the access token (a manifest says whether its
    /// files need it; a pre-signed storage URL must not get it). A download cut off is
    /// started again from the beginning, within the usual retries.
    pub async fn download(&self, url: &str, path: &std::path::Path, auth: bool) -> Result<u64, ClientError> {
        use std::io::Write;
        let mut retries = 0u32;
        let full = url;
        // A pre-signed storage URL carries its credential in the query: errors and logs get
        // the URL without it.
        let url = url.split('?').next().unwrap_or(url);
        loop {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = self.http.get(full).header(reqwest::header::ACCEPT, "application/fhir+ndjson");
            if auth {
                if let Some(t) = &self.opts.bearer {
                    req = req.bearer_auth(t);
                }
                if self.opts.smart.is_some() {
                    req = req.bearer_auth(self.smart_token().await?);
                }
            }
            let transport = |e: &reqwest::Error| ClientError::Transport {
                url: url.to_string(),
                message: self.describe(e),
            };
            let mut resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    self.backoff(url, &mut retries, transport(&e), None).await?;
                    continue;
                }
            };
            let status = resp.status();
            if !status.is_success() {
                let wait = retry_after(&resp);
                let body = resp.text().await.unwrap_or_default();
                let error = ClientError::Status {
                    url: url.to_string(),
                    status: status.as_u16(),
                    message: outcome_text(&body).unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string()),
                };
                if transient(status) {
                    self.backoff(url, &mut retries, error, wait).await?;
                    continue;
                }
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                return Err(error);
            }
            let io = |e: std::io::Error| ClientError::Transport {
                url: url.to_string(),
                message: format!("writing {}: {e}", path.display()),
            };
            let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
            let mut written = 0u64;
            let cut = loop {
                match resp.chunk().await {
                    Ok(Some(bytes)) => {
                        file.write_all(&bytes).map_err(io)?;
                        written += bytes.len() as u64;
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(transport(&e)),
                }
            };
            match cut {
                None => {
                    file.flush().map_err(io)?;
                    return Ok(written);
                }
                Some(error) => self.backoff(url, &mut retries, error, None).await?,
            }
        }
    }

    /// Every page of a search, following `Bundle.link[relation=next]` to the end.
    pub async fn search(&self, path_or_url: &str) -> Result<Vec<String>, ClientError> {
        let mut pages = Vec::new();
        self.search_each(path_or_url, |_, body| {
            pages.push(body);
            Ok(true)
        })
        .await?;
        Ok(pages)
    }

    /// The same search, its pages handed to `each` (with their URL) one at a time as they
    /// come, none kept: for results too many to hold. `each` returns false to stop following.
    pub async fn search_each(
        &self,
        path_or_url: &str,
        each: impl FnMut(&str, String) -> Result<bool, ClientError>,
    ) -> Result<(), ClientError> {
        let url = self.url(path_or_url);
        let first = self.get(&url).await?;
        self.follow(url, first, each).await
    }

    /// The same search sent as `POST [type]/_search` with a form body, for queries too long
    /// for a URL (many patients times many codes); the next pages are followed by GET, as the
    /// server links them.
    pub async fn search_post(&self, kind: &str, query: &str) -> Result<Vec<String>, ClientError> {
        let req = Request {
            method: reqwest::Method::POST,
            url: self.url(&format!("{kind}/_search")),
            body: Some(query.to_string()),
            headers: vec![("content-type", "application/x-www-form-urlencoded".to_string())],
            fhir: true,
        };
        let first = self.send(&req).await?.body;
        let mut pages = Vec::new();
        self.follow(req.url, first, |_, body| {
            pages.push(body);
            Ok(true)
        })
        .await?;
        Ok(pages)
    }

    async fn follow(
        &self,
        first_url: String,
        first: String,
        mut each: impl FnMut(&str, String) -> Result<bool, ClientError>,
    ) -> Result<(), ClientError> {
        #[derive(Deserialize)]
        struct Link {
            relation: Option<String>,
            url: Option<String>,
        }
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            link: Vec<Link>,
        }
        let mut seen = std::collections::HashSet::new();
        let (mut url, mut body) = (first_url, first);
        loop {
            seen.insert(url.clone());
            let page: Page = serde_json::from_str(&body).map_err(|e| ClientError::Body {
                url: url.clone(),
                message: e.to_string(),
            })?;
            let next = page
                .link
                .into_iter()
                .find(|l| l.relation.as_deref() == Some("next"))
                .and_then(|l| l.url)
                .map(|u| self.url(&u));
            if !each(&url, body)? {
                return Ok(());
            }
            let Some(next) = next else { return Ok(()) };
            // A server that links a page to itself must not keep us here forever.
            if seen.contains(&next) {
                return Err(ClientError::Body {
                    url: next,
                    message: "the next link points back to a page already read".into(),
                });
            }
            body = self.get(&next).await?;
            url = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_outcomes_are_shown_in_the_servers_words() {
        let body = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"Unknown search parameter 'patinet'"}]}"#;
        assert_eq!(
            outcome_text(body).as_deref(),
            Some("error (invalid): Unknown search parameter 'patinet'")
        );
        assert_eq!(outcome_text(r#"{"resourceType":"Patient"}"#), None);
        assert_eq!(outcome_text("<html>"), None);
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
