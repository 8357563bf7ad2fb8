//! FHIR Bulk Data export (`$export`): kick-off, status polling, download of the manifest's
//! NDJSON files into a folder, which is then screened by the same streaming path as any
//! NDJSON folder on disk.
//!
//! The kick-off asks only for the resource types the trials read (`_type`), for
//! Observations only the codes they read (`_typeFilter`; a server that refuses the parameter
//! is asked again without it, and one that ignores it costs only download time, since codes
//! are filtered again while reading), and only changes since an instant (`_since`) when asked.

use crate::fhir::InputIssue;
use crate::fhir::client::{ClientError, FhirClient, Request};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// `Group/<id>/$export`; None: `Patient/$export`.
    pub group: Option<String>,
    pub types: Vec<String>,
    /// `_typeFilter` values (`Observation?code=a,b`).
    pub type_filters: Vec<String>,
    /// `_since`, a FHIR instant.
    pub since: Option<String>,
    /// Give up polling after this long.
    pub max_wait: Duration,
    /// The longest pause between two status requests. A server's Retry-After is honoured up
    /// to this: some (Helios) say 120 s for exports done in under one.
    pub max_poll: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("Bulk Data export: {0}")]
    Client(#[from] ClientError),
    #[error("Bulk Data export: {0}")]
    Protocol(String),
    #[error("Bulk Data export: {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    State(#[from] crate::state::StateError),
}

#[derive(Debug, Deserialize)]
struct ManifestFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    url: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    transaction_time: Option<String>,
    #[serde(default)]
    requires_access_token: bool,
    #[serde(default)]
    output: Vec<ManifestFile>,
    #[serde(default)]
    error: Vec<ManifestFile>,
    #[serde(default)]
    deleted: Vec<ManifestFile>,
}

/// An export on disk.
#[derive(Debug, Default)]
pub struct Exported {
    /// The server's `transactionTime`: the `_since` of the next incremental export.
    pub transaction_time: Option<String>,
    pub files: Vec<PathBuf>,
    pub bytes: u64,
    /// Problems the server reported in the manifest's error files, in its words.
    pub issues: Vec<InputIssue>,
    /// Resources the server says were deleted since `_since` (`Observation/123`, from the
    /// request URLs of its `deleted` Bundles).
    pub deleted: Vec<String>,
}

fn kickoff_path(opts: &ExportOptions, with_filter: bool) -> String {
    use crate::fhir::query_encode as enc;
    let mut params = Vec::new();
    if !opts.types.is_empty() {
        params.push(format!("_type={}", enc(&opts.types.join(","))));
    }
    if with_filter {
        params.extend(opts.type_filters.iter().map(|f| format!("_typeFilter={}", enc(f))));
    }
    if let Some(s) = &opts.since {
        params.push(format!("_since={}", enc(s)));
    }
    let base = match &opts.group {
        Some(g) => format!("Group/{}/$export", enc(g)),
        None => "Patient/$export".to_string(),
    };
    if params.is_empty() {
        base
    } else {
        format!("{base}?{}", params.join("&"))
    }
}

fn bulk_request(url: String) -> Request {
    Request {
        headers: vec![("prefer", "respond-async".to_string())],
        fhir: false,
        ..Request::get(url)
    }
}

/// Runs an export to the end and downloads its files into `dir` (created if needed).
pub async fn export(client: &FhirClient, opts: &ExportOptions, dir: &Path) -> Result<Exported, BulkError> {
    let io = |source| BulkError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let kick = match client.send(&bulk_request(client.url(&kickoff_path(opts, true)))).await {
        // A server that does not know _typeFilter may refuse it: ask again without it.
        Err(ClientError::Status { status: 400, message, .. }) if !opts.type_filters.is_empty() => {
            tracing::warn!(%message, "the server refused _typeFilter; exporting without it (codes are filtered while reading)");
            client.send(&bulk_request(client.url(&kickoff_path(opts, false)))).await?
        }
        other => other?,
    };
    if kick.status != 202 {
        return Err(BulkError::Protocol(format!(
            "the kick-off was answered {} instead of 202 Accepted: the server does not run this export asynchronously",
            kick.status
        )));
    }
    let status_url = kick
        .content_location
        .ok_or_else(|| BulkError::Protocol("the kick-off's 202 has no Content-Location to poll".into()))?;
    let started = std::time::Instant::now();
    let manifest = loop {
        let r = client.send(&bulk_request(client.url(&status_url))).await?;
        match r.status {
            200 => {
                break serde_json::from_str::<Manifest>(&r.body)
                    .map_err(|e| BulkError::Protocol(format!("the completed export's manifest cannot be read: {e}")))?;
            }
            202 => {
                if started.elapsed() > opts.max_wait {
                    // Tell the server to stop working on an export nobody will collect.
                    let cancel = Request {
                        method: reqwest::Method::DELETE,
                        ..bulk_request(client.url(&status_url))
                    };
                    let _ = client.send(&cancel).await;
                    return Err(BulkError::Protocol(format!(
                        "not complete after {} s; cancelled",
                        opts.max_wait.as_secs()
                    )));
                }
                tracing::info!(progress = r.progress.as_deref().unwrap_or("in progress"), "export running");
                let wait = r
                    .retry_after
                    .unwrap_or(Duration::from_secs(2))
                    .clamp(Duration::from_millis(100), opts.max_poll.max(Duration::from_millis(100)));
                tokio::time::sleep(wait).await;
            }
            other => return Err(BulkError::Protocol(format!("status request answered {other}"))),
        }
    };
    let mut out = Exported {
        transaction_time: manifest.transaction_time.clone(),
        ..Default::default()
    };
    let auth = manifest.requires_access_token;
    for (i, f) in manifest.output.iter().enumerate() {
        // The type names the file: anything but a plain resource type name (a path, say) from a
        // manifest is not used as one.
        let kind = f
            .kind
            .as_deref()
            .filter(|k| !k.is_empty() && k.len() <= 64 && k.chars().all(|c| c.is_ascii_alphabetic()))
            .unwrap_or("Resource");
        // Named by type so the reader sees Patients first, numbered so parts never collide.
        let path = dir.join(format!("{kind}.{i:04}.ndjson"));
        out.bytes += client.download(&f.url, &path, auth).await?;
        out.files.push(path);
    }
    for (i, f) in manifest.error.iter().enumerate() {
        let path = dir.join(format!("errors.{i:04}.json"));
        client.download(&f.url, &path, auth).await?;
        let text = std::fs::read_to_string(&path).map_err(|source| BulkError::Io {
            path: path.clone(),
            source,
        })?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let message = crate::fhir::client::outcome_text(line).unwrap_or_else(|| line.chars().take(300).collect());
            out.issues.push(InputIssue {
                location: format!("{status_url} (error file {})", i + 1),
                message: format!("the server reported: {message}"),
            });
        }
        // Kept out of the folder that is screened: these are OperationOutcomes, not data.
        let _ = std::fs::remove_file(&path);
    }
    for (i, f) in manifest.deleted.iter().enumerate() {
        let path = dir.join(format!("deleted.{i:04}.json"));
        client.download(&f.url, &path, auth).await?;
        let text = std::fs::read_to_string(&path).map_err(|source| BulkError::Io {
            path: path.clone(),
            source,
        })?;
        #[derive(Deserialize)]
        struct Request {
            url: Option<String>,
        }
        #[derive(Deserialize)]
        struct Entry {
            request: Option<Request>,
        }
        #[derive(Deserialize)]
        struct Deleted {
            #[serde(default)]
            entry: Vec<Entry>,
        }
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Deleted>(line) {
                Ok(d) => out.deleted.extend(
                    d.entry
                        .into_iter()
                        .filter_map(|e| e.request?.url)
                        .filter_map(|u| crate::fhir::record::normalize_reference(&u)),
                ),
                Err(e) => out.issues.push(InputIssue {
                    location: format!("{status_url} (deleted file {})", i + 1),
                    message: format!("a line of the deleted list cannot be read: {e}"),
                }),
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    // The server may now delete the files; failing to tell it is not worth failing the run.
    let done = Request {
        method: reqwest::Method::DELETE,
        ..bulk_request(client.url(&status_url))
    };
    if let Err(e) = client.send(&done).await {
        tracing::info!(%e, "the export could not be marked collected");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kickoff_asks_for_types_filters_and_changes_since() {
        let opts = ExportOptions {
            group: Some("ln cohort".into()),
            types: vec!["Patient".into(), "Observation".into()],
            type_filters: vec!["Observation?code=2160-0,98979-8".into()],
            since: Some("2026-05-01T00:00:00Z".into()),
            ..Default::default()
        };
        assert_eq!(
            kickoff_path(&opts, true),
            "Group/ln%20cohort/$export?_type=Patient,Observation&_typeFilter=Observation%3Fcode%3D2160-0,98979-8&_since=2026-05-01T00%3A00%3A00Z"
        );
        assert_eq!(
            kickoff_path(&ExportOptions::default(), false),
            "Patient/$export",
            "no parameters: everything the server has"
        );
    }
}
