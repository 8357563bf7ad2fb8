//! References between resources: naming a resource, normalizing a reference, and the index of
//! Medications that medication records point at. Which patient a resource belongs to is
//! decided in `facts::store`: its `subject` (or `patient`) reference, resolved through Bundle
//! `fullUrl`s first (so `urn:uuid:` references work in bundles without ids), then as
//! `Patient/<id>` (absolute URLs and `_history` suffixes reduced to that form).

use super::Resource;
use super::model::Medication;
use std::collections::HashMap;

/// Medications that other resources point at with `medicationReference`.
#[derive(Debug, Default, Clone)]
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
