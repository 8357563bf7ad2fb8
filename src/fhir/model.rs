//! The few FHIR R4 fields trialgate reads, as small typed serde structs.
//!
//! Only what a mapping or a rule uses is declared: serde skips the rest of each resource
//! without building it, which parses several times faster than `serde_json::Value` and keeps
//! memory per resource small. Every field is optional so that a sparse but valid resource
//! parses; a field of the wrong JSON type makes the resource malformed, and the reader reports
//! it with its location and skips it.

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Coding {
    pub system: Option<String>,
    pub code: Option<String>,
    pub display: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CodeableConcept {
    #[serde(default)]
    pub coding: Vec<Coding>,
    pub text: Option<String>,
}

impl CodeableConcept {
    /// True when any coding has one of `codes` (system ignored: used for FHIR's own status
    /// code systems, whose codes are unambiguous).
    pub fn has_code(&self, codes: &[&str]) -> bool {
        self.coding.iter().any(|c| c.code.as_deref().is_some_and(|k| codes.contains(&k)))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Reference {
    pub reference: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Quantity {
    pub value: Option<f64>,
    pub comparator: Option<String>,
    pub unit: Option<String>,
    pub system: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Period {
    pub start: Option<String>,
    pub end: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Range {
    pub low: Option<Quantity>,
    pub high: Option<Quantity>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceRange {
    pub low: Option<Quantity>,
    pub high: Option<Quantity>,
    #[serde(rename = "type")]
    pub kind: Option<CodeableConcept>,
    #[serde(default)]
    pub applies_to: Vec<CodeableConcept>,
    pub age: Option<Range>,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Meta {
    #[serde(rename = "lastUpdated")]
    pub last_updated: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatientLink {
    pub other: Option<Reference>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Patient {
    pub id: Option<String>,
    pub active: Option<bool>,
    pub gender: Option<String>,
    pub birth_date: Option<String>,
    pub deceased_boolean: Option<bool>,
    pub deceased_date_time: Option<String>,
    #[serde(default)]
    pub link: Vec<PatientLink>,
    /// Shown to staff on the coordinator's page only (see `facts::person`).
    #[serde(default)]
    pub name: Lenient<Vec<HumanName>>,
    #[serde(default)]
    pub identifier: Lenient<Vec<Identifier>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HumanName {
    #[serde(rename = "use")]
    pub use_: Option<String>,
    pub text: Option<String>,
    pub family: Option<String>,
    #[serde(default)]
    pub given: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    pub kind: Option<CodeableConcept>,
    pub value: Option<String>,
}

/// A field read for display only: when it is malformed it is dropped, never the resource, so
/// a badly written name cannot keep a patient from being screened.
#[derive(Debug, Clone, Default)]
pub struct Lenient<T>(pub Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either<T> {
            Read(T),
            Other(serde::de::IgnoredAny),
        }
        Ok(match Either::<T>::deserialize(d)? {
            Either::Read(t) => Lenient(Some(t)),
            Either::Other(_) => Lenient(None),
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    pub code: Option<CodeableConcept>,
    pub value_quantity: Option<Quantity>,
    pub value_string: Option<String>,
    pub value_integer: Option<i64>,
    pub value_codeable_concept: Option<CodeableConcept>,
    #[serde(default)]
    pub reference_range: Vec<ReferenceRange>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub id: Option<String>,
    pub status: Option<String>,
    pub code: Option<CodeableConcept>,
    pub subject: Option<Reference>,
    pub effective_date_time: Option<String>,
    pub effective_period: Option<Period>,
    pub effective_instant: Option<String>,
    pub value_quantity: Option<Quantity>,
    pub value_string: Option<String>,
    pub value_integer: Option<i64>,
    pub value_codeable_concept: Option<CodeableConcept>,
    #[serde(default)]
    pub reference_range: Vec<ReferenceRange>,
    #[serde(default)]
    pub component: Vec<Component>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub id: Option<String>,
    pub clinical_status: Option<CodeableConcept>,
    pub verification_status: Option<CodeableConcept>,
    pub code: Option<CodeableConcept>,
    pub subject: Option<Reference>,
    pub onset_date_time: Option<String>,
    pub onset_period: Option<Period>,
    pub abatement_date_time: Option<String>,
    pub abatement_period: Option<Period>,
    pub abatement_boolean: Option<bool>,
    pub recorded_date: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Repeat {
    pub bounds_period: Option<Period>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Timing {
    pub repeat: Option<Repeat>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DoseAndRate {
    pub dose_quantity: Option<Quantity>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dosage {
    pub route: Option<CodeableConcept>,
    pub timing: Option<Timing>,
    #[serde(default)]
    pub dose_and_rate: Vec<DoseAndRate>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DispenseRequest {
    pub validity_period: Option<Period>,
    pub number_of_repeats_allowed: Option<u32>,
    pub expected_supply_duration: Option<Quantity>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationRequest {
    pub id: Option<String>,
    pub status: Option<String>,
    pub intent: Option<String>,
    pub do_not_perform: Option<bool>,
    pub medication_codeable_concept: Option<CodeableConcept>,
    pub medication_reference: Option<Reference>,
    pub subject: Option<Reference>,
    pub authored_on: Option<String>,
    #[serde(default)]
    pub dosage_instruction: Vec<Dosage>,
    pub dispense_request: Option<DispenseRequest>,
    #[serde(default)]
    pub contained: Vec<Medication>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationStatement {
    pub id: Option<String>,
    pub status: Option<String>,
    pub medication_codeable_concept: Option<CodeableConcept>,
    pub medication_reference: Option<Reference>,
    pub subject: Option<Reference>,
    pub effective_date_time: Option<String>,
    pub effective_period: Option<Period>,
    pub date_asserted: Option<String>,
    #[serde(default)]
    pub dosage: Vec<Dosage>,
    #[serde(default)]
    pub contained: Vec<Medication>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdministrationDosage {
    pub route: Option<CodeableConcept>,
    pub dose: Option<Quantity>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationAdministration {
    pub id: Option<String>,
    pub status: Option<String>,
    pub medication_codeable_concept: Option<CodeableConcept>,
    pub medication_reference: Option<Reference>,
    pub subject: Option<Reference>,
    pub effective_date_time: Option<String>,
    pub effective_period: Option<Period>,
    pub dosage: Option<AdministrationDosage>,
    #[serde(default)]
    pub contained: Vec<Medication>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationIngredient {
    pub item_codeable_concept: Option<CodeableConcept>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Medication {
    pub resource_type: Option<String>,
    pub id: Option<String>,
    pub code: Option<CodeableConcept>,
    pub form: Option<CodeableConcept>,
    #[serde(default)]
    pub ingredient: Vec<MedicationIngredient>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Procedure {
    pub id: Option<String>,
    pub status: Option<String>,
    pub code: Option<CodeableConcept>,
    pub subject: Option<Reference>,
    pub performed_date_time: Option<String>,
    pub performed_period: Option<Period>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Immunization {
    pub id: Option<String>,
    pub status: Option<String>,
    pub vaccine_code: Option<CodeableConcept>,
    pub patient: Option<Reference>,
    pub occurrence_date_time: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllergyIntolerance {
    pub id: Option<String>,
    pub clinical_status: Option<CodeableConcept>,
    pub verification_status: Option<CodeableConcept>,
    pub code: Option<CodeableConcept>,
    pub patient: Option<Reference>,
    pub recorded_date: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiagnosticReport {
    pub id: Option<String>,
    pub status: Option<String>,
    pub code: Option<CodeableConcept>,
    pub subject: Option<Reference>,
    pub effective_date_time: Option<String>,
    pub effective_period: Option<Period>,
    pub issued: Option<String>,
    #[serde(default)]
    pub conclusion_code: Vec<CodeableConcept>,
}
