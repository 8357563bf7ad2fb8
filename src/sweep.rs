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
use crate::fhir::{InputIssue, Resource, query_encode as encode};
use crate::time::Date;
use crate::{Config, Screening, SourceFile};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// Ask for Observations by the codes the trials read, not every Observation. Off, a sweep
    /// also reports the lab codes it saw but could not map (the `unmapped` list), at the cost
    /// of fetching every Observation of the cohort.
    pub code_filter: bool,
    /// Screen only this shard's patients (the cohort is read whole, then split).
    pub shard: Option<crate::Shard>,
    /// Report progress in the process-wide counters (the progress line, `/metrics`). Off for
    /// the one-patient re-screens of `serve`, which would overwrite a running sweep's.
    pub report_progress: bool,
}

impl Default for SweepOptions {
    fn default() -> Self {
        SweepOptions {
            cohort: Cohort::All,
            batch: 50,
            concurrency: 4,
            page_size: 200,
            code_filter: true,
            shard: None,
            report_progress: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The cohort itself could not be read: there is nothing to screen.
    #[error("cannot read the cohort: {0}")]
    Cohort(ClientError),
    #[error("{0}")]
    State(crate::state::StateError),
}

/// How a sweep went, beyond the screening itself.
#[derive(Debug, Clone, Default)]
pub struct SweepSummary {
    pub patients: usize,
    pub errors: usize,
    /// Of the errors, patients whose data could not be fetched (worth trying again), as
    /// opposed to ids the server has no Patient for (a definite answer).
    pub unfetched: usize,
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
    #[serde(default, rename = "searchParam")]
    search_param: Vec<CapabilitySearchParam>,
}

#[derive(Deserialize)]
struct CapabilitySearchParam {
    name: String,
}

/// What the server's CapabilityStatement says it serves: resource types, and the search
/// parameters of each. Empty when it publishes no usable CapabilityStatement (then every type
/// is tried, a type it lacks fails loudly, and no search parameter beyond `patient` is assumed).
#[derive(Debug, Default)]
struct Served {
    types: BTreeMap<String, BTreeSet<String>>,
}

impl Served {
    fn known(&self) -> bool {
        !self.types.is_empty()
    }
    fn serves(&self, kind: &str) -> bool {
        !self.known() || self.types.contains_key(kind)
    }
    fn searches_by(&self, kind: &str, param: &str) -> bool {
        self.types.get(kind).is_some_and(|p| p.contains(param))
    }
}

async fn served(client: &FhirClient) -> Served {
    let Ok(body) = client.get("metadata").await else {
        return Served::default();
    };
    let Ok(cap) = serde_json::from_str::<Capability>(&body) else {
        return Served::default();
    };
    let types = cap
        .rest
        .into_iter()
        .flat_map(|r| r.resource)
        .map(|r| (r.kind, r.search_param.into_iter().map(|p| p.name).collect()))
        .collect();
    Served { types }
}

/// The Observation filter for the loaded trials: a search parameter and the codes it lists.
///
/// Codes go without their system, so that a server holding LOINC under its OID still matches;
/// the extra Observations this may bring in are sorted out by the mappings as usual.
/// `combo-code` looks into components too; where only `code` is served, the panels that carry
/// a needed lab as a component (blood pressure) are asked for by their own codes. A server
/// that declares neither gets no filter: every Observation of the cohort is fetched.
fn observation_filter(cfg: &Config, served: &Served) -> Option<(&'static str, String)> {
    let combo = served.searches_by("Observation", "combo-code");
    if !combo && !served.searches_by("Observation", "code") {
        return None;
    }
    let codes = observation_codes(cfg, !combo);
    if codes.is_empty() {
        return None;
    }
    let list = codes.iter().map(|c| encode(c)).collect::<Vec<_>>().join(",");
    Some((if combo { "combo-code" } else { "code" }, list))
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

/// Longer GET URLs go as `POST [type]/_search` instead: 2,000 bytes is what every server and
/// proxy in the path can be trusted to take (many cut at 4 or 8 KB, some older ones at 2 KB).
const MAX_GET_URL: usize = 2000;

/// One search: the resource type and its query string.
#[derive(Debug, Clone, PartialEq)]
struct Search {
    kind: String,
    query: String,
}

/// What every batch asks of the server, beyond its patients.
#[derive(Debug, Clone, Default)]
struct Plan {
    types: Vec<String>,
    page_size: usize,
    have_patients: bool,
    /// `&combo-code=...` for Observation, when filtering.
    observation_filter: Option<(&'static str, String)>,
}

/// Every search one batch of patients needs: its Patients (unless already read) and each type.
fn searches(plan: &Plan, ids: &[String]) -> Vec<Search> {
    let list = ids.iter().map(|i| encode(i)).collect::<Vec<_>>().join(",");
    let page_size = plan.page_size;
    let mut out = Vec::new();
    if !plan.have_patients {
        out.push(Search {
            kind: "Patient".into(),
            query: format!("_id={list}&_count={page_size}"),
        });
    }
    for t in plan.types.iter().filter(|t| t.as_str() != "Patient") {
        // Medication orders bring the Medication their `medicationReference` points at.
        let include = match t.as_str() {
            "MedicationRequest" => "&_include=MedicationRequest:medication",
            "MedicationStatement" => "&_include=MedicationStatement:medication",
            "MedicationAdministration" => "&_include=MedicationAdministration:medication",
            _ => "",
        };
        let filter = match (t.as_str(), &plan.observation_filter) {
            ("Observation", Some((param, codes))) => format!("&{param}={codes}"),
            _ => String::new(),
        };
        out.push(Search {
            kind: t.clone(),
            query: format!("patient={list}{filter}&_count={page_size}{include}"),
        });
    }
    out
}

/// Fetches every search of one batch; on failure, each patient alone. Returns the pages and,
/// per patient that still failed, the reason.
async fn fetch_batch(client: &FhirClient, plan: &Plan, ids: Vec<String>) -> (Vec<(String, Vec<String>)>, Vec<(String, String)>) {
    let batch = match fetch_all(client, searches(plan, &ids)).await {
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
        match fetch_all(client, searches(plan, std::slice::from_ref(&id))).await {
            Ok(mine) => pages.extend(mine),
            Err(e) => failed.push((id, e.to_string())),
        }
    }
    (pages, failed)
}

/// Every page of every search, labelled with its request; the first failure stops it.
async fn fetch_all(client: &FhirClient, searches: Vec<Search>) -> Result<Vec<(String, Vec<String>)>, ClientError> {
    let mut pages = Vec::new();
    for s in searches {
        let get = format!("{}?{}", s.kind, s.query);
        let long = client.url(&get).len() > MAX_GET_URL;
        tracing::debug!(kind = %s.kind, bytes = s.query.len(), post = long, "search");
        if !long {
            pages.push((format!("GET {get}"), client.search(&get).await?));
        } else {
            let p = client.search_post(&s.kind, &s.query).await?;
            pages.push((format!("POST {}/_search {}", s.kind, s.query), p));
        }
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
    mut state: Option<&mut crate::state::State>,
) -> Result<(Screening, SweepSummary), SweepError> {
    let (swept, summary) = sweep_held(client, cfg, as_of, decisions, opts, state.as_deref_mut()).await?;
    let screening = swept.into_screening(cfg, decisions, state.as_deref()).map_err(SweepError::State)?;
    Ok((screening, summary))
}

/// [`sweep`], its verdicts not held but given by [`Swept::each_run`]: what a large cohort
/// needs. Each batch is read into facts as it arrives (and, with a `state`, evaluated and
/// checkpointed); what is kept of it is its patients' facts.
pub async fn sweep_held(
    client: &FhirClient,
    cfg: &Config,
    as_of: Date,
    decisions: &Decisions,
    opts: &SweepOptions,
    mut state: Option<&mut crate::state::State>,
) -> Result<(Swept, SweepSummary), SweepError> {
    let needed: BTreeSet<&str> = cfg.trials.iter().flat_map(|t| t.resource_types()).collect();
    let served = served(client).await;
    if !served.known() {
        tracing::warn!("the server publishes no usable CapabilityStatement; trying every resource type the trials need");
    }
    let mut issues = Vec::new();
    let types: Vec<String> = needed
        .iter()
        .filter(|t| {
            let ok = served.serves(t);
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
    let plan = Arc::new(Plan {
        types: types.clone(),
        page_size: opts.page_size,
        have_patients: matches!(opts.cohort, Cohort::All),
        observation_filter: opts.code_filter.then(|| observation_filter(cfg, &served)).flatten(),
    });
    if opts.code_filter && plan.observation_filter.is_none() && types.iter().any(|t| t == "Observation") {
        tracing::info!("the server declares no Observation code search: fetching every Observation of the cohort");
    }
    let mut unique: Vec<String> = ids;
    unique.sort();
    unique.dedup();
    if let Some(shard) = opts.shard {
        unique.retain(|id| shard.holds(id));
    }
    // Patients the cohort listing already brought, handed to their batch.
    let mut listed: HashMap<String, crate::fhir::files::Parsed> = HashMap::new();
    for p in read.resources.drain(..) {
        if let Resource::Patient(pt) = &p.resource {
            if let Some(id) = pt.id.clone() {
                listed.entry(id).or_insert(p);
            }
        }
    }

    // A resumed run starts from its last checkpoint: those patients are not fetched again,
    // and their verdicts stay in the state until reported; the others' facts are held (see
    // `Swept`).
    let mut results: Vec<TrialResult> = Vec::new();
    let mut held: Vec<crate::facts::held::Held> = Vec::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut earlier: Vec<String> = Vec::new();
    if let Some(st) = state.as_deref() {
        earlier = st.done_patients().map_err(SweepError::State)?;
        earlier.sort();
        done.extend(earlier.iter().map(|p| p.trim_start_matches("Patient/").to_string()));
        if !done.is_empty() {
            tracing::info!(
                patients = done.len(),
                "resuming: these patients were screened before the interruption"
            );
        }
    }
    let todo: Vec<String> = unique.iter().filter(|id| !done.contains(*id)).cloned().collect();

    // Batches run concurrently, at most `concurrency` at a time; each is screened and
    // checkpointed as soon as it arrives, so memory holds one batch's resources at a time.
    let limit = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (n, chunk) in todo.chunks(opts.batch.max(1)).enumerate() {
        let (client, plan, ids, limit) = (client.clone(), plan.clone(), chunk.to_vec(), limit.clone());
        tasks.spawn(async move {
            // Handed back with the pages and released once they are read: a batch fetched
            // but not yet read counts too, or a server faster than the reading would pile
            // the whole cohort's pages up in memory.
            let permit = limit.acquire_owned().await;
            let (pages, failed) = fetch_batch(&client, &plan, ids.clone()).await;
            (n, ids, pages, failed, permit)
        });
    }
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let mut absent = 0usize;
    let mut batch_issues: BTreeMap<usize, Vec<InputIssue>> = BTreeMap::new();
    let mut unmapped = crate::facts::Unmapped::default();
    let mut screened = done.len();
    let mine = crate::pipeline::Progress {
        bytes_total: Default::default(),
        bytes_read: Default::default(),
        patients_total: Default::default(),
        patients_done: Default::default(),
    };
    let progress = if opts.report_progress { &crate::pipeline::PROGRESS } else { &mine };
    progress.bytes_total.store(0, Ordering::Relaxed);
    progress.patients_total.store(unique.len() as u64, Ordering::Relaxed);
    progress.patients_done.store(done.len() as u64, Ordering::Relaxed);
    while let Some(joined) = tasks.join_next().await {
        let (n, ids, pages, errors, permit) = match joined {
            Ok(x) => x,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        progress.patients_done.fetch_add(ids.len() as u64, Ordering::Relaxed);
        failed.extend(errors);
        let read = read_batch(&ids, pages, &failed, &mut listed, cfg, as_of);
        drop(permit);
        // Patients of the cohort the server returned nothing for are reported, not lost.
        let got: BTreeSet<&str> = read.facts.iter().map(|h| h.key().trim_start_matches("Patient/")).collect();
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !got.contains(id.as_str()) && !failed.contains_key(*id))
            .cloned()
            .collect();
        for id in missing {
            absent += 1;
            failed.insert(id, "the server returned no Patient resource for this id".into());
        }
        if let Some(st) = state.as_deref_mut() {
            // Full detail: the state stores each result whole (as JSON).
            let mut results = Vec::new();
            crate::pipeline::evaluate_held(&read.facts, cfg, as_of, decisions, crate::criteria::Detail::Full, None, &mut |r| {
                results.extend(r);
                true
            });
            st.save(&results).map_err(SweepError::State)?;
        }
        screened += read.facts.len();
        unmapped.merge(read.unmapped);
        batch_issues.insert(n, read.issues);
        held.extend(read.facts);
    }
    // Batches finish in any order; the report's is the patients'.
    held.sort_by(|a, b| a.key().cmp(b.key()));
    for (id, reason) in &failed {
        for t in &cfg.trials {
            results.push(TrialResult {
                patient: format!("Patient/{id}"),
                person: None,
                trial: t.id.clone(),
                status: Status::Error,
                record: Some(reason.clone()),
                decided_by: Vec::new(),
                criteria: Vec::new(),
                facts: Vec::new(),
            });
        }
    }
    results.sort_by(|a, b| {
        a.patient
            .cmp(&b.patient)
            .then_with(|| trial_order(cfg, &a.trial).cmp(&trial_order(cfg, &b.trial)))
    });
    let mut all_issues = read.issues;
    // In batch order, so that the same server state gives the same report, whatever the timing.
    all_issues.extend(batch_issues.into_values().flatten());
    all_issues.extend(issues);
    let mut provenance = cfg.provenance.clone();
    provenance.sources.push(SourceFile {
        kind: "server",
        path: client.base().to_string(),
        sha256: None,
        bytes: None,
    });
    let s = Swept {
        facts: held,
        results,
        earlier,
        totals: crate::Totals {
            as_of,
            patients: screened + failed.len(),
            unmapped,
            issues: all_issues,
            provenance,
        },
    };
    let summary = SweepSummary {
        patients: s.totals.patients,
        errors: failed.len(),
        unfetched: failed.len() - absent,
        requests: client.stats.requests.load(Ordering::Relaxed),
        retries: client.stats.retries.load(Ordering::Relaxed),
        failed_requests: client.stats.failures.load(Ordering::Relaxed),
        types,
    };
    Ok((s, summary))
}

/// Reads one batch from its pages (and the Patients the cohort listing brought for it) into
/// its patients' facts.
fn read_batch(
    ids: &[String],
    mut pages: Vec<(String, Vec<String>)>,
    failed: &BTreeMap<String, String>,
    listed: &mut HashMap<String, crate::fhir::files::Parsed>,
    cfg: &Config,
    as_of: Date,
) -> crate::FactsRead {
    let mut read = ReadOutput::default();
    read.resources.extend(ids.iter().filter_map(|id| listed.remove(id)));
    // Sorted so that the same server state gives the same report, whatever the timing.
    pages.sort();
    for (label, pages) in &pages {
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
    crate::read_resources(read, Vec::new(), cfg, as_of)
}

/// The codes of every lab the trials read and, with `panels`, of the panels that carry one as
/// a component: what a search by `code` needs (one by `combo-code` looks into components).
pub fn observation_codes(cfg: &Config, panels: bool) -> Vec<String> {
    let m = &cfg.mappings;
    let labs: BTreeSet<usize> = cfg.trials.iter().flat_map(|t| t.labs(m)).collect();
    let mut codes = BTreeSet::new();
    for &l in &labs {
        let spec = &m.labs[l].spec;
        codes.extend(spec.codes.values().flatten().cloned());
        if panels {
            codes.extend(spec.panels.values().flatten().cloned());
        }
    }
    codes.into_iter().collect()
}

/// How a Bulk Data sweep runs.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    /// `Group/<id>/$export`; None: `Patient/$export`.
    pub group: Option<String>,
    /// `_since` as given; None with a state that holds facts: since that state's export.
    pub since: Option<String>,
    pub code_filter: bool,
    pub max_poll: std::time::Duration,
}

/// What a Bulk Data sweep did.
#[derive(Debug)]
pub struct BulkOutcome {
    pub exported: crate::bulk::Exported,
    /// The `_since` of an incremental export applied to the stored fact state.
    pub incremental_since: Option<String>,
}

/// A sweep through Bulk Data: export what the trials read (every patient, or a Group's
/// members) into `dir`, then screen the folder through the same streaming path as `screen`.
/// With a `state`, the facts are stored after the run, and the next run exports only what
/// changed since (`_since` = this export's `transactionTime`), applies it to the stored facts
/// and evaluates every patient again at its own date, since windows age even for patients
/// whose records did not change.
pub async fn bulk_sweep(
    client: &FhirClient,
    cfg: &Config,
    as_of: Date,
    decisions: &Decisions,
    opts: &BulkOptions,
    dir: &std::path::Path,
    state: Option<&mut crate::state::State>,
) -> Result<(Screening, BulkOutcome), crate::bulk::BulkError> {
    let (read, outcome) = bulk_read(client, cfg, as_of, opts, dir, state).await?;
    // Full detail whatever the report's format: the state stores each result whole (as JSON)
    // and write-back writes the reasons.
    Ok((
        crate::screen_facts(read, cfg, as_of, decisions, crate::criteria::Detail::Full),
        outcome,
    ))
}

/// The first half of [`bulk_sweep`]: export and read every patient's facts, not yet
/// evaluated (see [`Swept`]).
pub async fn bulk_read(
    client: &FhirClient,
    cfg: &Config,
    as_of: Date,
    opts: &BulkOptions,
    dir: &std::path::Path,
    state: Option<&mut crate::state::State>,
) -> Result<(crate::FactsRead, BulkOutcome), crate::bulk::BulkError> {
    let mut types: BTreeSet<&str> = cfg.trials.iter().flat_map(|t| t.resource_types()).collect();
    if types.iter().any(|t| t.starts_with("Medication")) {
        types.insert("Medication");
    }
    // _typeFilter is a plain `code` search: the panels go with it.
    let codes = observation_codes(cfg, true);
    let type_filters = if opts.code_filter && types.contains("Observation") && !codes.is_empty() {
        vec![format!("Observation?code={}", codes.join(","))]
    } else {
        Vec::new()
    };
    let saved = match state.as_deref() {
        Some(st) => st.saved_facts()?,
        None => None,
    };
    // A delta is applied to the stored facts; an explicit --since without stored facts is a
    // delta screened alone, and is not stored (it is not the whole cohort).
    let incremental_since = saved.as_ref().map(|(_, t)| opts.since.clone().unwrap_or_else(|| t.clone()));
    let full = saved.is_none() && opts.since.is_none();
    let export = crate::bulk::ExportOptions {
        group: opts.group.clone(),
        types: types.iter().map(|t| t.to_string()).collect(),
        type_filters,
        since: incremental_since.clone().or(opts.since.clone()),
        max_wait: std::time::Duration::from_secs(6 * 3600),
        max_poll: opts.max_poll,
    };
    let exported = crate::bulk::export(client, &export, dir).await?;
    let io = |e: crate::fhir::files::ReadError| match e {
        crate::fhir::files::ReadError::Io { path, source } => crate::bulk::BulkError::Io { path, source },
        crate::fhir::files::ReadError::Empty(path) => crate::bulk::BulkError::Io {
            path,
            source: std::io::Error::other("no files"),
        },
    };
    let mut read = match saved {
        Some((facts, _)) => crate::pipeline::apply_delta(facts, &exported.files, &exported.deleted, cfg, as_of).map_err(io)?,
        // Only this export's files: the folder may hold an earlier export's.
        None => crate::read_facts_files(&exported.files, cfg, as_of, None).map_err(io)?,
    };
    read.issues.extend(exported.issues.iter().cloned());
    if let (Some(st), Some(t), true) = (state, &exported.transaction_time, full || incremental_since.is_some()) {
        st.save_facts(&read.facts, t)?;
    }
    Ok((
        read,
        BulkOutcome {
            exported,
            incremental_since,
        },
    ))
}

/// Results handed over per run: enough that the state stores them in few transactions, few
/// enough that a run with its explanations (kilobytes a result) stays small.
const RUN: usize = 2048;

/// A sweep's outcome, read in passes (the state, then write-back and the report) without
/// holding its verdicts: a patient's facts are a few hundred bytes, its results with their
/// explanations several kilobytes per trial, and a cohort can be millions of patients. The
/// facts are evaluated again at each pass.
pub struct Swept {
    /// Every screened patient's facts, in patient order.
    pub facts: Vec<crate::facts::held::Held>,
    /// Results not made from `facts`: patients in error, in report order.
    pub results: Vec<TrialResult>,
    /// The patients a resumed run screened before its interruption, in order: their verdicts
    /// are read back from the state as they are handed over.
    pub earlier: Vec<String>,
    pub totals: crate::Totals,
}

impl Swept {
    pub fn of_facts(read: crate::FactsRead, cfg: &Config, as_of: Date) -> Swept {
        let mut provenance = cfg.provenance.clone();
        provenance.sources.extend(read.inputs);
        Swept {
            totals: crate::Totals {
                as_of,
                patients: read.facts.len(),
                unmapped: read.unmapped,
                issues: read.issues,
                provenance,
            },
            facts: read.facts,
            results: Vec::new(),
            earlier: Vec::new(),
        }
    }

    /// Hands the results to `each` in report order (patient, then trial), a run at a time,
    /// and stops at its first error. The facts are evaluated in `detail`; the results held
    /// are given as they are, and the `earlier` ones read from `state` a few patients at a
    /// time. Every call evaluates again: the same facts give the same results.
    pub fn each_run<E: From<crate::state::StateError>>(
        &self,
        cfg: &Config,
        decisions: &Decisions,
        detail: crate::criteria::Detail,
        state: Option<&crate::state::State>,
        each: &mut dyn FnMut(&[TrialResult]) -> Result<(), E>,
    ) -> Result<(), E> {
        if state.is_none() && !self.earlier.is_empty() {
            return Err(crate::state::StateError::NotGiven(self.earlier.len()).into());
        }
        let mut kept = Kept {
            errors: self.results.iter().peekable(),
            earlier: &self.earlier,
            page: std::collections::VecDeque::new(),
            state,
            cfg,
        };
        let mut run: Vec<TrialResult> = Vec::with_capacity(RUN);
        // Moves the kept results before `bound` (all: None) into `run`, handing full runs over.
        let mut merge = |bound: Option<&str>, run: &mut Vec<TrialResult>| -> Result<(), E> {
            while kept.take_before(bound, run)? {
                each(run)?;
                run.clear();
            }
            Ok(())
        };
        let mut failed = None;
        crate::pipeline::evaluate_held(&self.facts, cfg, self.totals.as_of, decisions, detail, None, &mut |results| {
            for r in results {
                // Kept and evaluated patients are disjoint, each in patient order: merged.
                if let Err(e) = merge(Some(&r.patient), &mut run) {
                    failed = Some(e);
                    return false;
                }
                run.push(r);
            }
            true
        });
        if let Some(e) = failed {
            return Err(e);
        }
        merge(None, &mut run)?;
        run.chunks(RUN).try_for_each(each)
    }

    /// Every result, held: for a cohort small enough.
    pub fn into_screening(
        self,
        cfg: &Config,
        decisions: &Decisions,
        state: Option<&crate::state::State>,
    ) -> Result<Screening, crate::state::StateError> {
        let mut results = Vec::new();
        self.each_run(cfg, decisions, crate::criteria::Detail::Full, state, &mut |run| {
            results.extend_from_slice(run);
            Ok::<(), crate::state::StateError>(())
        })?;
        Ok(self.totals.with(results))
    }
}

/// Patients whose earlier verdicts are read from the state at once.
const PAGE: usize = 200;

/// The results a sweep does not evaluate, in report order: those it holds (patients in
/// error) and a resumed run's earlier verdicts, read from the state a page at a time.
struct Kept<'a> {
    errors: std::iter::Peekable<std::slice::Iter<'a, TrialResult>>,
    /// The earlier patients not yet read.
    earlier: &'a [String],
    /// Read, not yet handed over.
    page: std::collections::VecDeque<TrialResult>,
    state: Option<&'a crate::state::State>,
    cfg: &'a Config,
}

impl Kept<'_> {
    /// Moves the results of patients before `bound` (all of them: None) into `run` until it
    /// holds a run's worth; true if it stopped there (more may follow).
    fn take_before(&mut self, bound: Option<&str>, run: &mut Vec<TrialResult>) -> Result<bool, crate::state::StateError> {
        let before = |p: &str| bound.is_none_or(|b| p < b);
        loop {
            if run.len() >= RUN {
                return Ok(true);
            }
            if self.page.is_empty() && self.earlier.first().is_some_and(|p| before(p)) {
                self.read_page()?;
            }
            let error = self.errors.peek().map(|r| r.patient.as_str()).filter(|p| before(p));
            let earlier = self.page.front().map(|r| r.patient.as_str()).filter(|p| before(p));
            match (error, earlier) {
                (Some(e), Some(p)) if p < e => run.extend(self.page.pop_front()),
                (Some(_), _) => run.extend(self.errors.next().cloned()),
                (None, Some(_)) => run.extend(self.page.pop_front()),
                (None, None) => return Ok(false),
            }
        }
    }

    fn read_page(&mut self) -> Result<(), crate::state::StateError> {
        let Some(state) = self.state else {
            return Err(crate::state::StateError::NotGiven(self.earlier.len()));
        };
        let (now, rest) = self.earlier.split_at(PAGE.min(self.earlier.len()));
        let mut rows = state.done_of(now)?;
        rows.sort_by(|a, b| {
            a.patient
                .cmp(&b.patient)
                .then_with(|| trial_order(self.cfg, &a.trial).cmp(&trial_order(self.cfg, &b.trial)))
        });
        self.page.extend(rows);
        self.earlier = rest;
        Ok(())
    }
}

fn trial_order(cfg: &Config, id: &str) -> usize {
    cfg.trials.iter().position(|t| t.id == id).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_searches_name_every_patient_and_include_medications() {
        let plan = Plan {
            types: vec!["Patient".to_string(), "Observation".to_string(), "MedicationRequest".to_string()],
            page_size: 100,
            have_patients: false,
            observation_filter: Some(("combo-code", "2160-0,8480-6".into())),
        };
        let s: Vec<String> = searches(&plan, &["a".into(), "b c".into()])
            .into_iter()
            .map(|s| format!("{}?{}", s.kind, s.query))
            .collect();
        assert_eq!(
            s,
            [
                "Patient?_id=a,b%20c&_count=100",
                "Observation?patient=a,b%20c&combo-code=2160-0,8480-6&_count=100",
                "MedicationRequest?patient=a,b%20c&_count=100&_include=MedicationRequest:medication",
            ]
        );
        assert_eq!(with_count("Condition?code=x", 5), "Condition?code=x&_count=5");
    }

    /// Results evaluated from facts, held (errors) and read back from the state (a resumed
    /// run's earlier verdicts) come out merged in report order (patient, then the trials in
    /// configuration order), over several runs and pages, and each pass the same.
    #[test]
    fn evaluated_held_and_earlier_results_are_merged_in_report_order() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        // In configuration order belimumab comes first; in the database's (and in byte
        // order), NCT06535412 does.
        let trials = ["belimumab-multitarget-ln".to_string(), "NCT06535412".to_string()];
        let cfg = crate::load_config(&root.join("mappings"), &root.join("config/trials"), &trials).unwrap();
        let order: Vec<String> = cfg.trials.iter().map(|t| t.id.clone()).collect();
        let as_of = Date::parse("2026-06-01").unwrap();
        let key = |i: usize| format!("Patient/p{i:05}");
        let result = |i: usize, trial: &str, record: &str| TrialResult {
            patient: key(i),
            person: None,
            trial: trial.into(),
            status: if record == "held" { Status::Error } else { Status::Ineligible },
            record: Some(record.into()),
            decided_by: Vec::new(),
            criteria: Vec::new(),
            facts: Vec::new(),
        };
        // Interleaved so that between two evaluated patients an error comes before an earlier
        // one and after another: 5,000 patients, 10,000 results, several runs, and more earlier
        // patients than a page.
        let n = 5000;
        let source = |i: usize| ["evaluated", "held", "earlier", "earlier", "held"][i % 5];
        let facts = (0..n)
            .filter(|&i| source(i) == "evaluated")
            .map(|i| crate::facts::held::Held::new(key(i), crate::facts::Demographics::default()))
            .collect();
        let results = (0..n)
            .filter(|&i| source(i) == "held")
            .flat_map(|i| order.iter().map(move |t| result(i, t, "held")))
            .collect();
        let dir = std::env::temp_dir().join(format!("trialgate-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut state =
            crate::state::State::open(&crate::state::Location::File(dir.join("s.sqlite")), "run", "cohort", "2026-06-01").unwrap();
        // Saved trial by trial, the last first: the state's own order is not the report's.
        for t in order.iter().rev() {
            let rows: Vec<TrialResult> = (0..n)
                .filter(|&i| source(i) == "earlier")
                .map(|i| result(i, t, "earlier"))
                .collect();
            state.save(&rows).unwrap();
        }
        let mut earlier = state.done_patients().unwrap();
        earlier.sort();
        let swept = Swept {
            facts,
            results,
            earlier,
            totals: crate::Totals {
                as_of,
                patients: n,
                unmapped: Default::default(),
                issues: Vec::new(),
                provenance: cfg.provenance.clone(),
            },
        };
        let expected: Vec<(String, String, &str)> = (0..n)
            .flat_map(|i| order.iter().map(move |t| (key(i), t.clone(), source(i))))
            .collect();
        let pass = || {
            let mut seen: Vec<(String, String, &str)> = Vec::new();
            let mut runs = 0;
            swept
                .each_run::<crate::state::StateError>(
                    &cfg,
                    &Decisions::default(),
                    crate::criteria::Detail::Outcome,
                    Some(&state),
                    &mut |run| {
                        runs += 1;
                        seen.extend(run.iter().map(|r| {
                            let from = match r.record.as_deref() {
                                Some("held") => "held",
                                Some("earlier") => "earlier",
                                _ => "evaluated",
                            };
                            (r.patient.clone(), r.trial.clone(), from)
                        }));
                        Ok(())
                    },
                )
                .unwrap();
            (seen, runs)
        };
        let (seen, runs) = pass();
        assert_eq!(seen.len(), expected.len());
        assert!(
            seen == expected,
            "first difference at {:?}",
            seen.iter().zip(&expected).position(|(a, b)| a != b)
        );
        assert!(runs >= 4, "{runs} run(s)");
        assert_eq!(pass().0, expected);
        // An error from `each` stops the pass and is returned.
        let mut calls = 0;
        let stopped = swept.each_run(
            &cfg,
            &Decisions::default(),
            crate::criteria::Detail::Outcome,
            Some(&state),
            &mut |_| {
                calls += 1;
                Err(crate::state::StateError::NotGiven(7))
            },
        );
        assert!(matches!(stopped, Err(crate::state::StateError::NotGiven(7))), "{stopped:?}");
        assert_eq!(calls, 1);
        // Earlier verdicts without the state they are in: an error, not a report without them.
        let missing = swept.each_run::<crate::state::StateError>(
            &cfg,
            &Decisions::default(),
            crate::criteria::Detail::Outcome,
            None,
            &mut |_| Ok(()),
        );
        assert!(matches!(missing, Err(crate::state::StateError::NotGiven(2000))), "{missing:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
