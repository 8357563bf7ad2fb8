//! The gateway configuration (`config/gateway.toml`): which server, how to authenticate, which
//! cohort, which trials, how hard to push, and whether to write back.
//!
//! Every key can be overridden by an environment variable named after it,
//! `TRIALGATE_<SECTION>_<KEY>` in capitals (`TRIALGATE_SERVER_URL`, `TRIALGATE_SWEEP_BATCH`),
//! so a container or a scheduler can configure trialgate without editing the file; a command
//! line flag overrides both. Everything is checked when loaded, and each message names the
//! key (and the variable, when that is where the value came from).

use crate::config::ConfigError;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub url: String,
    pub timeout_secs: u64,
    pub max_retries: u32,
    pub retry_budget: u32,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            url: String::new(),
            timeout_secs: 60,
            max_retries: 5,
            retry_budget: 500,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// `none`, `bearer` or `smart`.
    pub method: String,
    pub token_env: String,
    pub token_file: String,
    pub smart_client_id: String,
    pub smart_key_file: String,
    pub smart_alg: String,
    pub smart_kid: String,
    pub smart_scope: String,
    pub smart_token_endpoint: String,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            method: "none".into(),
            token_env: String::new(),
            token_file: String::new(),
            smart_client_id: String::new(),
            smart_key_file: String::new(),
            smart_alg: "RS384".into(),
            smart_kid: String::new(),
            smart_scope: String::new(),
            smart_token_endpoint: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CohortSection {
    /// `all`, `group`, `search` or `ids`.
    pub kind: String,
    pub group: String,
    pub search: String,
    pub ids: Vec<String>,
}

impl Default for CohortSection {
    fn default() -> Self {
        CohortSection {
            kind: "all".into(),
            group: String::new(),
            search: String::new(),
            ids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sweep {
    pub trials: Vec<String>,
    pub batch: usize,
    pub concurrency: usize,
    pub page_size: usize,
    /// Fetch only the Observations whose codes the trials read.
    pub code_filter: bool,
}

impl Default for Sweep {
    fn default() -> Self {
        Sweep {
            trials: Vec::new(),
            batch: 50,
            concurrency: 4,
            page_size: 200,
            code_filter: true,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WriteBack {
    pub enabled: bool,
    pub write_ineligible: bool,
    /// Empty: write to the server read.
    pub target_url: String,
}

/// `trialgate daemon`: when to sweep, how, and where to keep state and reports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// Five-field cron, UTC (`0 2 * * *`: every day at 02:00).
    pub cron: String,
    /// Sweep through Bulk Data (incremental after the first run) rather than searches.
    pub bulk: bool,
    /// The state: a SQLite file, or a `postgres://` URL shared by processes (checkpoints,
    /// fact state, verdict history).
    pub state: String,
    /// Folder for each run's JSON report and changes.
    pub reports: String,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection {
            cron: String::new(),
            bulk: false,
            state: "trialgate-state.sqlite".into(),
            reports: "reports".into(),
        }
    }
}

/// `trialgate serve`: where to listen, which tokens to accept, how large a body may be, and
/// how the coordinator's page signs people in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSection {
    pub listen: String,
    /// The environment variable holding the accepted bearer tokens, comma-separated.
    pub token_env: String,
    pub max_body_mb: u64,
    /// PEM certificate chain and private key: when both are set the service speaks HTTPS.
    pub tls_cert: String,
    pub tls_key: String,
    /// How long a sign-in to the page lasts.
    pub session_hours: u64,
    /// A header set by an authenticating reverse proxy to the signed-in user; empty: none.
    pub trusted_user_header: String,
    /// Rows (patient x trial) the page's board keeps in memory at most.
    pub board_rows: u64,
}

impl Default for ServeSection {
    fn default() -> Self {
        ServeSection {
            listen: "127.0.0.1:8080".into(),
            token_env: "TRIALGATE_API_TOKENS".into(),
            max_body_mb: 16,
            tls_cert: String::new(),
            tls_key: String::new(),
            session_hours: 8,
            trusted_user_header: String::new(),
            board_rows: 20_000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gateway {
    pub server: Server,
    pub auth: Auth,
    pub cohort: CohortSection,
    pub sweep: Sweep,
    pub write_back: WriteBack,
    pub schedule: ScheduleSection,
    pub serve: ServeSection,
}

/// Every key, for environment overrides: (section, key).
const KEYS: &[(&str, &[&str])] = &[
    ("server", &["url", "timeout_secs", "max_retries", "retry_budget"]),
    (
        "auth",
        &[
            "method",
            "token_env",
            "token_file",
            "smart_client_id",
            "smart_key_file",
            "smart_alg",
            "smart_kid",
            "smart_scope",
            "smart_token_endpoint",
        ],
    ),
    ("cohort", &["kind", "group", "search", "ids"]),
    ("sweep", &["trials", "batch", "concurrency", "page_size", "code_filter"]),
    ("write_back", &["enabled", "write_ineligible", "target_url"]),
    ("schedule", &["cron", "bulk", "state", "reports"]),
    (
        "serve",
        &[
            "listen",
            "token_env",
            "max_body_mb",
            "tls_cert",
            "tls_key",
            "session_hours",
            "trusted_user_header",
            "board_rows",
        ],
    ),
];

pub fn env_name(section: &str, key: &str) -> String {
    format!("TRIALGATE_{}_{}", section.to_ascii_uppercase(), key.to_ascii_uppercase())
}

/// An environment value as TOML: numbers, booleans and `[..]` arrays as such, anything else
/// as a string; comma-separated text for the list keys.
fn env_value(key: &str, raw: &str) -> toml::Value {
    if matches!(key, "ids" | "trials") && !raw.trim_start().starts_with('[') {
        return toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        );
    }
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

impl Gateway {
    /// Reads `path` (a missing file is an empty configuration), applies environment overrides
    /// from `env`, and checks the result.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Gateway, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(ConfigError::io(path, e)),
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() as u64 + 1);
            ConfigError::at(path, line, e.message().to_string())
        })?;
        let mut from_env = Vec::new();
        for (section, keys) in KEYS {
            for key in *keys {
                let name = env_name(section, key);
                if let Some(raw) = env(&name) {
                    let entry = table
                        .entry(section.to_string())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    if let toml::Value::Table(t) = entry {
                        t.insert(key.to_string(), env_value(key, &raw));
                        from_env.push(format!("{section}.{key}"));
                    }
                }
            }
        }
        let g: Gateway = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            ConfigError::at(
                path,
                None,
                format!(
                    "{} (a value from the environment counts too: {})",
                    e.message(),
                    if from_env.is_empty() {
                        "none set".into()
                    } else {
                        from_env.join(", ")
                    }
                ),
            )
        })?;
        g.check(path, &from_env)?;
        Ok(g)
    }

    fn check(&self, path: &Path, from_env: &[String]) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut err = |section: &str, key: &str, msg: String| {
            let source = if from_env.iter().any(|k| k == &format!("{section}.{key}")) {
                format!(" (from {})", env_name(section, key))
            } else {
                String::new()
            };
            errors.push(ConfigError::at(path, None, format!("[{section}] {key}{source}: {msg}")));
        };
        let url_ok = |u: &str| u.is_empty() || u.starts_with("http://") || u.starts_with("https://");
        if !url_ok(&self.server.url) {
            err("server", "url", format!("`{}` is not an http(s) URL", self.server.url));
        }
        if !url_ok(&self.write_back.target_url) {
            err(
                "write_back",
                "target_url",
                format!("`{}` is not an http(s) URL", self.write_back.target_url),
            );
        }
        if self.server.timeout_secs == 0 {
            err("server", "timeout_secs", "must be at least 1".into());
        }
        match self.auth.method.as_str() {
            "none" => {}
            "bearer" if self.auth.token_env.is_empty() == self.auth.token_file.is_empty() => {
                err("auth", "method", "`bearer` needs exactly one of token_env or token_file".into());
            }
            "bearer" => {}
            "smart" => {
                if self.auth.smart_client_id.is_empty() {
                    err("auth", "smart_client_id", "`smart` needs the client id".into());
                }
                if self.auth.smart_key_file.is_empty() {
                    err("auth", "smart_key_file", "`smart` needs the private key file".into());
                }
                if crate::fhir::smart::Alg::parse(&self.auth.smart_alg).is_none() {
                    err("auth", "smart_alg", format!("`{}`: use RS384 or ES384", self.auth.smart_alg));
                }
            }
            other => err("auth", "method", format!("`{other}`: use none, bearer or smart")),
        }
        match self.cohort.kind.as_str() {
            "all" => {}
            "group" if self.cohort.group.is_empty() => err("cohort", "group", "kind `group` needs a Group id".into()),
            "search" if self.cohort.search.is_empty() => {
                err("cohort", "search", "kind `search` needs a search such as Condition?code=...".into())
            }
            "ids" if self.cohort.ids.is_empty() => err("cohort", "ids", "kind `ids` needs at least one patient id".into()),
            "group" | "search" | "ids" => {}
            other => err("cohort", "kind", format!("`{other}`: use all, group, search or ids")),
        }
        for (key, v) in [
            ("batch", self.sweep.batch),
            ("concurrency", self.sweep.concurrency),
            ("page_size", self.sweep.page_size),
        ] {
            if v == 0 {
                err("sweep", key, "must be at least 1".into());
            }
        }
        if self.serve.listen.parse::<std::net::SocketAddr>().is_err() {
            err(
                "serve",
                "listen",
                format!("`{}` is not an address such as 127.0.0.1:8080", self.serve.listen),
            );
        }
        if self.serve.max_body_mb == 0 {
            err("serve", "max_body_mb", "must be at least 1".into());
        }
        if self.serve.session_hours == 0 || self.serve.session_hours > 24 * 30 {
            err("serve", "session_hours", "must be from 1 to 720 (30 days)".into());
        }
        if self.serve.board_rows == 0 {
            err("serve", "board_rows", "must be at least 1".into());
        }
        let header = self.serve.trusted_user_header.trim();
        if !header.is_empty() {
            let reserved = ["authorization", "cookie", "host", "content-type", "content-length"];
            if axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() || reserved.contains(&header.to_ascii_lowercase().as_str()) {
                err(
                    "serve",
                    "trusted_user_header",
                    format!("`{header}` is not a header a proxy sets for its user, such as X-Forwarded-User"),
                );
            }
        }
        if !self.schedule.cron.is_empty() {
            if let Err(why) = crate::schedule::Schedule::parse(&self.schedule.cron) {
                err("schedule", "cron", why);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Many(errors))
        }
    }

    /// The cohort the configuration names.
    pub fn cohort(&self) -> crate::sweep::Cohort {
        use crate::sweep::Cohort;
        match self.cohort.kind.as_str() {
            "group" => Cohort::Group(self.cohort.group.clone()),
            "search" => Cohort::Search(self.cohort.search.clone()),
            "ids" => Cohort::Ids(self.cohort.ids.clone()),
            _ => Cohort::All,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Gateway, String> {
        let dir = std::env::temp_dir().join(format!("trialgate-gw-{}-{}", std::process::id(), text.len() + env.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("gateway.toml");
        std::fs::write(&p, text).unwrap();
        let vars: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let r = Gateway::load(&p, &|k| vars.get(k).cloned()).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn defaults_file_and_environment_in_that_order() {
        let g = load(
            "[server]\nurl = \"https://a.example/fhir\"\n[sweep]\nbatch = 20\n",
            &[
                ("TRIALGATE_SWEEP_BATCH", "10"),
                ("TRIALGATE_COHORT_KIND", "ids"),
                ("TRIALGATE_COHORT_IDS", "p1, p2"),
            ],
        )
        .unwrap();
        assert_eq!(g.server.url, "https://a.example/fhir");
        assert_eq!(g.sweep.batch, 10, "the environment overrides the file");
        assert_eq!(g.sweep.concurrency, 4, "the default where neither says");
        assert_eq!(g.cohort.ids, ["p1", "p2"]);
        assert!(matches!(g.cohort(), crate::sweep::Cohort::Ids(_)));
    }

    #[test]
    fn errors_name_the_key_and_the_variable() {
        let e = load("[server]\nurl = \"ftp://x\"\n", &[]).unwrap_err();
        assert!(e.contains("[server] url: `ftp://x` is not an http(s) URL"), "{e}");
        let e = load("", &[("TRIALGATE_AUTH_METHOD", "smart")]).unwrap_err();
        assert!(e.contains("[auth] smart_client_id") && e.contains("[auth] smart_key_file"), "{e}");
        let e = load("", &[("TRIALGATE_SWEEP_BATCH", "0")]).unwrap_err();
        assert!(e.contains("[sweep] batch (from TRIALGATE_SWEEP_BATCH): must be at least 1"), "{e}");
        let e = load("[server]\nurll = \"x\"\n", &[]).unwrap_err();
        assert!(e.contains("unknown field `urll`"), "{e}");
        let e = load("[server\n", &[]).unwrap_err();
        assert!(e.contains("gateway.toml:1"), "{e}");
        let e = load("[serve]\ntrusted_user_header = \"X User\"\n", &[]).unwrap_err();
        assert!(e.contains("[serve] trusted_user_header: `X User`"), "{e}");
        let e = load("", &[("TRIALGATE_SERVE_SESSION_HOURS", "0")]).unwrap_err();
        assert!(e.contains("[serve] session_hours (from TRIALGATE_SERVE_SESSION_HOURS)"), "{e}");
    }

    #[test]
    fn the_shipped_configuration_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
        Gateway::load(&p, &|_| None).unwrap();
    }
}
