//! Resources -> facts. A patient's resources are reduced, one at a time, into the few typed and
//! dated facts the rules read (lab values in canonical units, coded conditions with their
//! status and dates, medication exposures, procedures...), each with its provenance. Validity
//! rules (statuses that do not count, refuted diagnoses, not-taken medications) are applied
//! here, once, so the evaluator never sees a record it must ignore.

pub mod derive;
pub mod extract;
pub mod fast;
pub mod held;
pub mod mappings;
pub mod person;
pub mod store;

use crate::time::{Date, Instant};
use std::collections::{BTreeMap, HashMap};

/// A numeric value that may be only a bound (`<0.1`, `>90`), as labs report it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bounded {
    pub value: f64,
    /// `None`: exact; `Some(Less)`: the true value is at most `value`; `Some(Greater)`: at least.
    pub bound: Option<Bound>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Bound {
    AtMost,
    AtLeast,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Reading {
    /// A number converted to the lab's canonical unit.
    Number(Bounded),
    /// A number whose unit the mapping cannot convert; it decides nothing.
    Unconvertible { raw_unit: String },
    /// A comparator the mapping cannot interpret (`ad`).
    BadComparator(String),
    /// A qualitative result (`positive`, `negative`...).
    Result(String),
}

/// A patient's lab values by lab index. Looked up for every lab rule of every trial a
/// patient is screened for: a fast hasher (the keys are small integers of our own).
pub type Labs = HashMap<usize, Vec<LabValue>, store::FastHash>;

/// One usable lab measurement.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LabValue {
    pub resource: String,
    /// The Observation's own id, the tie-breaker between two results at the same instant.
    pub tie: String,
    pub time: Instant,
    pub code: String,
    pub equation: Option<String>,
    pub raw_value: Option<f64>,
    pub raw_text: Option<String>,
    pub raw_unit: Option<String>,
    pub reading: Reading,
    /// Upper limit of normal from this Observation's own referenceRange, in canonical units.
    pub uln: Option<f64>,
}

/// A coded condition that counts (not refuted, not entered in error).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ConditionFact {
    pub resource: String,
    pub sets: Vec<usize>,
    pub code: String,
    /// `active`, `recurrence`, `relapse`, `inactive`, `remission`, `resolved`, or None when absent.
    pub clinical: Option<String>,
    /// When it began, as a half-open range (a partial date such as `2010` is a whole year).
    pub onset: Option<(Instant, Instant)>,
    /// When it ended, as a half-open range.
    pub abatement: Option<(Instant, Instant)>,
    /// abatementBoolean true: over, date unknown.
    pub abated_undated: bool,
    pub recorded: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MedSource {
    Request,
    Statement,
    Administration,
}

/// A medication exposure: a period during which the patient had (or was to have) the drug.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MedicationFact {
    pub resource: String,
    pub source: MedSource,
    pub sets: Vec<usize>,
    pub code: String,
    pub start: Option<Instant>,
    /// None with `ongoing`: still going; None without: a single point at `start`.
    pub end: Option<Instant>,
    pub ongoing: bool,
    /// The order or statement says the course is over (completed, stopped): never current,
    /// whatever end date it carries.
    pub finished: bool,
    /// Route sets matched (`route-oral`, `route-intravenous`), from the dosage or the product.
    pub routes: Vec<usize>,
    /// Dose given, in grams (MedicationAdministration only).
    pub dose_g: Option<f64>,
    pub dose_text: Option<String>,
}

/// A dated coded event: a Procedure, an Immunization.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EventFact {
    pub resource: String,
    pub sets: Vec<usize>,
    pub code: String,
    pub time: Option<Instant>,
    pub end: Option<Instant>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AllergyFact {
    pub resource: String,
    pub sets: Vec<usize>,
    pub code: String,
}

/// A kidney (or other) biopsy with the classes its report codes, if any.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BiopsyFact {
    pub kind: String,
    pub resource: String,
    pub time: Option<Instant>,
    pub classes: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Deceased {
    /// When, if the record says so in a usable form; None: deceased at an unknown time.
    pub when: Option<Instant>,
    pub text: String,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Demographics {
    pub birth_date: Option<Date>,
    pub birth_text: Option<String>,
    pub gender: Option<String>,
    pub deceased: Option<Deceased>,
    pub inactive: bool,
    pub replaced_by: Option<String>,
    /// Name and MRN for the coordinator's page; read by no rule. (Default: fact states
    /// stored before it existed.)
    #[serde(default)]
    pub person: Option<Person>,
}

/// What reducing a resource reads of its patient: the sex and birth date that reference
/// ranges (and so ULN multiples) depend on. Held for every patient while a cohort is read,
/// apart from the rest of the demographics, which only the rules read.
#[derive(Debug, Clone, Default)]
pub struct Basics {
    pub birth_date: Option<Date>,
    pub gender: Option<Box<str>>,
}

impl Basics {
    pub fn of(d: &Demographics) -> Basics {
        Basics {
            birth_date: d.birth_date,
            gender: d.gender.as_deref().map(Box::from),
        }
    }
}

/// Who the patient is, for authorised staff: shown in reports and on the coordinator's page,
/// never logged.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Person {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mrn: Option<String>,
}

/// Which kinds of record the patient has at all: a rule about a kind the feed never sent
/// cannot say "absent", only "unknown".
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Present {
    pub observations: bool,
    pub conditions: bool,
    pub medications: bool,
    pub procedures: bool,
    pub immunizations: bool,
    pub allergies: bool,
    pub reports: bool,
}

impl Present {
    /// Adds the kinds of record `b` saw.
    pub fn or(&mut self, b: Present) {
        self.observations |= b.observations;
        self.conditions |= b.conditions;
        self.medications |= b.medications;
        self.procedures |= b.procedures;
        self.immunizations |= b.immunizations;
        self.allergies |= b.allergies;
        self.reports |= b.reports;
    }
}

/// Everything the rules may read about one patient.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PatientFacts {
    pub key: String,
    pub demographics: Demographics,
    /// Lab values by lab index, in no particular order.
    pub labs: Labs,
    pub conditions: Vec<ConditionFact>,
    pub medications: Vec<MedicationFact>,
    pub procedures: Vec<EventFact>,
    pub immunizations: Vec<EventFact>,
    pub allergies: Vec<AllergyFact>,
    pub biopsies: Vec<BiopsyFact>,
    pub present: Present,
}

impl PatientFacts {
    /// Drops every fact taken from `resource` (`Observation/123`): it was amended, entered in
    /// error or deleted, and its new version (if any) is read again.
    pub fn forget(&mut self, resource: &str) {
        self.labs.values_mut().for_each(|v| v.retain(|x| x.resource != resource));
        self.labs.retain(|_, v| !v.is_empty());
        self.conditions.retain(|x| x.resource != resource);
        self.medications.retain(|x| x.resource != resource);
        self.procedures.retain(|x| x.resource != resource);
        self.immunizations.retain(|x| x.resource != resource);
        self.allergies.retain(|x| x.resource != resource);
        self.biopsies.retain(|x| x.resource != resource);
    }

    /// Keeps only the lab values inside their lab's span (`criteria::eval::lab_spans`); a
    /// lab with no span is read by no rule and goes entirely.
    pub fn keep_within(&mut self, spans: &[Option<crate::time::Window>]) {
        self.labs.retain(|lab, values| match spans.get(*lab).copied().flatten() {
            Some(w) => {
                values.retain(|v| w.contains(v.time));
                !values.is_empty()
            }
            None => false,
        });
    }

    /// Every resource some fact was taken from.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        let labs = self.labs.values().flatten().map(|x| x.resource.as_str());
        labs.chain(self.conditions.iter().map(|x| x.resource.as_str()))
            .chain(self.medications.iter().map(|x| x.resource.as_str()))
            .chain(self.procedures.iter().map(|x| x.resource.as_str()))
            .chain(self.immunizations.iter().map(|x| x.resource.as_str()))
            .chain(self.allergies.iter().map(|x| x.resource.as_str()))
            .chain(self.biopsies.iter().map(|x| x.resource.as_str()))
    }
}

/// Codes and units seen in the data that no mapping could use, for tuning mappings.
#[derive(Debug, Clone, Default)]
pub struct Unmapped {
    pub counts: BTreeMap<(String, String, String), usize>,
}

impl Unmapped {
    pub fn add(&mut self, system: &str, code: &str, unit: &str) {
        *self
            .counts
            .entry((system.to_string(), code.to_string(), unit.to_string()))
            .or_default() += 1;
    }

    pub fn merge(&mut self, other: Unmapped) {
        for (k, v) in other.counts {
            *self.counts.entry(k).or_default() += v;
        }
    }
}
