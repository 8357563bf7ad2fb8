//! SMART Backend Services authorization (client-credentials grant with a `private_key_jwt`
//! assertion signed RS384 or ES384), as hospital FHIR servers require of system clients.
//!
//! The token endpoint is discovered from `[base]/.well-known/smart-configuration` unless
//! configured. Each assertion is a short-lived JWT (`iss` = `sub` = client id, `aud` = the
//! token endpoint, `exp` five minutes ahead, a unique `jti`). The access token is cached until
//! shortly before it expires and then fetched again. The private key and the tokens are never
//! logged, printed or put in an error message.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long before the token's stated expiry a new one is fetched.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs384,
    Es384,
}

impl Alg {
    pub fn parse(s: &str) -> Option<Alg> {
        match s.trim().to_ascii_uppercase().as_str() {
            "RS384" => Some(Alg::Rs384),
            "ES384" => Some(Alg::Es384),
            _ => None,
        }
    }
}

/// A registered backend client. `Debug` leaves the key out.
#[derive(Clone)]
pub struct SmartClient {
    pub client_id: String,
    pub key_pem: String,
    pub alg: Alg,
    pub kid: Option<String>,
    pub scope: String,
    /// The token endpoint, when not discovered from the server.
    pub token_endpoint: Option<String>,
}

impl std::fmt::Debug for SmartClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartClient")
            .field("client_id", &self.client_id)
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("scope", &self.scope)
            .field("token_endpoint", &self.token_endpoint)
            .field("key_pem", &"(redacted)")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SmartError {
    #[error("the private key cannot be read as a {alg:?} PEM key: {message}")]
    Key { alg: Alg, message: String },
    #[error("signing the client assertion failed: {0}")]
    Sign(String),
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    jti: String,
}

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// A `jti` no two assertions share: time to the nanosecond plus a process-wide counter.
fn unique_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}-{:x}-{n:x}", now().as_nanos(), std::process::id())
}

impl SmartClient {
    /// A signed client assertion for `token_endpoint`.
    pub fn assertion(&self, token_endpoint: &str) -> Result<String, SmartError> {
        use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
        let (algorithm, key) = match self.alg {
            Alg::Rs384 => (Algorithm::RS384, EncodingKey::from_rsa_pem(self.key_pem.as_bytes())),
            Alg::Es384 => (Algorithm::ES384, EncodingKey::from_ec_pem(self.key_pem.as_bytes())),
        };
        let key = key.map_err(|e| SmartError::Key {
            alg: self.alg,
            message: e.to_string(),
        })?;
        let mut header = Header::new(algorithm);
        header.kid = self.kid.clone();
        header.typ = Some("JWT".into());
        let claims = Claims {
            iss: &self.client_id,
            sub: &self.client_id,
            aud: token_endpoint,
            exp: (now() + Duration::from_secs(300)).as_secs(),
            jti: unique_id(),
        };
        encode(&header, &claims, &key).map_err(|e| SmartError::Sign(e.to_string()))
    }

    /// The form body of the token request.
    pub fn token_request(&self, token_endpoint: &str) -> Result<String, SmartError> {
        let assertion = self.assertion(token_endpoint)?;
        let fields = [
            ("grant_type", "client_credentials"),
            ("scope", self.scope.as_str()),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            ("client_assertion", assertion.as_str()),
        ];
        Ok(fields
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect::<Vec<_>>()
            .join("&"))
    }
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The part of `.well-known/smart-configuration` used here.
#[derive(Deserialize)]
pub struct SmartConfiguration {
    pub token_endpoint: String,
}

/// A token response.
#[derive(Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub expires_in: Option<u64>,
}

/// An access token and when to stop using it.
#[derive(Clone)]
pub struct CachedToken {
    pub token: String,
    pub refresh_at: std::time::Instant,
}

impl CachedToken {
    pub fn new(r: TokenResponse) -> CachedToken {
        // A server that states no lifetime gets the SMART-typical five minutes.
        let life = Duration::from_secs(r.expires_in.unwrap_or(300));
        CachedToken {
            token: r.access_token,
            refresh_at: std::time::Instant::now() + life.saturating_sub(REFRESH_MARGIN),
        }
    }

    pub fn fresh(&self) -> bool {
        std::time::Instant::now() < self.refresh_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_key() {
        let c = SmartClient {
            client_id: "c".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----SECRET".into(),
            alg: Alg::Es384,
            kid: None,
            scope: "system/*.rs".into(),
            token_endpoint: None,
        };
        assert!(!format!("{c:?}").contains("SECRET"));
    }

    #[test]
    fn form_fields_are_encoded() {
        assert_eq!(
            form_encode("system/*.rs system/ResearchSubject.cu"),
            "system%2F%2A.rs+system%2FResearchSubject.cu"
        );
    }

    #[test]
    fn a_token_is_refreshed_shortly_before_it_expires() {
        let t = CachedToken::new(TokenResponse {
            access_token: "x".into(),
            expires_in: Some(30),
        });
        assert!(!t.fresh(), "a 30 s token is inside the 60 s margin at once");
        let t = CachedToken::new(TokenResponse {
            access_token: "x".into(),
            expires_in: Some(3600),
        });
        assert!(t.fresh());
    }
}
