//! The only place that speaks FHIR on disk. `files` turns paths into parsed resources with
//! their locations; `record` names resources and resolves references between them.

pub mod client;
pub mod files;
pub mod model;
pub mod record;
pub mod scan;
pub mod shape;
pub mod smart;

use model::*;
use serde_json::value::RawValue;

/// One parsed resource of a kind some criterion can use.
#[derive(Debug, Clone)]
pub enum Resource {
    Patient(Patient),
    Observation(Box<Observation>, Option<Box<RawValue>>),
    Condition(Box<Condition>),
    MedicationRequest(Box<MedicationRequest>),
    MedicationStatement(Box<MedicationStatement>),
    MedicationAdministration(Box<MedicationAdministration>),
    Medication(Box<Medication>),
    Procedure(Box<Procedure>),
    Immunization(Box<Immunization>),
    AllergyIntolerance(Box<AllergyIntolerance>),
    DiagnosticReport(Box<DiagnosticReport>),
}

impl Resource {
    pub fn type_name(&self) -> &'static str {
        match self {
            Resource::Patient(_) => "Patient",
            Resource::Observation(..) => "Observation",
            Resource::Condition(_) => "Condition",
            Resource::MedicationRequest(_) => "MedicationRequest",
            Resource::MedicationStatement(_) => "MedicationStatement",
            Resource::MedicationAdministration(_) => "MedicationAdministration",
            Resource::Medication(_) => "Medication",
            Resource::Procedure(_) => "Procedure",
            Resource::Immunization(_) => "Immunization",
            Resource::AllergyIntolerance(_) => "AllergyIntolerance",
            Resource::DiagnosticReport(_) => "DiagnosticReport",
        }
    }

    pub fn id(&self) -> Option<&str> {
        match self {
            Resource::Patient(r) => r.id.as_deref(),
            Resource::Observation(r, _) => r.id.as_deref(),
            Resource::Condition(r) => r.id.as_deref(),
            Resource::MedicationRequest(r) => r.id.as_deref(),
            Resource::MedicationStatement(r) => r.id.as_deref(),
            Resource::MedicationAdministration(r) => r.id.as_deref(),
            Resource::Medication(r) => r.id.as_deref(),
            Resource::Procedure(r) => r.id.as_deref(),
            Resource::Immunization(r) => r.id.as_deref(),
            Resource::AllergyIntolerance(r) => r.id.as_deref(),
            Resource::DiagnosticReport(r) => r.id.as_deref(),
        }
    }

    /// The Medication a medication record points at (not a contained one), if any.
    pub fn medication_reference(&self) -> Option<&str> {
        let r = match self {
            Resource::MedicationRequest(r) => r.medication_reference.as_ref(),
            Resource::MedicationStatement(r) => r.medication_reference.as_ref(),
            Resource::MedicationAdministration(r) => r.medication_reference.as_ref(),
            _ => None,
        };
        r.and_then(|r| r.reference.as_deref()).filter(|r| !r.starts_with('#'))
    }

    /// The reference to the patient this resource is about, if it has one.
    pub fn patient_reference(&self) -> Option<&str> {
        let r = match self {
            Resource::Patient(_) | Resource::Medication(_) => return None,
            Resource::Observation(r, _) => r.subject.as_ref(),
            Resource::Condition(r) => r.subject.as_ref(),
            Resource::MedicationRequest(r) => r.subject.as_ref(),
            Resource::MedicationStatement(r) => r.subject.as_ref(),
            Resource::MedicationAdministration(r) => r.subject.as_ref(),
            Resource::Procedure(r) => r.subject.as_ref(),
            Resource::Immunization(r) => r.patient.as_ref(),
            Resource::AllergyIntolerance(r) => r.patient.as_ref(),
            Resource::DiagnosticReport(r) => r.subject.as_ref(),
        };
        r.and_then(|r| r.reference.as_deref())
    }
}

/// Resource types trialgate reads; every other type is skipped without being parsed.
pub const READ_TYPES: &[&str] = &[
    "Patient",
    "Observation",
    "Condition",
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "Medication",
    "Procedure",
    "Immunization",
    "AllergyIntolerance",
    "DiagnosticReport",
];

/// A problem with one piece of input: where it is and what is wrong. Never fatal to the run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InputIssue {
    pub location: String,
    pub message: String,
}

/// `str::trim`, at the cost of two byte tests when there is nothing to trim, as for nearly
/// every value of an export: `str::trim` decodes characters from both ends first, which cost
/// more than the hash lookup that follows on the hot paths. A byte above `' '` and below 0x80
/// is an ASCII character that is not white space, and ends a trim.
#[inline]
pub fn trim(s: &str) -> &str {
    let plain = |b: u8| b > b' ' && b < 0x80;
    match s.as_bytes() {
        [first, .., last] if plain(*first) && plain(*last) => s,
        [only] if plain(*only) => s,
        _ => s.trim(),
    }
}

/// Percent-encodes a search parameter value for a URL or a form body. Commas stay, since they
/// separate the values of one parameter (`patient=a,b`, `code=x,y`); `|` and everything else
/// outside the unreserved set are encoded.
pub fn query_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b',' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every string of up to three characters from a set holding ASCII white space, other
    /// control characters, DEL, Unicode white space (NEL, no-break space, em space, the
    /// ideographic space) and non-ASCII characters that are not white space.
    #[test]
    fn trim_is_str_trim() {
        let chars = [
            ' ', '\t', '\n', '\r', '\x0b', '\x0c', '\x1c', '\x00', '\x7f', 'a', '-', '~', '\u{85}', '\u{a0}', '\u{2003}', '\u{3000}', 'é',
            '😀',
        ];
        let mut cases = vec![String::new()];
        let mut longest = cases.clone();
        for _ in 0..3 {
            longest = longest.iter().flat_map(|s| chars.iter().map(move |c| format!("{s}{c}"))).collect();
            cases.extend(longest.iter().cloned());
        }
        assert_eq!(cases.len(), 1 + 18 + 18 * 18 + 18 * 18 * 18);
        for s in &cases {
            assert_eq!(trim(s), s.trim(), "{s:?}");
            assert_eq!(trim(s).as_ptr(), s.trim().as_ptr(), "{s:?}");
        }
    }
}
