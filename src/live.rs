//! What `serve` does with the configured FHIR server: screening a patient again when a
//! Subscription notification says their record changed (or when `$screen` asks), recording
//! the verdicts in the history, and writing a changed status back as a ResearchSubject; and
//! finding the server's own Patient for a posted one, by MRN.
//!
//! A re-screen reads the patient through the same path as `sweep` (`sweep::sweep` with one
//! id), so a notification, a `$screen` and a nightly sweep give the same verdict.

use crate::criteria::decisions::Decisions;
use crate::criteria::eval::TrialResult;
use crate::fhir::client::{ClientError, FhirClient};
use crate::notify::{Kind, Notification};
use crate::state::{Change, Ledger, StateError};
use crate::sweep::{Cohort, SweepOptions};
use crate::time::Date;
use crate::writeback::{WriteOptions, WriteSummary};
use crate::{Config, Screening};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("the FHIR server: {0}")]
    Server(ClientError),
    #[error("{0}")]
    State(StateError),
    #[error("write-back: {0}")]
    WriteBack(ClientError),
    #[error("{0}")]
    Internal(String),
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct LiveStats {
    pub notifications: Mutex<HashMap<&'static str, u64>>,
    pub rescreens: AtomicU64,
    pub rescreen_failures: AtomicU64,
    pub status_changes: AtomicU64,
    pub written: AtomicU64,
    pub gaps: AtomicU64,
    /// Time from a notification's arrival to its write-back done, summed, in microseconds.
    pub notify_to_written_us: AtomicU64,
    pub notify_to_written_count: AtomicU64,
}

/// The last event seen per Subscription, to notice a gap in the server's event numbers.
#[derive(Debug, Default, Clone)]
struct Seen {
    number: u64,
    /// When it was seen (or the event's own timestamp): where a `_lastUpdated` repair starts.
    at: String,
}

pub struct Live {
    pub client: FhirClient,
    /// Where ResearchSubjects go; None: verdicts are recorded, not written.
    pub writer: Option<FhirClient>,
    pub write_opts: WriteOptions,
    pub code_filter: bool,
    ledger: Option<Arc<Mutex<Ledger>>>,
    seen: Mutex<HashMap<String, Seen>>,
    /// Patients being screened now, and whether another change arrived meanwhile.
    inflight: Mutex<HashMap<String, bool>>,
    /// Re-screens at once.
    slots: tokio::sync::Semaphore,
    /// Notifications still being worked on in the background (for a graceful shutdown).
    working: Arc<std::sync::atomic::AtomicUsize>,
    pub stats: LiveStats,
}

/// Counts one piece of background work for as long as it lives.
pub struct Working(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Working {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one re-screen did.
pub struct Rescreen {
    pub screening: Screening,
    pub changes: Vec<Change>,
    pub written: Option<WriteSummary>,
}

impl Live {
    pub fn new(
        client: FhirClient,
        writer: Option<FhirClient>,
        write_opts: WriteOptions,
        code_filter: bool,
        ledger: Option<Ledger>,
    ) -> Live {
        // The events seen before a restart: without them, the first event after it could not
        // tell what was missed while the service was down.
        let seen = match ledger.as_ref().map(Ledger::events_seen) {
            Some(Ok(rows)) => rows.into_iter().map(|(sub, number, at)| (sub, Seen { number, at })).collect(),
            Some(Err(e)) => {
                tracing::warn!("the Subscription events seen before are not known ({e}): gaps from before this start go unnoticed");
                HashMap::new()
            }
            None => HashMap::new(),
        };
        Live {
            client,
            writer,
            write_opts,
            code_filter,
            ledger: ledger.map(|l| Arc::new(Mutex::new(l))),
            seen: Mutex::new(seen),
            inflight: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(4),
            working: Arc::default(),
            stats: LiveStats::default(),
        }
    }

    /// Reads `patients` from the server and screens them as a sweep would; records the
    /// verdicts in the history (when a state database is configured) and writes the changed
    /// ones back (when write-back is configured). Verdicts in `error` are reported, never
    /// recorded or written. `trials` limits it to those trials (empty: all).
    pub async fn rescreen(
        &self,
        cfg: &Config,
        patients: Vec<String>,
        as_of: Date,
        source: &'static str,
        write: bool,
        trials: &[String],
    ) -> Result<Rescreen, LiveError> {
        let opts = SweepOptions {
            batch: patients.len().max(1),
            concurrency: 2,
            code_filter: self.code_filter,
            cohort: Cohort::Ids(patients),
            report_progress: false,
            ..Default::default()
        };
        self.stats.rescreens.fetch_add(1, Ordering::Relaxed);
        let (mut screening, _) = crate::sweep::sweep(&self.client, cfg, as_of, &Decisions::default(), &opts, None)
            .await
            .map_err(|e| match e {
                crate::sweep::SweepError::Cohort(c) => LiveError::Server(c),
                crate::sweep::SweepError::State(s) => LiveError::State(s),
            })?;
        if !trials.is_empty() {
            screening.results.retain(|r| trials.contains(&r.trial));
        }
        self.record_and_write(cfg, screening, as_of, source, write).await
    }

    /// Records verdicts and, with `write` and a writer configured, writes back those whose
    /// status changed since the latest known.
    pub async fn record_and_write(
        &self,
        cfg: &Config,
        screening: Screening,
        as_of: Date,
        source: &'static str,
        write: bool,
    ) -> Result<Rescreen, LiveError> {
        // The history holds today's verdicts: a what-if at another date, not written back,
        // leaves it alone.
        if as_of != Date::today_utc() && !write {
            return Ok(Rescreen {
                screening,
                changes: Vec::new(),
                written: None,
            });
        }
        let changes = self.record(&screening.results, source).await?;
        self.stats.status_changes.fetch_add(changes.len() as u64, Ordering::Relaxed);
        let mut written = None;
        if let (Some(writer), true) = (&self.writer, write) {
            // Without a history every verdict is written: write-back itself skips the unchanged.
            let to_write: Vec<TrialResult> = if self.ledger.is_some() {
                let changed: BTreeSet<(&str, &str)> = changes.iter().map(|c| (c.patient.as_str(), c.trial.as_str())).collect();
                screening
                    .results
                    .iter()
                    .filter(|r| changed.contains(&(r.patient.as_str(), r.trial.as_str())))
                    .cloned()
                    .collect()
            } else {
                screening.results.clone()
            };
            if !to_write.is_empty() {
                let w = crate::writeback::write_back(writer, &cfg.trials, &to_write, as_of, &self.write_opts)
                    .await
                    .map_err(LiveError::WriteBack)?;
                self.stats.written.fetch_add((w.created + w.updated) as u64, Ordering::Relaxed);
                written = Some(w);
            }
        }
        Ok(Rescreen {
            screening,
            changes,
            written,
        })
    }

    async fn record(&self, results: &[TrialResult], source: &'static str) -> Result<Vec<Change>, LiveError> {
        let Some(ledger) = self.ledger.clone() else {
            return Ok(Vec::new());
        };
        // The database calls block: keep them off the async workers.
        let results = results.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut l = ledger
                .lock()
                .map_err(|_| LiveError::Internal("the history lock is poisoned".into()))?;
            l.record(&results, source).map_err(LiveError::State)
        })
        .await
        .map_err(|_| LiveError::Internal("recording the verdicts failed".into()))?
    }

    /// The latest verdicts the history holds (for the page), if there is a history.
    pub fn latest(&self) -> Result<Vec<crate::state::Latest>, LiveError> {
        let Some(ledger) = &self.ledger else {
            return Ok(Vec::new());
        };
        let mut l = ledger
            .lock()
            .map_err(|_| LiveError::Internal("the history lock is poisoned".into()))?;
        l.latest().map_err(LiveError::State)
    }

    /// Marks background work begun; it ends when the returned value is dropped.
    pub fn begin(&self) -> Working {
        self.working.fetch_add(1, Ordering::SeqCst);
        Working(self.working.clone())
    }

    /// Waits (up to `limit`) for the background work to finish: on shutdown, a notification
    /// already accepted is screened and written rather than dropped.
    pub async fn drain(&self, limit: std::time::Duration) -> usize {
        let started = std::time::Instant::now();
        while self.working.load(Ordering::SeqCst) > 0 && started.elapsed() < limit {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.working.load(Ordering::SeqCst)
    }

    /// Takes a notification: notes its event numbers, and returns the gap to repair, if any.
    pub fn note(&self, n: &Notification) -> Option<(String, u64, u64)> {
        let label = n.kind.as_str();
        if let Ok(mut m) = self.stats.notifications.lock() {
            *m.entry(label).or_default() += 1;
        }
        let sub = n.subscription_id().unwrap_or("unnamed").to_string();
        let mut seen = self.seen.lock().ok()?;
        let last = seen.get(&sub).cloned();
        let mut kept = None;
        let gap = crate::notify::gap(last.as_ref().map(|s| s.number), n);
        let highest = match n.kind {
            Kind::Heartbeat | Kind::Handshake => n.events_since_start,
            _ => n.highest_event(),
        };
        if let Some(h) = highest {
            let at = n
                .events
                .iter()
                .filter_map(|e| e.timestamp.clone())
                .max()
                .or_else(|| last.as_ref().map(|s| s.at.clone()))
                .unwrap_or_else(|| crate::time::Instant::now().to_string());
            let keep = last.as_ref().is_none_or(|s| h >= s.number);
            if keep {
                seen.insert(sub.clone(), Seen { number: h, at: at.clone() });
                kept = Some((h, at));
            }
        }
        drop(seen);
        if let (Some((number, at)), Some(ledger)) = (kept, self.ledger.clone()) {
            let sub = sub.clone();
            let save = move || match ledger.lock() {
                Ok(mut l) => {
                    if let Err(e) = l.event_seen(&sub, number, &at) {
                        tracing::warn!("the Subscription's last event seen is not kept ({e}): a restart would not notice a gap before it");
                    }
                }
                Err(_) => tracing::warn!("the history lock is poisoned: the Subscription's last event seen is not kept"),
            };
            // The database call blocks: off the async workers when there are some.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(save)),
                Err(_) => save(),
            }
        }
        let (from, to) = gap?;
        self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        Some((sub, from, to))
    }

    /// When the events before a gap were seen: where a `_lastUpdated` repair starts.
    fn seen_at(&self, sub: &str) -> Option<String> {
        self.seen.lock().ok()?.get(sub).map(|s| s.at.clone())
    }

    /// The patients a notification is about: from the resources it carries, else by reading
    /// the resources it names (`id-only`), else (an `empty` payload) by asking the server for
    /// what changed since the last event seen.
    pub async fn patients_of(&self, cfg: &Config, n: &Notification) -> Result<BTreeSet<String>, LiveError> {
        let mut patients: BTreeSet<String> = n.resources.iter().filter_map(crate::notify::patient_of).collect();
        let carried: BTreeSet<String> = n
            .resources
            .iter()
            .filter_map(|r| Some(format!("{}/{}", r.get("resourceType")?.as_str()?, r.get("id")?.as_str()?)))
            .collect();
        let mut named: BTreeSet<String> = n.named.iter().cloned().collect();
        named.extend(n.events.iter().filter_map(|e| e.focus.as_deref().and_then(crate::notify::relative)));
        for r in named.difference(&carried) {
            if let Some(id) = r.strip_prefix("Patient/") {
                patients.insert(id.to_string());
                continue;
            }
            match self.client.get(r).await {
                Ok(body) => {
                    if let Some(p) = serde_json::from_str::<Value>(&body)
                        .ok()
                        .as_ref()
                        .and_then(crate::notify::patient_of)
                    {
                        patients.insert(p);
                    }
                }
                // Deleted since: its patient is unknown now; a later sweep sees the deletion.
                Err(ClientError::Status { status: 404 | 410, .. }) => {
                    tracing::info!(kind = r.split('/').next().unwrap_or(""), "a notified resource is gone");
                }
                Err(e) => return Err(LiveError::Server(e)),
            }
        }
        if n.kind == Kind::EventNotification && named.is_empty() && n.resources.is_empty() {
            let since = n.subscription_id().and_then(|s| self.seen_at(s));
            patients.extend(self.changed_since(cfg, since.as_deref()).await?);
        }
        Ok(patients)
    }

    /// The patients whose records of the kinds the trials read changed since `since` (a
    /// `_lastUpdated` search per type); with no `since`, the last hour.
    pub async fn changed_since(&self, cfg: &Config, since: Option<&str>) -> Result<BTreeSet<String>, LiveError> {
        let since = match since {
            Some(s) => s.to_string(),
            None => crate::time::Instant(crate::time::Instant::now().0 - 3600).to_string(),
        };
        let kinds: BTreeSet<&str> = cfg
            .trials
            .iter()
            .flat_map(|t| t.resource_types())
            .filter(|k| *k != "Patient")
            .collect();
        let mut patients = BTreeSet::new();
        for kind in kinds {
            let q = format!("{kind}?_lastUpdated=ge{}&_count=200", crate::fhir::query_encode(&since));
            for page in self.client.search(&q).await.map_err(LiveError::Server)? {
                let Ok(bundle) = serde_json::from_str::<Value>(&page) else {
                    continue;
                };
                for e in bundle.get("entry").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(p) = e.get("resource").and_then(crate::notify::patient_of) {
                        patients.insert(p);
                    }
                }
            }
        }
        Ok(patients)
    }

    /// The events of a gap, asked of the server with `$events`; when it cannot answer, what
    /// changed since the last event seen, by `_lastUpdated`.
    pub async fn repair(&self, cfg: &Config, sub: &str, from: u64, to: u64) -> Result<BTreeSet<String>, LiveError> {
        let q = format!("Subscription/{sub}/$events?eventsSinceNumber={from}&eventsUntilNumber={to}&content=id-only");
        match self.client.get(&q).await {
            Ok(body) => match crate::notify::parse(body.as_bytes()) {
                Ok(n) => return self.patients_of(cfg, &n).await,
                Err(e) => tracing::warn!("$events answered something else than a notification ({e}); asking by _lastUpdated"),
            },
            Err(e) => tracing::warn!("$events failed ({}); asking by _lastUpdated", e.brief()),
        }
        let since = self.seen_at(sub);
        self.changed_since(cfg, since.as_deref()).await
    }

    /// Screens `patient` again, once at a time per patient: a change that arrives while one
    /// is screened has it screened again after, so the last verdict reflects the last change.
    pub async fn rescreen_serially(self: &Arc<Self>, cfg: &Config, patient: String, received: std::time::Instant) {
        {
            let Ok(mut inflight) = self.inflight.lock() else { return };
            if let Some(again) = inflight.get_mut(&patient) {
                *again = true;
                return;
            }
            inflight.insert(patient.clone(), false);
        }
        loop {
            let outcome = match self.slots.acquire().await {
                Ok(_slot) => {
                    self.rescreen(cfg, vec![patient.clone()], Date::today_utc(), "notification", true, &[])
                        .await
                }
                Err(_) => return,
            };
            match outcome {
                Ok(r) => {
                    if r.written.is_some() {
                        let us = received.elapsed().as_micros() as u64;
                        self.stats.notify_to_written_us.fetch_add(us, Ordering::Relaxed);
                        self.stats.notify_to_written_count.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(patient = %patient, changes = r.changes.len(), "re-screened after a notification");
                    tracing::info!(changes = r.changes.len(), "re-screened a patient after a notification");
                }
                Err(e) => {
                    self.stats.rescreen_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("a re-screen after a notification failed: {}", brief(&e));
                }
            }
            let Ok(mut inflight) = self.inflight.lock() else { return };
            match inflight.get_mut(&patient) {
                Some(again) if *again => *again = false,
                _ => {
                    inflight.remove(&patient);
                    return;
                }
            }
        }
    }

    /// Finds the server's Patient with the MRN of a posted one.
    pub async fn resolve_mrn(&self, system: Option<&str>, value: &str) -> Result<Resolved, LiveError> {
        let token = match system {
            Some(s) => format!("{s}|{value}"),
            None => value.to_string(),
        };
        let q = format!("Patient?identifier={}&_elements=id", crate::fhir::query_encode(&token));
        let mut ids = BTreeSet::new();
        for page in self.client.search(&q).await.map_err(LiveError::Server)? {
            let bundle: Value = serde_json::from_str(&page).map_err(|e| {
                LiveError::Server(ClientError::Body {
                    url: self.client.url("Patient"),
                    message: e.to_string(),
                })
            })?;
            for e in bundle.get("entry").and_then(Value::as_array).into_iter().flatten() {
                let r = e.get("resource");
                let is_match = e
                    .get("search")
                    .and_then(|s| s.get("mode"))
                    .and_then(Value::as_str)
                    .is_none_or(|m| m == "match");
                if let (Some("Patient"), Some(id), true) = (
                    r.and_then(|r| r.get("resourceType")).and_then(Value::as_str),
                    r.and_then(|r| r.get("id")).and_then(Value::as_str),
                    is_match,
                ) {
                    ids.insert(id.to_string());
                }
            }
        }
        Ok(match ids.len() {
            0 => Resolved::None,
            1 => Resolved::One(ids.into_iter().next().unwrap_or_default()),
            n => Resolved::Many(n),
        })
    }
}

/// Registers `spec` on the server: updates the Subscription already posting to the same
/// endpoint, else creates one (conditionally, so a retried create makes no duplicate).
/// Returns its id and whether it was created.
pub async fn subscribe(client: &FhirClient, spec: &crate::notify::SubscriptionSpec) -> Result<(String, bool), ClientError> {
    let search = format!("Subscription?url={}", crate::fhir::query_encode(&spec.endpoint));
    let mut existing = None;
    for page in client.search(&search).await? {
        let bundle: Value = serde_json::from_str(&page).map_err(|e| ClientError::Body {
            url: client.url("Subscription"),
            message: e.to_string(),
        })?;
        for e in bundle.get("entry").and_then(Value::as_array).into_iter().flatten() {
            let r = e.get("resource");
            // Servers that ignore the `url` parameter return every Subscription: check.
            let same = r.and_then(|r| r.pointer("/channel/endpoint")).and_then(Value::as_str) == Some(spec.endpoint.as_str());
            if let (true, Some(id)) = (same, r.and_then(|r| r.get("id")).and_then(Value::as_str)) {
                existing = Some(id.to_string());
            }
        }
    }
    let (req, created) = match &existing {
        Some(id) => (
            crate::fhir::client::Request {
                method: reqwest::Method::PUT,
                url: client.url(&format!("Subscription/{id}")),
                body: Some(spec.resource(Some(id)).to_string()),
                headers: Vec::new(),
                fhir: true,
            },
            false,
        ),
        None => (
            crate::fhir::client::Request {
                method: reqwest::Method::POST,
                url: client.url("Subscription"),
                body: Some(spec.resource(None).to_string()),
                headers: vec![
                    ("If-None-Exist", format!("url={}", crate::fhir::query_encode(&spec.endpoint))),
                    ("Prefer", "return=representation".into()),
                ],
                fhir: true,
            },
            true,
        ),
    };
    let resp = client.send(&req).await?;
    let id = existing.or_else(|| resp.resource_id()).ok_or_else(|| ClientError::Body {
        url: client.url("Subscription"),
        message: "the server created the Subscription but returned neither its body nor a Location".into(),
    })?;
    Ok((id, created && resp.status == 201))
}

#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    None,
    One(String),
    Many(usize),
}

/// The fault without URLs (which may name patients), for logs.
pub fn brief(e: &LiveError) -> String {
    match e {
        LiveError::Server(c) | LiveError::WriteBack(c) => c.brief(),
        other => other.to_string(),
    }
}

/// The MRNs of a posted Patient: identifiers typed `MR` (HL7 v2 table 0203).
pub fn mrns(patient: &Value) -> Vec<(Option<String>, String)> {
    patient
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|i| {
            i.get("type")
                .and_then(|t| t.get("coding"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|c| c.get("code").and_then(Value::as_str) == Some("MR"))
        })
        .filter_map(|i| {
            let value = i.get("value").and_then(Value::as_str)?.to_string();
            Some((i.get("system").and_then(Value::as_str).map(str::to_string), value))
        })
        .collect()
}

/// The Patient resources of a posted body: a Bundle's entries, a lone resource, or NDJSON.
pub fn posted_patients(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut take = |v: Value| match v.get("resourceType").and_then(Value::as_str) {
        Some("Patient") => out.push(v),
        Some("Bundle") => {
            for e in v.get("entry").and_then(Value::as_array).into_iter().flatten() {
                if let Some(r) = e
                    .get("resource")
                    .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Patient"))
                {
                    out.push(r.clone());
                }
            }
        }
        _ => {}
    };
    match serde_json::from_str::<Value>(text) {
        Ok(v) => take(v),
        Err(_) => text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .for_each(&mut take),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mrns_are_the_identifiers_typed_mr() {
        let p = json!({"resourceType": "Patient", "identifier": [
            {"system": "urn:ssn", "value": "123"},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
             "system": "urn:oid:1.2.3", "value": "MRN-9"}]});
        assert_eq!(mrns(&p), vec![(Some("urn:oid:1.2.3".to_string()), "MRN-9".to_string())]);
        assert!(mrns(&json!({"resourceType": "Patient"})).is_empty());
    }

    #[test]
    fn posted_patients_from_every_shape() {
        let p = json!({"resourceType": "Patient", "id": "a"});
        let bundle = json!({"resourceType": "Bundle", "entry": [{"resource": p}, {"resource": {"resourceType": "Observation"}}]});
        assert_eq!(posted_patients(&bundle.to_string()).len(), 1);
        assert_eq!(posted_patients(&p.to_string()).len(), 1);
        let nd = format!("{p}\n{}\n", json!({"resourceType": "Patient", "id": "b"}));
        assert_eq!(posted_patients(&nd).len(), 2);
        assert!(posted_patients("garbage").is_empty());
    }
}
