//! Per-patient facts built up as resources stream in, so that no resource outlives the moment
//! it is read: each is reduced to the few facts the mappings take from it and dropped.
//!
//! Input can come in any order. A resource is reduced as soon as its patient (and the
//! Medication it points at, if any) is known; one that comes before them is kept aside and
//! reduced at the end, when everything has been read. Bulk Data exports, where Patient.ndjson
//! is read first, keep nothing aside.
//!
//! The reduction can run on several threads at once: each works against a frozen
//! [`Registry`] (patients and Medications known so far) and returns a [`Partial`]; partials
//! are absorbed in input order, so the facts are the same whatever the thread timing.

use super::extract::{demographics, extract_one};
use super::mappings::Mappings;
use super::{Demographics, PatientFacts, Unmapped};
use crate::fhir::files::Parsed;
use crate::fhir::record::{MedicationIndex, normalize_reference, reference_for};
use crate::fhir::{InputIssue, Resource};
use crate::time::Window;
use std::collections::HashMap;
use std::sync::Arc;

/// One of N disjoint parts of a cohort, chosen by a stable hash of the patient id, so that N
/// processes (anywhere, in any order) split a cohort with no overlap and no gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 0-based.
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// `K/N` with 1 ≤ K ≤ N, as a batch scheduler numbers its workers from 1.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let err = || format!("`{s}`: give K/N with 1 ≤ K ≤ N, such as 2/4");
        let (k, n) = s.split_once('/').ok_or_else(err)?;
        let (k, n): (u32, u32) = (k.trim().parse().map_err(|_| err())?, n.trim().parse().map_err(|_| err())?);
        if k == 0 || n == 0 || k > n {
            return Err(err());
        }
        Ok(Shard { index: k - 1, count: n })
    }

    /// Whether this shard holds the patient with this id (or `Patient/<id>` key). FNV-1a:
    /// the same on every machine and in every version, unlike the standard library's hasher.
    pub fn holds(&self, id_or_key: &str) -> bool {
        use std::hash::Hasher;
        let id = id_or_key.strip_prefix("Patient/").unwrap_or(id_or_key);
        let mut h = Fnv::default();
        h.write(id.as_bytes());
        h.finish() % u64::from(self.count) == u64::from(self.index)
    }
}

/// A hasher for patient keys, looked up once per resource: SipHash's protection against
/// crafted collisions costs more than it is worth for ids that come from the hospital's own
/// export. FNV-1a, one multiply per byte.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FastHash = std::hash::BuildHasherDefault<Fnv>;

/// The patients and Medications known at some point of the input.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    alias: HashMap<String, usize, FastHash>,
    demographics: Vec<Demographics>,
    /// Per patient, whether this process screens it (see [`Shard`]).
    mine: Vec<bool>,
    meds: MedicationIndex,
    /// Per lab, the span of time in which values can matter (None: keep all).
    spans: Option<Arc<Vec<Option<Window>>>>,
}

impl Registry {
    fn patient_of(&self, target: &str) -> Option<usize> {
        self.alias
            .get(target)
            .copied()
            .or_else(|| normalize_reference(target).and_then(|n| self.alias.get(&n).copied()))
    }
}

/// A resource read but not reduced yet, with its place in the input.
#[derive(Debug)]
struct Deferred {
    order: u64,
    parsed: Parsed,
}

/// What reducing one run of resources against a frozen registry gave.
#[derive(Debug, Default)]
pub struct Partial {
    facts: HashMap<usize, PatientFacts>,
    /// Patients and Medications, registered when the partial is absorbed.
    structural: Vec<Deferred>,
    deferred: Vec<Deferred>,
    unreferenced: usize,
    unmapped: Unmapped,
}

impl Partial {
    /// Reduces one resource; `order` is its place in the input (for resources kept aside).
    pub fn add(&mut self, reg: &Registry, order: u64, parsed: Parsed, m: &Mappings) {
        let later = Deferred { order, parsed };
        let resource = &later.parsed.resource;
        if matches!(resource, Resource::Patient(_) | Resource::Medication(_)) {
            self.structural.push(later);
            return;
        }
        let Some(target) = resource.patient_reference() else {
            self.unreferenced += 1;
            return;
        };
        let patient = reg.patient_of(target);
        let med_missing = resource.medication_reference().is_some_and(|r| reg.meds.get(r).is_none());
        // Without an id, a resource is named by its place in the input, known only at the end.
        let (Some(patient), false, Some(id)) = (patient, med_missing, resource.id()) else {
            self.deferred.push(later);
            return;
        };
        if !reg.mine[patient] {
            return; // another shard's patient
        }
        let reference = format!("{}/{id}", resource.type_name());
        let f = self.facts.entry(patient).or_default();
        extract_one(
            &reference,
            resource,
            &reg.demographics[patient],
            &reg.meds,
            m,
            reg.spans.as_deref().map(Vec::as_slice),
            &mut self.unmapped,
            f,
        );
    }
}

/// Every patient's facts so far.
#[derive(Debug, Default)]
pub struct FactStore {
    registry: Registry,
    facts: Vec<PatientFacts>,
    deferred: Vec<Deferred>,
    unreferenced: usize,
    duplicates: usize,
    unmapped: Unmapped,
    /// Resources fed one at a time so far (their order, for those kept aside).
    fed: u64,
    snapshot: Option<Arc<Registry>>,
    shard: Option<Shard>,
}

/// Order numbers of resources fed one at a time sort after those of every parallel run.
const FED_BASE: u64 = 1 << 62;

impl FactStore {
    /// A store that keeps, of each lab, only the values inside its span (see
    /// [`crate::criteria::eval::lab_spans`]): what keeps memory flat however long the history.
    pub fn keeping(spans: Vec<Option<Window>>) -> FactStore {
        let mut store = FactStore::default();
        store.registry.spans = Some(Arc::new(spans));
        store
    }

    /// Screens only the patients of `shard`; the others are still registered (so that their
    /// resources are told apart from those of patients not in the input) but not reduced.
    pub fn sharded(mut self, shard: Option<Shard>) -> FactStore {
        self.shard = shard;
        self
    }

    /// The registry as it stands, for reducing a run of resources on other threads.
    pub fn registry(&mut self) -> Arc<Registry> {
        self.snapshot.get_or_insert_with(|| Arc::new(self.registry.clone())).clone()
    }

    fn register(&mut self, d: Deferred) {
        // Only a nameless Patient or Medication (no id, no fullUrl) is named by number.
        let i = self.facts.len();
        match d.parsed.resource {
            Resource::Patient(patient) => {
                let key = match (&patient.id, &d.parsed.full_url) {
                    (Some(id), _) => format!("Patient/{id}"),
                    (None, Some(url)) => url.clone(),
                    (None, None) => format!("Patient#{i}"),
                };
                let existing = self.registry.alias.get(&key).copied();
                let index = existing.unwrap_or(self.facts.len());
                if let Some(url) = &d.parsed.full_url {
                    self.registry.alias.insert(url.clone(), index);
                }
                if existing.is_some() {
                    // The same patient in two files (a Bundle per encounter): keep the first.
                    self.duplicates += 1;
                    return;
                }
                self.registry.alias.insert(key.clone(), index);
                self.registry.demographics.push(demographics(&patient));
                self.registry.mine.push(self.shard.is_none_or(|s| s.holds(&key)));
                self.facts.push(PatientFacts { key, ..Default::default() });
            }
            Resource::Medication(med) => {
                let reference = reference_for(&Resource::Medication(med.clone()), d.parsed.full_url.as_deref(), i);
                if let Some(url) = &d.parsed.full_url {
                    self.registry.meds.insert(url.clone(), (*med).clone());
                }
                self.registry.meds.insert(reference, *med);
            }
            _ => return,
        }
        self.snapshot = None;
    }

    /// Drops the registry handed out for other threads, once they are done with it: it is a
    /// copy of every patient's entry.
    pub fn release(&mut self) {
        self.snapshot = None;
    }

    /// Merges a run reduced elsewhere. Runs must be absorbed in input order.
    pub fn absorb(&mut self, p: Partial) {
        for d in p.structural {
            self.register(d);
        }
        // Lab values outside their span were never built (extract_one skips them): nothing
        // to prune here.
        for (patient, f) in p.facts {
            let held = &mut self.facts[patient];
            held.absorb(f);
            // Vectors grow by doubling: trimmed, a patient costs what it holds, not up to twice.
            held.shrink();
        }
        self.deferred.extend(p.deferred);
        self.unreferenced += p.unreferenced;
        self.unmapped.merge(p.unmapped);
    }

    /// Reduces one resource now, against everything read so far.
    pub fn feed(&mut self, parsed: Parsed, m: &Mappings) {
        let order = FED_BASE + self.fed;
        self.fed += 1;
        if matches!(parsed.resource, Resource::Patient(_) | Resource::Medication(_)) {
            self.register(Deferred { order, parsed });
            return;
        }
        let mut p = Partial::default();
        p.add(&self.registry, order, parsed, m);
        self.absorb(p);
    }

    /// Reduces what was kept aside, now that everything is known, and hands over every
    /// patient's facts (sorted by patient key), the issues found and the unmapped codes.
    pub fn finish(mut self, m: &Mappings) -> (Vec<PatientFacts>, Vec<InputIssue>, Unmapped) {
        let mut deferred = std::mem::take(&mut self.deferred);
        deferred.sort_by_key(|d| d.order);
        let mut orphans = 0usize;
        let mut nameless = 0usize;
        for d in deferred {
            let resource = &d.parsed.resource;
            let Some(patient) = resource.patient_reference().and_then(|t| self.registry.patient_of(t)) else {
                orphans += 1;
                continue;
            };
            if !self.registry.mine[patient] {
                continue;
            }
            let reference = match (resource.id(), &d.parsed.full_url) {
                (Some(_), _) | (None, Some(_)) => reference_for(resource, d.parsed.full_url.as_deref(), 0),
                (None, None) => {
                    nameless += 1;
                    reference_for(resource, None, nameless)
                }
            };
            let f = &mut self.facts[patient];
            extract_one(
                &reference,
                resource,
                &self.registry.demographics[patient],
                &self.registry.meds,
                m,
                self.registry.spans.as_deref().map(Vec::as_slice),
                &mut self.unmapped,
                f,
            );
        }
        let mut issues = Vec::new();
        let mut say = |n: usize, message: String| {
            if n > 0 {
                issues.push(InputIssue {
                    location: "input".into(),
                    message,
                });
            }
        };
        say(
            orphans,
            format!("{orphans} resource(s) refer to a patient that is not in the input; skipped"),
        );
        say(
            self.unreferenced,
            format!("{} resource(s) have no subject/patient reference; skipped", self.unreferenced),
        );
        say(
            self.duplicates,
            format!(
                "{} Patient resource(s) appear more than once; the first copy of each was used",
                self.duplicates
            ),
        );
        let mut facts: Vec<PatientFacts> = self
            .facts
            .into_iter()
            .zip(self.registry.demographics)
            .zip(self.registry.mine)
            .filter(|(_, mine)| *mine)
            .map(|((mut f, d), _)| {
                f.demographics = d;
                f
            })
            .collect();
        facts.sort_by(|a, b| a.key.cmp(&b.key));
        tracing::debug!(
            patients = facts.len(),
            lab_values = facts.iter().map(|f| f.labs.values().map(Vec::len).sum::<usize>()).sum::<usize>(),
            conditions = facts.iter().map(|f| f.conditions.len()).sum::<usize>(),
            "facts held"
        );
        (facts, issues, self.unmapped)
    }
}
