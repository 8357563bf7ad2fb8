//! Cohort sweeps against a FHIR server: choose the cohort, fetch what the trials need in as
//! few round trips as the server allows, and screen it with the same engine as `screen`.
//!
//! Patients are fetched in batches (`patient=a,b,c`), one search per resource type the loaded
//! trials read, with the pages of each search followed to the end. A batch whose search still
//! fails after the client's retries is split into single-patient searches, so one bad patient
//! never costs the others; a patient whose own search fails is reported with status `error`
//! and the server's reason. Nothing is dropped silently: every patient of the cohort ends up in
//! the output, screened or in error.

use crate::criteria::Status;
use crate::criteria::decisions::Decisions;
use crate::criteria::eval::TrialResult;
use crate::fhir::client::{ClientError, FhirClient};
use crate::fhir::files::{ReadOutput, read_text};
use crate::fhir::{InputIssue, Resource};
use crate::time::Date;
use crate::{Config, Screening, SourceFile};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Which patients a sweep screens.
#[derive(Debug, Clone)]
pub enum Cohort {
    /// Every Patient on the server.
    All,
    /// The members of a Group.
    Group(String),
    /// The subjects of a search (`Condition?code=http://snomed.info/sct|55464009`).
    Search(String),
    /// These patient ids.
    Ids(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub cohort: Cohort,
    /// Patients per search request.
    pub batch: usize,
    /// Searches in flight at once.
    pub concurrency: usize,
    /// `_count` asked of the server per page.
    pub page_size: usize,
}

impl Default for SweepOptions {
    fn default() -> Self {
        SweepOptions {
            cohort: Cohort::All,
            batch: 50,
            concurrency: 4,
            page_size: 200,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The cohort itself could not be read: there is nothing to screen.
    #[error("cannot read the cohort: {0}")]
    Cohort(ClientError),
}

/// How a sweep went, beyond the screening itself.
#[derive(Debug, Clone, Default)]
pub struct SweepSummary {
    pub patients: usize,
    pub errors: usize,
    pub requests: u64,
    pub retries: u64,
    pub failed_requests: u64,
    pub types: Vec<String>,
}

#[derive(Deserialize)]
struct Capability {
    #[serde(default)]
    rest: Vec<CapabilityRest>,
}

#[derive(Deserialize)]
struct CapabilityRest {
    #[serde(default)]
    resource: Vec<CapabilityResource>,
}

#[derive(Deserialize)]
struct CapabilityResource {
    #[serde(rename = "type")]
    kind: String,
}

/// The resource types the server says it serves; None when it publishes no usable
/// CapabilityStatement (then every type is tried, and a type it lacks fails loudly).
async fn served_types(client: &FhirClient) -> Option<BTreeSet<String>> {
    let body = client.get("metadata").await.ok()?;
    let cap: Capability = serde_json::from_str(&body).ok()?;
    let types: BTreeSet<String> = cap.rest.into_iter().flat_map(|r| r.resource.into_iter().map(|x| x.kind)).collect();
    (!types.is_empty()).then_some(types)
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b',' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn with_count(search: &str, page_size: usize) -> String {
    let sep = if search.contains('?') { '&' } else { '?' };
    format!("{search}{sep}_count={page_size}")
}

/// Reads pages into `out`, labelling problems with the request they came from.
fn read_pages(label: &str, pages: &[String], out: &mut ReadOutput, cfg: &Config) {
    for (i, body) in pages.iter().enumerate() {
        read_text(&format!("{label} (page {})", i + 1), body, false, crate::read_options(cfg), out);
    }
}

/// The ids of the patients in a cohort.
async fn cohort_ids(client: &FhirClient, opts: &SweepOptions, out: &mut ReadOutput, cfg: &Config) -> Result<Vec<String>, ClientError> {
    match &opts.cohort {
        Cohort::Ids(ids) => Ok(ids.clone()),
        Cohort::All => {
            let pages = client.search(&with_count("Patient", opts.page_size)).await?;
            let mut read = ReadOutput::default();
            read_pages("GET Patient", &pages, &mut read, cfg);
            let ids = read.resources.iter().filter_map(|p| match &p.resource {
                Resource::Patient(pt) => pt.id.clone(),
                _ => None,
            });
            let ids: Vec<String> = ids.collect();
            // The Patient resources are already here: keep them rather than fetch them again.
            out.resources.extend(read.resources);
            out.issues.extend(read.issues);
            Ok(ids)
        }
        Cohort::Group(id) => {
            #[derive(Deserialize)]
            struct Group {
                #[serde(default)]
                member: Vec<Member>,
            }
            #[derive(Deserialize)]
            struct Member {
                entity: Option<crate::fhir::model::Reference>,
                inactive: Option<bool>,
            }
            let body = client.get(&format!("Group/{}", encode(id))).await?;
            let g: Group = serde_json::from_str(&body).map_err(|e| ClientError::Body {
                url: client.url(&format!("Group/{id}")),
                message: e.to_string(),
            })?;
            Ok(g.member
                .iter()
                .filter(|m| m.inactive != Some(true))
                .filter_map(|m| m.entity.as_ref()?.reference.as_deref())
                .filter_map(|r| {
                    crate::fhir::record::normalize_reference(r)?
                        .strip_prefix("Patient/")
                        .map(str::to_string)
                })
                .collect())
        }
        Cohort::Search(q) => {
            let pages = client.search(&with_count(q, opts.page_size)).await?;
            let mut read = ReadOutput::default();
            read_pages(&format!("GET {q}"), &pages, &mut read, cfg);
            let mut ids: Vec<String> = read
                .resources
                .iter()
                .filter_map(|p| match &p.resource {
                    Resource::Patient(pt) => pt.id.clone(),
                    r => crate::fhir::record::normalize_reference(r.patient_reference()?)?
                        .strip_prefix("Patient/")
                        .map(str::to_string),
                })
                .collect();
            ids.sort();
            ids.dedup();
            out.issues.extend(read.issues);
            Ok(ids)
        }
    }
}

/// Every search one batch of patients needs: its Patients (unless already read) and each type.
fn searches(types: &[String], ids: &[String], page_size: usize, have_patients: bool) -> Vec<String> {
    let list = ids.iter().map(|i| encode(i)).collect::<Vec<_>>().join(",");
    let mut out = Vec::new();
    if !have_patients {
        out.push(format!("Patient?_id={list}&_count={page_size}"));
    }
    for t in types.iter().filter(|t| t.as_str() != "Patient") {
        // Medication orders bring the Medication their `medicationReference` points at.
        let include = match t.as_str() {
            "MedicationRequest" => "&_include=MedicationRequest:medication",
            "MedicationStatement" => "&_include=MedicationStatement:medication",
            "MedicationAdministration" => "&_include=MedicationAdministration:medication",
            _ => "",
        };
        out.push(format!("{t}?patient={list}&_count={page_size}{include}"));
    }
    out
}

/// Fetches every search of one batch; on failure, each patient alone. Returns the pages and,
/// per patient that still failed, the reason.
async fn fetch_batch(
    client: &FhirClient,
    types: &[String],
    ids: Vec<String>,
    page_size: usize,
    have_patients: bool,
) -> (Vec<(String, Vec<String>)>, Vec<(String, String)>) {
    let batch = match fetch_all(client, searches(types, &ids, page_size, have_patients)).await {
        Ok(pages) => return (pages, Vec::new()),
        Err(e) => e,
    };
    if ids.len() == 1 {
        return (Vec::new(), vec![(ids[0].clone(), batch.to_string())]);
    }
    tracing::warn!(patients = ids.len(), "a batch search failed; retrying its patients one by one");
    let mut pages = Vec::new();
    let mut failed = Vec::new();
    for id in ids {
        match fetch_all(client, searches(types, std::slice::from_ref(&id), page_size, have_patients)).await {
            Ok(mine) => pages.extend(mine),
            Err(e) => failed.push((id, e.to_string())),
        }
    }
    (pages, failed)
}

/// Every page of every search, labelled with its request; the first failure stops it.
async fn fetch_all(client: &FhirClient, searches: Vec<String>) -> Result<Vec<(String, Vec<String>)>, ClientError> {
    let mut pages = Vec::new();
    for s in searches {
        let p = client.search(&s).await?;
        pages.push((format!("GET {s}"), p));
    }
    Ok(pages)
}

/// Screens a cohort fetched from a FHIR server.
pub async fn sweep(
    client: &FhirClient,
    cfg: &Config,
    as_of: Date,
    decisions: &Decisions,
    opts: &SweepOptions,
) -> Result<(Screening, SweepSummary), SweepError> {
    let needed: BTreeSet<&str> = cfg.trials.iter().flat_map(|t| t.resource_types()).collect();
    let served = served_types(client).await;
    if served.is_none() {
        tracing::warn!("the server publishes no usable CapabilityStatement; trying every resource type the trials need");
    }
    let mut issues = Vec::new();
    let types: Vec<String> = needed
        .iter()
        .filter(|t| {
            let ok = served.as_ref().is_none_or(|s| s.contains(**t));
            if !ok {
                issues.push(InputIssue {
                    location: client.base().to_string(),
                    message: format!("the server does not serve {t}: criteria that need it stay unknown"),
                });
            }
            ok
        })
        .map(|t| t.to_string())
        .collect();

    let mut read = ReadOutput::default();
    let ids = cohort_ids(client, opts, &mut read, cfg).await.map_err(SweepError::Cohort)?;
    let have_patients = matches!(opts.cohort, Cohort::All);
    let mut unique: Vec<String> = ids;
    unique.sort();
    unique.dedup();

    // Batches run concurrently, at most `concurrency` at a time.
    let limit = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in unique.chunks(opts.batch.max(1)) {
        let (client, types, ids, limit) = (client.clone(), types.clone(), chunk.to_vec(), limit.clone());
        let page_size = opts.page_size;
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            fetch_batch(&client, &types, ids, page_size, have_patients).await
        });
    }
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let mut all_pages: Vec<(String, Vec<String>)> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((pages, errors)) => {
                all_pages.extend(pages);
                failed.extend(errors);
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    // Sorted so that the same server state gives the same report, whatever the timing.
    all_pages.sort();
    for (label, pages) in &all_pages {
        read_pages(label, pages, &mut read, cfg);
    }
    // A failed patient's Patient resource may have arrived with the cohort: drop it, so it is
    // reported once, as an error, and not screened on partial data.
    read.resources.retain(|p| match &p.resource {
        Resource::Patient(pt) => !pt.id.as_ref().is_some_and(|id| failed.contains_key(id)),
        r => !r
            .patient_reference()
            .and_then(crate::fhir::record::normalize_reference)
            .is_some_and(|n| n.strip_prefix("Patient/").is_some_and(|id| failed.contains_key(id))),
    });
    read.issues.extend(issues);
    let input = SourceFile {
        kind: "server",
        path: client.base().to_string(),
        sha256: None,
        bytes: None,
    };
    let mut s = crate::screen_read(read, vec![input], cfg, as_of, decisions);

    // Patients of the cohort the server returned nothing for are reported, not lost.
    let screened: BTreeSet<String> = s.results.iter().map(|r| r.patient.clone()).collect();
    for id in &unique {
        let key = format!("Patient/{id}");
        if !screened.contains(&key) && !failed.contains_key(id) {
            failed.insert(id.clone(), "the server returned no Patient resource for this id".into());
        }
    }
    for (id, reason) in &failed {
        for t in &cfg.trials {
            s.results.push(TrialResult {
                patient: format!("Patient/{id}"),
                trial: t.id.clone(),
                status: Status::Error,
                record: Some(reason.clone()),
                decided_by: Vec::new(),
                criteria: Vec::new(),
                facts: Vec::new(),
            });
        }
    }
    s.results.sort_by(|a, b| {
        a.patient
            .cmp(&b.patient)
            .then_with(|| trial_order(cfg, &a.trial).cmp(&trial_order(cfg, &b.trial)))
    });
    s.patients += failed.len();
    let summary = SweepSummary {
        patients: s.patients,
        errors: failed.len(),
        requests: client.stats.requests.load(Ordering::Relaxed),
        retries: client.stats.retries.load(Ordering::Relaxed),
        failed_requests: client.stats.failures.load(Ordering::Relaxed),
        types,
    };
    Ok((s, summary))
}

fn trial_order(cfg: &Config, id: &str) -> usize {
    cfg.trials.iter().position(|t| t.id == id).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_searches_name_every_patient_and_include_medications() {
        let types = vec!["Patient".to_string(), "Observation".to_string(), "MedicationRequest".to_string()];
        let s = searches(&types, &["a".into(), "b c".into()], 100, false);
        assert_eq!(
            s,
            [
                "Patient?_id=a,b%20c&_count=100",
                "Observation?patient=a,b%20c&_count=100",
                "MedicationRequest?patient=a,b%20c&_count=100&_include=MedicationRequest:medication",
            ]
        );
        assert_eq!(with_count("Condition?code=x", 5), "Condition?code=x&_count=5");
    }
}
