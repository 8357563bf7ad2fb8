//! Groups parsed resources into one record per patient.
//!
//! A resource belongs to the patient its `subject` (or `patient`) reference points at. The
//! reference is resolved through Bundle `fullUrl`s first (so `urn:uuid:` references work in
//! bundles without ids), then as `Patient/<id>` (absolute URLs and `_history` suffixes are
//! reduced to that form). Resources that point at no patient in the input are counted and
//! reported, never silently attached to someone.

use super::files::Parsed;
use super::model::{Medication, Patient};
use super::{InputIssue, Resource};
use std::collections::{BTreeMap, HashMap};

/// Everything known about one patient, as received.
#[derive(Debug, Clone, Default)]
pub struct PatientRecord {
    /// `Patient/<id>`, or the Bundle fullUrl when the Patient has no id.
    pub key: String,
    pub patient: Patient,
    /// The patient's resources with the reference each is reported under.
    pub resources: Vec<(String, Resource)>,
}

/// Medications that other resources point at with `medicationReference`.
#[derive(Debug, Default)]
pub struct MedicationIndex {
    by_ref: HashMap<String, Medication>,
}

impl MedicationIndex {
    pub fn get(&self, reference: &str) -> Option<&Medication> {
        self.by_ref
            .get(reference)
            .or_else(|| self.by_ref.get(&normalize_reference(reference)?))
    }

    pub fn insert(&mut self, reference: String, med: Medication) {
        self.by_ref.insert(reference, med);
    }
}

#[derive(Debug, Default)]
pub struct Grouped {
    pub records: Vec<PatientRecord>,
    pub medications: MedicationIndex,
    pub issues: Vec<InputIssue>,
}

/// `Observation/<id>` for a resource with an id, else its fullUrl, else a positional label.
pub fn reference_for(resource: &Resource, full_url: Option<&str>, ordinal: usize) -> String {
    match (resource.id(), full_url) {
        (Some(id), _) => format!("{}/{id}", resource.type_name()),
        (None, Some(url)) => url.to_string(),
        (None, None) => format!("{}#{ordinal}", resource.type_name()),
    }
}

/// Reduces `http://x/fhir/Patient/1/_history/2` and `Patient/1` to `Patient/1`.
pub fn normalize_reference(r: &str) -> Option<String> {
    let r = r.split("/_history/").next()?;
    let mut parts = r.rsplit('/');
    let id = parts.next()?;
    let ty = parts.next()?;
    if id.is_empty() || ty.is_empty() || !ty.starts_with(|c: char| c.is_ascii_uppercase()) {
        return None;
    }
    Some(format!("{ty}/{id}"))
}

pub fn group(resources: Vec<Parsed>) -> Grouped {
    let mut out = Grouped::default();
    let mut by_key: BTreeMap<String, PatientRecord> = BTreeMap::new();
    let mut alias: HashMap<String, String> = HashMap::new();
    let mut rest = Vec::new();
    let mut duplicates = 0usize;

    for (i, p) in resources.into_iter().enumerate() {
        match p.resource {
            Resource::Patient(patient) => {
                let key = match (&patient.id, &p.full_url) {
                    (Some(id), _) => format!("Patient/{id}"),
                    (None, Some(url)) => url.clone(),
                    (None, None) => format!("Patient#{i}"),
                };
                if let Some(url) = &p.full_url {
                    alias.insert(url.clone(), key.clone());
                }
                alias.insert(key.clone(), key.clone());
                if by_key.contains_key(&key) {
                    // The same patient in two files (a Bundle per encounter): keep the first.
                    duplicates += 1;
                    continue;
                }
                by_key.insert(
                    key.clone(),
                    PatientRecord {
                        key,
                        patient,
                        resources: Vec::new(),
                    },
                );
            }
            Resource::Medication(med) => {
                let reference = reference_for(&Resource::Medication(med.clone()), p.full_url.as_deref(), i);
                if let Some(url) = &p.full_url {
                    out.medications.insert(url.clone(), (*med).clone());
                }
                out.medications.insert(reference, *med);
            }
            resource => rest.push((i, resource, p.full_url)),
        }
    }

    let mut orphans = 0usize;
    let mut unreferenced = 0usize;
    for (i, resource, full_url) in rest {
        let Some(target) = resource.patient_reference() else {
            unreferenced += 1;
            continue;
        };
        let key = alias
            .get(target)
            .cloned()
            .or_else(|| normalize_reference(target).and_then(|n| alias.get(&n).cloned()));
        match key.and_then(|k| by_key.get_mut(&k)) {
            Some(rec) => {
                let reference = reference_for(&resource, full_url.as_deref(), i);
                rec.resources.push((reference, resource));
            }
            None => orphans += 1,
        }
    }
    if orphans > 0 {
        out.issues.push(InputIssue {
            location: "input".into(),
            message: format!("{orphans} resource(s) refer to a patient that is not in the input; skipped"),
        });
    }
    if unreferenced > 0 {
        out.issues.push(InputIssue {
            location: "input".into(),
            message: format!("{unreferenced} resource(s) have no subject/patient reference; skipped"),
        });
    }
    if duplicates > 0 {
        out.issues.push(InputIssue {
            location: "input".into(),
            message: format!("{duplicates} Patient resource(s) appear more than once; the first copy of each was used"),
        });
    }
    out.records = by_key.into_values().collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize() {
        assert_eq!(
            normalize_reference("http://h/fhir/Patient/7/_history/3").as_deref(),
            Some("Patient/7")
        );
        assert_eq!(normalize_reference("Patient/7").as_deref(), Some("Patient/7"));
        assert_eq!(normalize_reference("urn:uuid:1234"), None);
    }
}
