//! Write-back: one FHIR R4 ResearchSubject per patient and trial, idempotently.
//!
//! Each trial is bound to a ResearchStudy found by its identifier (created with a conditional
//! create only when absent). Each ResearchSubject carries a deterministic identifier derived
//! from (trial, patient), so a second run finds what the first wrote: new subjects go in with
//! a conditional create (`ifNoneExist`), changed ones with an update guarded by `ifMatch`
//! against lost updates, unchanged ones are not sent at all. trialgate owns only the three
//! statuses it computes (potential-candidate, eligible, ineligible): a subject a person has
//! moved on (screening, on-study, withdrawn...) is never touched. Writes travel in batch
//! Bundles, not one request per resource. R4 ResearchSubject has no element for the reasons,
//! so the narrative (`text`, XHTML) says which criteria decided and which need a person.

use crate::criteria::eval::TrialResult;
use crate::criteria::trial::Trial;
use crate::criteria::{Kind, Outcome, Status};
use crate::fhir::client::{ClientError, FhirClient};
use crate::fhir::query_encode;
use crate::time::Date;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;

/// Identifier system of the ResearchSubjects trialgate writes; the value is `<trial>:<patient>`.
pub const SUBJECT_SYSTEM: &str = "urn:trialgate:research-subject";
/// Identifier system of the ResearchStudies trialgate binds trials to; the value is the trial id.
pub const STUDY_SYSTEM: &str = "urn:trialgate:trial";
/// The statuses trialgate computes and may change; any other belongs to a person.
const OWNED: [&str; 3] = ["potential-candidate", "eligible", "ineligible"];
/// The R5 `ResearchSubject.progress` element as an R4 extension (package hl7.fhir.uv.xver-r5.r4).
pub const PROGRESS_EXTENSION: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-ResearchSubject.progress";
/// Entries per batch Bundle.
const BATCH: usize = 100;
/// Up to this many patients, their existing subjects are searched by identifier.
const FEW: usize = 20;
/// Identifiers per lookup search: about 90 characters each once encoded, so a URL of a few KB,
/// which every server takes.
const LOOKUP: usize = 40;
/// The most subjects of one study held from its listing (about 200 bytes each): a study with
/// more has its subjects looked up by identifier instead, run by run, so that write-back's
/// memory does not grow with the cohort.
pub const LISTING_LIMIT: usize = 50_000;

#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Also write patients found ineligible (by default only candidates are written, and an
    /// already written one that turns ineligible is updated).
    pub write_ineligible: bool,
    /// Plan the writes and return them without sending them.
    pub dry_run: bool,
    /// A study with more subjects than this on the server has them looked up by identifier
    /// rather than listed and held ([`LISTING_LIMIT`]).
    pub listing_limit: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            write_ineligible: false,
            dry_run: false,
            listing_limit: LISTING_LIMIT,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WriteSummary {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// Subjects a person has moved to a status trialgate does not own.
    pub left_alone: usize,
    /// Results not written by policy (ineligible without --write-ineligible, errors).
    pub not_written: usize,
    /// Writes the server refused, with its reason.
    pub failed: Vec<(String, String)>,
    /// In a dry run, the batch entries that would be sent, in the order they would be
    /// (empty otherwise: a cohort's worth of ResearchSubjects is sent batch by batch, not
    /// kept), less those [`Writer::take_planned`] has handed over already.
    pub planned: Vec<Value>,
}

/// Prints a dry run's planned entries as one batch Bundle, as they come, laid out as
/// `serde_json::to_string_pretty` lays the whole Bundle out: a cohort's plan is never held.
pub struct BundlePrinter<W: std::io::Write> {
    out: W,
    entries: usize,
}

impl<W: std::io::Write> BundlePrinter<W> {
    const HEAD: &'static str = "{\n  \"resourceType\": \"Bundle\",\n  \"type\": \"batch\",\n  \"entry\": [";

    pub fn new(out: W) -> Self {
        BundlePrinter { out, entries: 0 }
    }

    pub fn entry(&mut self, entry: &Value) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(entry)?;
        let lead = if self.entries == 0 { Self::HEAD } else { "," };
        write!(self.out, "{lead}")?;
        // String values escape their newlines, so every line break is the layout's own.
        for line in text.lines() {
            write!(self.out, "\n    {line}")?;
        }
        self.entries += 1;
        Ok(())
    }

    /// Ends the Bundle (and its last line) and flushes it.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.entries == 0 {
            writeln!(self.out, "{}]\n}}", Self::HEAD)?;
        } else {
            writeln!(self.out, "\n  ]\n}}")?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The R4 ResearchSubject.status for a screening status; None for an error (nothing to say).
pub fn r4_status(s: Status) -> Option<&'static str> {
    match s {
        Status::Eligible => Some("eligible"),
        Status::PotentiallyEligible => Some("potential-candidate"),
        Status::Ineligible => Some("ineligible"),
        Status::Error => None,
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The narrative a coordinator reads on the ResearchSubject: the status, what decided it, and
/// what is unknown or needs a person. Valid XHTML, as R4 narrative requires.
fn narrative(trial: &Trial, r: &TrialResult, as_of: Date) -> String {
    let mut html = format!(
        "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>trialgate screening for {} ({}) as of {}: <b>{}</b></p>",
        escape(&trial.title),
        escape(&trial.id),
        as_of,
        r.status.as_str()
    );
    if let Some(rec) = &r.record {
        html.push_str(&format!("<p>Not a candidate: {}</p>", escape(rec)));
    }
    let list = |title: &str, items: Vec<String>| {
        if items.is_empty() {
            String::new()
        } else {
            format!(
                "<p>{title}</p><ul>{}</ul>",
                items.iter().map(|i| format!("<li>{i}</li>")).collect::<String>()
            )
        }
    };
    let item = |c: &crate::criteria::eval::CriterionResult| format!("{} ({}): {}", escape(&c.id), c.kind.as_str(), escape(&c.reason));
    let deciding = r
        .criteria
        .iter()
        .filter(|c| (c.kind == Kind::Inclusion && c.outcome == Outcome::NotMet) || (c.kind == Kind::Exclusion && c.outcome == Outcome::Met))
        .map(item)
        .collect();
    html.push_str(&list("Decided by:", deciding));
    html.push_str(&list(
        "Unknown (data missing or unusable):",
        r.criteria.iter().filter(|c| c.outcome == Outcome::Unknown).map(item).collect(),
    ));
    html.push_str(&list(
        "Needs a person:",
        r.criteria.iter().filter(|c| c.outcome == Outcome::Manual).map(item).collect(),
    ));
    html.push_str("</div>");
    html
}

/// The ResearchSubject for one result.
pub fn research_subject(trial: &Trial, study_id: &str, r: &TrialResult, status: &str, as_of: Date, id: Option<&str>) -> Value {
    let mut s = json!({
        "resourceType": "ResearchSubject",
        "identifier": [{"system": SUBJECT_SYSTEM, "value": format!("{}:{}", trial.id, r.patient)}],
        "status": status,
        "study": {"reference": format!("ResearchStudy/{study_id}")},
        "individual": {"reference": r.patient},
        "text": {"status": "generated", "div": narrative(trial, r, as_of)},
        // R5 separates the subject's state from the resource's status: carry it with the R5
        // cross-version extension too, for systems that read R5 semantics on an R4 server.
        "extension": [{
            "url": PROGRESS_EXTENSION,
            "extension": [
                {"url": "type", "valueCodeableConcept": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/research-subject-state-type", "code": "Enrollment"}]}},
                {"url": "subjectState", "valueCodeableConcept": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/research-subject-state", "code": status}]}},
                {"url": "startDate", "valueDateTime": as_of.to_string()},
            ],
        }],
    });
    if let Some(id) = id {
        s["id"] = json!(id);
    }
    s
}

#[derive(Deserialize)]
struct Ident {
    system: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "versionId")]
    version_id: Option<String>,
}

#[derive(Deserialize)]
struct Subject {
    id: Option<String>,
    status: Option<String>,
    #[serde(default)]
    identifier: Vec<Ident>,
    meta: Option<Meta>,
}

/// A subject already on the server: its id, status and version (empty when the server gave
/// none) in one allocation, since a study's listing may hold tens of thousands of them.
struct Existing {
    text: Box<str>,
    id_end: u32,
    status_end: u32,
}

impl Existing {
    fn new(id: &str, status: &str, version: Option<&str>) -> Existing {
        let text: Box<str> = [id, status, version.unwrap_or("")].concat().into();
        // FHIR ids and codes are at most 64 characters; saturating keeps an absurd one whole
        // in `id` rather than wrapping into the other fields.
        let id_end = u32::try_from(id.len()).unwrap_or(u32::MAX);
        let status_end = u32::try_from(id.len() + status.len()).unwrap_or(u32::MAX);
        Existing { text, id_end, status_end }
    }

    fn id(&self) -> &str {
        self.text.get(..self.id_end as usize).unwrap_or(&self.text)
    }

    fn status(&self) -> &str {
        self.text.get(self.id_end as usize..self.status_end as usize).unwrap_or("")
    }

    fn version(&self) -> Option<&str> {
        self.text.get(self.status_end as usize..).filter(|v| !v.is_empty())
    }
}

/// The ResearchStudy a trial is bound to (created only when absent).
pub fn research_study(trial: &Trial) -> Value {
    json!({
        "resourceType": "ResearchStudy",
        "identifier": [{"system": STUDY_SYSTEM, "value": trial.id}],
        "title": trial.title,
        "status": "active",
    })
}

/// Finds the trial's ResearchStudy by identifier, creating it only when absent.
async fn bind_study(client: &FhirClient, trial: &Trial) -> Result<String, ClientError> {
    let study = research_study(trial);
    let resp = client
        .post(
            "ResearchStudy",
            study.to_string(),
            vec![
                ("If-None-Exist", format!("identifier={STUDY_SYSTEM}|{}", trial.id)),
                ("Prefer", "return=representation".into()),
            ],
        )
        .await?;
    resp.resource_id().ok_or_else(|| ClientError::Body {
        url: client.url("ResearchStudy"),
        message: "the server created the ResearchStudy but returned neither its body nor a Location".into(),
    })
}

/// The ResearchSubjects already on the server for a study, by identifier value, read page by
/// page; `None` once there are more than `limit` (the listing is dropped, not held).
async fn existing(client: &FhirClient, study_id: &str, limit: usize) -> Result<Option<HashMap<Box<str>, Existing>>, ClientError> {
    let mut out = HashMap::new();
    let mut over = false;
    let search = format!("ResearchSubject?study=ResearchStudy/{study_id}&_count=500");
    client
        .search_each(&search, |url, body| {
            read_subjects(url, &body, &mut out)?;
            over = out.len() > limit;
            Ok(!over)
        })
        .await?;
    Ok((!over).then_some(out))
}

/// The ResearchSubjects a search finds, by identifier value.
async fn subjects(client: &FhirClient, search: &str) -> Result<HashMap<Box<str>, Existing>, ClientError> {
    let mut out = HashMap::new();
    client
        .search_each(search, |url, body| read_subjects(url, &body, &mut out).map(|_| true))
        .await?;
    Ok(out)
}

/// The subjects `mine` already has on the server, looked up by identifier, `LOOKUP` to a
/// search (one URL of a few KB).
async fn look_up(client: &FhirClient, trial: &Trial, mine: &[&TrialResult]) -> Result<HashMap<Box<str>, Existing>, ClientError> {
    let mut out = HashMap::new();
    for chunk in mine.chunks(LOOKUP) {
        let idents: Vec<String> = chunk
            .iter()
            .map(|r| query_encode(&format!("{SUBJECT_SYSTEM}|{}:{}", trial.id, r.patient)))
            .collect();
        out.extend(subjects(client, &format!("ResearchSubject?identifier={}", idents.join(","))).await?);
    }
    Ok(out)
}

/// Adds the ResearchSubjects of one searchset page to `out`, by identifier value.
fn read_subjects(url: &str, body: &str, out: &mut HashMap<Box<str>, Existing>) -> Result<(), ClientError> {
    #[derive(Deserialize)]
    struct Entry {
        resource: Option<Value>,
    }
    #[derive(Deserialize)]
    struct Page {
        #[serde(default)]
        entry: Vec<Entry>,
    }
    let page: Page = serde_json::from_str(body).map_err(|e| ClientError::Body {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    for e in page.entry {
        let Some(s) = e.resource.and_then(|v| serde_json::from_value::<Subject>(v).ok()) else {
            continue;
        };
        let Some(value) = s
            .identifier
            .iter()
            .find(|i| i.system.as_deref() == Some(SUBJECT_SYSTEM))
            .and_then(|i| i.value.clone())
        else {
            continue;
        };
        if let (Some(id), Some(status)) = (s.id, s.status) {
            out.insert(
                value.into_boxed_str(),
                Existing::new(&id, &status, s.meta.as_ref().and_then(|m| m.version_id.as_deref())),
            );
        }
    }
    Ok(())
}

/// Writes the ResearchSubjects for `results` (every trial in `trials`) to `client`'s server.
pub async fn write_back(
    client: &FhirClient,
    trials: &[Trial],
    results: &[TrialResult],
    as_of: Date,
    opts: &WriteOptions,
) -> Result<WriteSummary, ClientError> {
    let expected = trials.iter().map(|t| results.iter().filter(|r| r.trial == t.id).count()).collect();
    let mut w = Writer::new(client, trials, as_of, opts, expected);
    w.add(results).await?;
    w.finish().await
}

/// Writes ResearchSubjects as a run's results come, a run of them at a time, so that a
/// cohort is written without holding its verdicts: each trial's ResearchStudy is bound, and
/// the subjects it already has are listed, once for the whole cohort, not once per run.
/// A trial's subjects fill its own batch, sent when full; what is left of every trial goes
/// at the end, in trial order. A dry run plans the same batches in the same order, and hands
/// full ones over as they fill ([`Writer::take_planned`]), so that it holds no more.
pub struct Writer<'a> {
    client: &'a FhirClient,
    trials: &'a [Trial],
    as_of: Date,
    opts: WriteOptions,
    /// Per trial (in `trials`' order): how many results to expect, until it is bound.
    expected: Vec<usize>,
    /// Per trial, once it has results.
    bound: Vec<Option<Bound>>,
    /// Updates the server refused because the subject changed since it was read (412): most
    /// often our own earlier attempt, applied before its response was lost and the batch sent
    /// again; otherwise someone else's edit. Either way, look again rather than overwrite.
    conflicts: Vec<(String, String)>,
    summary: WriteSummary,
}

/// A trial's ResearchStudy and what is known of its subjects.
struct Bound {
    study: String,
    /// The subjects the study had when it was bound, by identifier value; `None` when they are
    /// looked up by identifier as results come instead: for a few patients (a notification,
    /// one posted patient), where listing every subject of a study would cost pages per
    /// event, and for a study too large to hold ([`WriteOptions::listing_limit`]).
    listed: Option<HashMap<Box<str>, Existing>>,
    /// The batch being filled.
    entries: Vec<(String, Value)>,
}

impl<'a> Writer<'a> {
    /// A writer for `trials`, expecting `expected[i]` results for the i-th (a trial with no
    /// figure is taken to have many).
    pub fn new(client: &'a FhirClient, trials: &'a [Trial], as_of: Date, opts: &WriteOptions, expected: Vec<usize>) -> Writer<'a> {
        Writer {
            client,
            trials,
            as_of,
            opts: opts.clone(),
            expected,
            bound: trials.iter().map(|_| None).collect(),
            conflicts: Vec::new(),
            summary: WriteSummary::default(),
        }
    }

    /// Writes (or, in a dry run, plans) the ResearchSubjects of some results; full batches are
    /// sent as they fill.
    pub async fn add(&mut self, results: &[TrialResult]) -> Result<(), ClientError> {
        let (client, trials, as_of) = (self.client, self.trials, self.as_of);
        for (k, trial) in trials.iter().enumerate() {
            let mine: Vec<&TrialResult> = results.iter().filter(|r| r.trial == trial.id).collect();
            if mine.is_empty() {
                continue;
            }
            let b = match &mut self.bound[k] {
                Some(b) => b,
                none => {
                    let study = bind_study(client, trial).await?;
                    let few = self.expected.get(k).is_some_and(|&n| n <= FEW);
                    let listed = if few {
                        None
                    } else {
                        let listed = existing(client, &study, self.opts.listing_limit).await?;
                        if listed.is_none() {
                            tracing::info!(
                                trial = %trial.id,
                                limit = self.opts.listing_limit,
                                "the study has more ResearchSubjects than are held; they are looked up by identifier, {LOOKUP} to a search"
                            );
                        }
                        listed
                    };
                    none.insert(Bound {
                        study,
                        listed,
                        entries: Vec::new(),
                    })
                }
            };
            let looked_up;
            let have = match &b.listed {
                Some(listed) => listed,
                None => {
                    // An error has nothing to write, so nothing to look up.
                    let written: Vec<&TrialResult> = mine.iter().copied().filter(|r| r4_status(r.status).is_some()).collect();
                    looked_up = look_up(client, trial, &written).await?;
                    &looked_up
                }
            };
            for r in mine {
                let Some(status) = r4_status(r.status) else {
                    self.summary.not_written += 1;
                    continue;
                };
                let ident = format!("{}:{}", trial.id, r.patient);
                match have.get(ident.as_str()) {
                    Some(e) if !OWNED.contains(&e.status()) => self.summary.left_alone += 1,
                    Some(e) if e.status() == status => self.summary.unchanged += 1,
                    Some(e) => {
                        let mut request = json!({"method": "PUT", "url": format!("ResearchSubject/{}", e.id())});
                        if let Some(v) = e.version() {
                            request["ifMatch"] = json!(format!("W/\"{v}\""));
                        }
                        let resource = research_subject(trial, &b.study, r, status, as_of, Some(e.id()));
                        b.entries.push((ident, json!({"resource": resource, "request": request})));
                    }
                    None if status == "ineligible" && !self.opts.write_ineligible => self.summary.not_written += 1,
                    None => {
                        let resource = research_subject(trial, &b.study, r, status, as_of, None);
                        let request = json!({"method": "POST", "url": "ResearchSubject", "ifNoneExist": format!("identifier={SUBJECT_SYSTEM}|{ident}")});
                        b.entries.push((ident, json!({"resource": resource, "request": request})));
                    }
                }
                // Sent as soon as a batch is full: a cohort's ResearchSubjects (a few KB each,
                // with their narrative) are never all held at once.
                if b.entries.len() == BATCH {
                    if self.opts.dry_run {
                        self.summary.planned.extend(b.entries.drain(..).map(|(_, e)| e));
                    } else {
                        send_batch(client, &b.entries, &mut self.summary, &mut self.conflicts).await?;
                        b.entries.clear();
                    }
                }
            }
        }
        Ok(())
    }

    /// In a dry run, the entries planned in batches filled so far, handed over (to be printed)
    /// rather than kept.
    pub fn take_planned(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.summary.planned)
    }

    /// Sends what is left, reads again the subjects that changed under this run, and says
    /// what was done (in a dry run, the entries that would have been sent).
    pub async fn finish(mut self) -> Result<WriteSummary, ClientError> {
        let client = self.client;
        // The trials' last batches, together: an event about one patient is one request.
        let left: Vec<(String, Value)> = self.bound.into_iter().flatten().flat_map(|b| b.entries).collect();
        if self.opts.dry_run {
            self.summary.planned.extend(left.into_iter().map(|(_, e)| e));
            return Ok(self.summary);
        }
        for entries in left.chunks(BATCH) {
            send_batch(client, entries, &mut self.summary, &mut self.conflicts).await?;
        }
        for (ident, wanted) in std::mem::take(&mut self.conflicts) {
            let search = format!("ResearchSubject?identifier={}", query_encode(&format!("{SUBJECT_SYSTEM}|{ident}")));
            let now = subjects(client, &search).await?;
            match now.get(ident.as_str()) {
                Some(e) if e.status() == wanted => self.summary.updated += 1,
                Some(e) if !OWNED.contains(&e.status()) => self.summary.left_alone += 1,
                _ => self.summary.failed.push((
                    ident,
                    "412: the ResearchSubject changed on the server while this run wrote it; run again to re-decide".into(),
                )),
            }
        }
        Ok(self.summary)
    }
}

/// Sends one batch of ResearchSubject writes and counts what the server answered; updates
/// refused with 412 go to `conflicts`, to be read again.
async fn send_batch(
    client: &FhirClient,
    chunk: &[(String, Value)],
    summary: &mut WriteSummary,
    conflicts: &mut Vec<(String, String)>,
) -> Result<(), ClientError> {
    #[derive(Deserialize)]
    struct EntryResponse {
        status: Option<String>,
        outcome: Option<Value>,
    }
    #[derive(Deserialize)]
    struct RespEntry {
        response: Option<EntryResponse>,
    }
    #[derive(Deserialize)]
    struct BatchResponse {
        #[serde(default)]
        entry: Vec<RespEntry>,
    }
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": chunk.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>()});
    let resp = client.post("", bundle.to_string(), Vec::new()).await?;
    let parsed: BatchResponse = serde_json::from_str(&resp.body).map_err(|e| ClientError::Body {
        url: client.base().to_string(),
        message: e.to_string(),
    })?;
    for (i, (ident, entry)) in chunk.iter().enumerate() {
        let code = parsed
            .entry
            .get(i)
            .and_then(|e| e.response.as_ref())
            .and_then(|r| r.status.clone())
            .unwrap_or_default();
        let created = entry["request"]["method"] == "POST";
        match code.split_whitespace().next().and_then(|c| c.parse::<u16>().ok()) {
            Some(201) => summary.created += 1,
            // 200 to a conditional create: it already existed (another process wrote it).
            Some(200) if created => summary.unchanged += 1,
            Some(200) => summary.updated += 1,
            Some(412) if !created => {
                let wanted = entry["resource"]["status"].as_str().unwrap_or_default().to_string();
                conflicts.push((ident.clone(), wanted));
            }
            _ => {
                let outcome = parsed
                    .entry
                    .get(i)
                    .and_then(|e| e.response.as_ref())
                    .and_then(|r| r.outcome.as_ref())
                    .map(|o| o.to_string())
                    .unwrap_or_default();
                summary.failed.push((ident.clone(), format!("{code} {outcome}").trim().to_string()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_r4_codes() {
        assert_eq!(r4_status(Status::PotentiallyEligible), Some("potential-candidate"));
        assert_eq!(r4_status(Status::Eligible), Some("eligible"));
        assert_eq!(r4_status(Status::Ineligible), Some("ineligible"));
        assert_eq!(r4_status(Status::Error), None);
    }

    #[test]
    fn narrative_text_is_escaped() {
        assert_eq!(escape("UPCR <0.2 & eGFR >60"), "UPCR &lt;0.2 &amp; eGFR &gt;60");
    }
}
