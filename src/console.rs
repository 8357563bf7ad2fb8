//! The coordinator's page as served: `GET /` renders the board (`board.rs`) with the same
//! renderer as `screen --format html`; `POST /login` and `POST /logout` sign staff in and out.
//!
//! Sign-in exchanges one of the API tokens, sent in a form body (never a URL), for a random
//! session id in an `HttpOnly; SameSite=Strict` cookie that expires; or, when
//! `[serve] trusted_user_header` is set, a request carrying that header (set by an
//! authenticating reverse proxy) is signed in as its user. A session opens the page routes
//! only: the API keeps its bearer tokens (`serve::track`). These routes answer HTML, not
//! OperationOutcomes, and show no patient data before sign-in. Nothing here logs a name, an
//! MRN, a token or a session id.

use crate::board::Board;
use crate::serve::App;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The routes this module answers, which `serve::track` leaves to it to authenticate.
pub const PAGE_ROUTES: &[&str] = &["/", "/login", "/logout"];

const COOKIE: &str = "trialgate_session";
/// Sessions at once; past it, the one closest to expiry is ended. A bound on memory whatever
/// the number of sign-ins.
const MAX_SESSIONS: usize = 10_000;
/// A login form is a few hundred bytes.
const MAX_FORM: usize = 8 << 10;

/// How the page is served: from `[serve]` and `[server] url`.
#[derive(Debug, Clone)]
pub struct PageOptions {
    /// How long a session lasts from sign-in.
    pub session_ttl: Duration,
    /// A header an authenticating reverse proxy sets to the signed-in user (`X-Forwarded-User`).
    pub trusted_user_header: Option<axum::http::HeaderName>,
    /// Adds `Secure` to the session cookie: set when the service itself speaks TLS.
    pub secure_cookies: bool,
    /// The FHIR server's base URL, to link evidence to its resources.
    pub link_base: Option<String>,
    /// Rows the board keeps at most.
    pub board_rows: usize,
}

impl Default for PageOptions {
    fn default() -> Self {
        PageOptions {
            session_ttl: Duration::from_secs(8 * 3600),
            trusted_user_header: None,
            secure_cookies: false,
            link_base: None,
            board_rows: 20_000,
        }
    }
}

/// The page's state inside `App`: the board, the sessions, the options.
pub struct Console {
    pub board: Board,
    pub options: PageOptions,
    sessions: Sessions,
    /// Trial ids in the loaded order: one section each.
    trials: Vec<String>,
}

impl Console {
    pub fn new(mut options: PageOptions, trials: Vec<String>) -> Console {
        options.link_base = options.link_base.map(|b| b.trim_end_matches('/').to_string());
        Console {
            board: Board::new(options.board_rows),
            sessions: Sessions::default(),
            trials,
            options,
        }
    }
}

struct Session {
    user: String,
    expires: Instant,
}

/// Session ids to who signed in and until when.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    /// A new session for `user` from `now`; None when no random id can be made.
    pub fn open(&self, user: &str, now: Instant, ttl: Duration) -> Option<String> {
        let id = random_id()?;
        let mut map = self.0.lock().ok()?;
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let Some(first) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone()) else {
                break;
            };
            map.remove(&first);
        }
        map.insert(
            id.clone(),
            Session {
                user: user.to_string(),
                expires: now + ttl,
            },
        );
        Some(id)
    }

    /// Who holds session `id` at `now`, if it is open and not expired.
    pub fn user(&self, id: &str, now: Instant) -> Option<String> {
        let mut map = self.0.lock().ok()?;
        match map.get(id) {
            Some(s) if s.expires > now => Some(s.user.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, id: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(id);
        }
    }
}

/// 32 bytes from the kernel's random source, in hex. Read straight from /dev/urandom: no
/// dependency for one call, and nothing weaker is ever used in its place.
fn random_id() -> Option<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Who the request is signed in as, for the page: a session, the trusted proxy header, a
/// bearer token (scripts), or anyone when the service runs without authentication.
/// The flag says whether signing out means anything (a session).
fn signed_in(app: &App, headers: &HeaderMap) -> Option<(String, bool)> {
    let console = app.console();
    if let Some(user) = cookie_value(headers, COOKIE).and_then(|id| console.sessions.user(id, Instant::now())) {
        return Some((user, true));
    }
    if let Some(name) = &console.options.trusted_user_header {
        if let Some(user) = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            return Some((user.chars().take(120).collect(), false));
        }
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|t| app.accepts(t)) {
        return Some(("API token".into(), false));
    }
    app.open_access().then(|| ("nobody (authentication is off)".into(), false))
}

/// An HTML answer: never cached (it may hold patient data), never framed, no script or style
/// but its own, nothing fetched from elsewhere.
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

fn see_other(to: &'static str) -> Response {
    let mut r = html(StatusCode::SEE_OTHER, String::new());
    r.headers_mut().insert(header::LOCATION, HeaderValue::from_static(to));
    r
}

/// The sign-in form, with a message when the last attempt failed. It holds no patient data.
fn login_page(status: StatusCode, message: Option<&str>, proxy: bool) -> Response {
    let note = match message {
        Some(m) => format!("<p class=\"err\" role=\"alert\">{}</p>", crate::report::page::esc(m)),
        None => String::new(),
    };
    let proxy = if proxy {
        "<p><small>Or sign in through your organisation's sign-in page.</small></p>"
    } else {
        ""
    };
    html(
        status,
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>trialgate: sign in</title>\
             <style>body{{font-family:system-ui,sans-serif;margin:3rem auto;max-width:26rem;color:#222}}\
             input{{width:100%;padding:.4rem;margin:.3rem 0 .8rem;box-sizing:border-box}}.err{{color:#b00020}}</style>\
             </head><body><h1>trialgate</h1><p>Sign in to see the trial candidates.</p>{note}\
             <form method=\"post\" action=\"/login\"><label for=\"token\">Access token</label>\
             <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required autofocus>\
             <button type=\"submit\">Sign in</button></form>{proxy}</body></html>\n"
        ),
    )
}

/// `GET /`: the board, or the sign-in form.
pub async fn index(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some((user, sign_out)) = signed_in(&app, &headers) else {
        return login_page(StatusCode::OK, None, app.console().options.trusted_user_header.is_some());
    };
    let work = move || {
        let c = app.console();
        // Verdicts made without a request here (re-screens after notifications, earlier runs
        // of the service) are in the verdict history, when there is one.
        if let Some(live) = app.live_server() {
            match live.latest() {
                Ok(latest) => c.board.merge(
                    latest
                        .into_iter()
                        .map(|l| {
                            let before = l.previous.and_then(|p| serde_json::from_value(serde_json::Value::String(p)).ok());
                            (l.result, crate::time::Instant(l.at), before)
                        })
                        .collect(),
                ),
                Err(e) => tracing::warn!("the page could not read the verdict history: {}", crate::live::brief(&e)),
            }
        }
        c.board.render(&c.trials, c.options.link_base.as_deref(), Some(&user), sign_out)
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(page) => html(StatusCode::OK, page),
        Err(_) => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            "<!DOCTYPE html><p>The page could not be made; see the service log.</p>".into(),
        ),
    }
}

/// `GET /login`: the form (or the page, when already signed in).
pub async fn login_form(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if signed_in(&app, &headers).is_some() {
        return see_other("/");
    }
    login_page(StatusCode::OK, None, app.console().options.trusted_user_header.is_some())
}

/// `POST /login`: `token=<one of the API tokens>` as a form body, for a session cookie.
pub async fn login(State(app): State<Arc<App>>, body: Body) -> Response {
    let proxy = app.console().options.trusted_user_header.is_some();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
        return login_page(StatusCode::PAYLOAD_TOO_LARGE, Some("The form is too large."), proxy);
    };
    let token = form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let Some(token) = token.filter(|t| !t.trim().is_empty()) else {
        return login_page(StatusCode::UNAUTHORIZED, Some("Enter an access token."), proxy);
    };
    if app.open_access() {
        return see_other("/");
    }
    if !app.accepts(&token) {
        tracing::info!("page sign-in refused");
        return login_page(
            StatusCode::UNAUTHORIZED,
            Some("That token is not accepted. Check it and try again."),
            proxy,
        );
    }
    let c = app.console();
    let Some(id) = c.sessions.open("access token", Instant::now(), c.options.session_ttl) else {
        return html(
            StatusCode::INTERNAL_SERVER_ERROR,
            "<!DOCTYPE html><p>No session could be opened (no random source); see the service log.</p>".into(),
        );
    };
    tracing::info!("page sign-in");
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        c.options.session_ttl.as_secs(),
        if c.options.secure_cookies { "; Secure" } else { "" }
    );
    let mut r = see_other("/");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `POST /logout`: ends the session and clears the cookie.
pub async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let c = app.console();
    if let Some(id) = cookie_value(&headers, COOKIE) {
        c.sessions.close(id);
    }
    let cookie = format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        if c.options.secure_cookies { "; Secure" } else { "" }
    );
    let mut r = see_other("/");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// A page route asked with a method it does not take: HTML, like the page.
pub async fn wrong_method() -> Response {
    let mut r = html(
        StatusCode::METHOD_NOT_ALLOWED,
        "<!DOCTYPE html>\n<p>Not here: the page is GET /; sign in with POST /login, out with POST /logout.</p>\n".into(),
    );
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_close() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let id = s.open("u", t0, ttl).unwrap();
        assert_eq!(id.len(), 64);
        assert_ne!(s.open("u", t0, ttl).unwrap(), id, "ids are random");
        assert_eq!(s.user(&id, t0 + Duration::from_secs(59)).as_deref(), Some("u"));
        assert_eq!(s.user(&id, t0 + Duration::from_secs(60)), None, "expired");
        assert_eq!(s.user(&id, t0), None, "an expired session is gone");
        let id = s.open("u", t0, ttl).unwrap();
        s.close(&id);
        assert_eq!(s.user(&id, t0), None);
        assert_eq!(s.user("not-a-session", t0), None);
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; trialgate_session=abc ; b=2"));
        assert_eq!(cookie_value(&h, COOKIE), Some("abc"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("xtrialgate_session=abc"));
        assert_eq!(cookie_value(&h, COOKIE), None);
    }
}
