//! Who a patient is, for the people who act on the results: a display name and the medical
//! record number, carried from the Patient to the report and the coordinator's page. No rule
//! reads them, and they never go into a log line.

use super::Person;
use crate::fhir::model::{HumanName, Identifier};

const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";

/// Enough for any real name or MRN; a longer value is cut so that input cannot grow the page.
const MAX_CHARS: usize = 120;

/// A HumanName's parts: of a parsed Patient, or borrowed from a scanned line.
pub trait NameFields {
    fn use_(&self) -> Option<&str>;
    fn text(&self) -> Option<&str>;
    fn family(&self) -> Option<&str>;
    fn given(&self) -> impl Iterator<Item = &str>;
}

/// An Identifier's parts: its type's codings and its value.
pub trait IdFields {
    fn codings(&self) -> impl Iterator<Item = (Option<&str>, Option<&str>)>;
    fn value(&self) -> Option<&str>;
}

impl NameFields for HumanName {
    fn use_(&self) -> Option<&str> {
        self.use_.as_deref()
    }
    fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }
    fn family(&self) -> Option<&str> {
        self.family.as_deref()
    }
    fn given(&self) -> impl Iterator<Item = &str> {
        self.given.iter().map(String::as_str)
    }
}

impl IdFields for Identifier {
    fn codings(&self) -> impl Iterator<Item = (Option<&str>, Option<&str>)> {
        let codings = self.kind.as_ref().map_or(&[][..], |k| &k.coding);
        codings.iter().map(|c| (c.system.as_deref(), c.code.as_deref()))
    }
    fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }
}

/// The display name (the official one if any, else the first not marked `old`) and the MRN
/// (an identifier typed `MR` in v2-0203) of a Patient's names and identifiers. Absent parts
/// stay absent: nothing is guessed.
pub fn person<N: NameFields, I: IdFields>(names: &[N], identifiers: &[I]) -> Option<Person> {
    let name = names
        .iter()
        .find(|n| n.use_() == Some("official"))
        .and_then(display)
        .or_else(|| names.iter().filter(|n| n.use_() != Some("old")).find_map(display));
    let mrn = identifiers.iter().find_map(|i| {
        let typed_mr = i.codings().any(|(system, code)| system == Some(V2_0203) && code == Some("MR"));
        typed_mr.then(|| i.value().and_then(clean)).flatten()
    });
    (name.is_some() || mrn.is_some()).then_some(Person { name, mrn })
}

/// Given names then family name; the name's `text` when it has neither.
fn display(n: &impl NameFields) -> Option<String> {
    let parts: Vec<&str> = n.given().chain(n.family()).collect();
    clean(&parts.join(" ")).or_else(|| n.text().and_then(clean))
}

/// Whitespace collapsed (no line breaks from the data), control characters dropped, length cut.
fn clean(s: &str) -> Option<String> {
    // The usual value (printable ASCII, words one space apart, short) is its own answer:
    // checked in one pass, where the general way builds three strings for every patient.
    let b = s.as_bytes();
    let plain = b.len() <= MAX_CHARS
        && b.first() != Some(&b' ')
        && b.last() != Some(&b' ')
        && b.iter().all(|c| (b' '..0x7f).contains(c))
        && !b.windows(2).any(|w| w == b"  ");
    if plain {
        return (!s.is_empty()).then(|| s.to_string());
    }
    clean_any(s)
}

/// [`clean`] for any value.
fn clean_any(s: &str) -> Option<String> {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let s: String = s.chars().filter(|c| !c.is_control()).take(MAX_CHARS).collect();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick answer for plain values is the general one: every string of up to four
    /// characters from a set with spaces, other white space, control characters and
    /// non-ASCII letters, and strings about the length limit.
    #[test]
    fn plain_values_clean_as_any() {
        let chars = [' ', 'a', 'Z', '-', '\t', '\n', '\x00', '\x7f', '\u{a0}', 'é'];
        let mut cases = vec![String::new()];
        let mut longest = cases.clone();
        for _ in 0..4 {
            longest = longest.iter().flat_map(|s| chars.iter().map(move |c| format!("{s}{c}"))).collect();
            cases.extend(longest.iter().cloned());
        }
        for n in [119, 120, 121, 200] {
            cases.push("a".repeat(n));
            cases.push("ab ".repeat(n / 3));
            cases.push(format!("{} é", "a".repeat(n)));
        }
        assert_eq!(cases.len(), 11111 + 12);
        for s in &cases {
            assert_eq!(clean(s), clean_any(s), "{s:?}");
        }
    }

    fn patient(v: serde_json::Value) -> crate::fhir::model::Patient {
        serde_json::from_value(v).unwrap()
    }

    fn person_of(p: &crate::fhir::model::Patient) -> Option<Person> {
        use crate::facts::extract::PatientFields;
        person(p.names(), p.identifiers())
    }

    #[test]
    fn the_official_name_and_the_typed_mrn_are_taken() {
        let p = patient(serde_json::json!({
            "name": [{"use": "usual", "given": ["Mei"]},
                     {"use": "official", "family": "Zhou", "given": ["Mei", "Lin"], "prefix": ["Dr"]}],
            "identifier": [
                {"system": "urn:ssn", "value": "123-45-6789"},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                 "value": " SH-204417 "}
            ]
        }));
        let who = person_of(&p).unwrap();
        assert_eq!(who.name.as_deref(), Some("Mei Lin Zhou"));
        assert_eq!(who.mrn.as_deref(), Some("SH-204417"));
    }

    #[test]
    fn text_stands_in_and_nothing_is_guessed() {
        // No official name: the first one not marked old; text when it has no parts.
        let p = patient(serde_json::json!({
            "name": [{"use": "old", "family": "Former"}, {"text": "  Rosa\n Delgado "}],
            // An identifier without the MR type is not an MRN, whatever it looks like.
            "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "TX-880153"},
                           {"type": {"coding": [{"system": "urn:other", "code": "MR"}]}, "value": "X"}]
        }));
        let who = person_of(&p).unwrap();
        assert_eq!(who.name.as_deref(), Some("Rosa Delgado"));
        assert_eq!(who.mrn, None);
        assert!(person_of(&patient(serde_json::json!({"id": "p"}))).is_none());
    }

    #[test]
    fn a_malformed_name_is_dropped_not_the_patient() {
        let p = patient(serde_json::json!({"gender": "female", "name": {"family": 3}, "identifier": "MR 1"}));
        assert_eq!(p.gender.as_deref(), Some("female"));
        assert!(person_of(&p).is_none());
    }
}
