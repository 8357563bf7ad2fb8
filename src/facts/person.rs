//! Who a patient is, for the people who act on the results: a display name and the medical
//! record number, carried from the Patient to the report and the coordinator's page. No rule
//! reads them, and they never go into a log line.

use super::Person;
use crate::fhir::model::{HumanName, Patient};

const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
/// Enough for any real name or MRN; a longer value is cut so that input cannot grow the page.
const MAX_CHARS: usize = 120;

/// The display name (the official one if any, else the first not marked `old`) and the MRN
/// (an identifier typed `MR` in v2-0203). Absent parts stay absent: nothing is guessed.
pub fn person(p: &Patient) -> Option<Person> {
    let names = p.name.0.as_deref().unwrap_or_default();
    let name = names
        .iter()
        .find(|n| n.use_.as_deref() == Some("official"))
        .and_then(display)
        .or_else(|| names.iter().filter(|n| n.use_.as_deref() != Some("old")).find_map(display));
    let mrn = p.identifier.0.as_deref().unwrap_or_default().iter().find_map(|i| {
        let typed_mr = i.kind.as_ref().is_some_and(|k| {
            k.coding
                .iter()
                .any(|c| c.system.as_deref() == Some(V2_0203) && c.code.as_deref() == Some("MR"))
        });
        typed_mr.then(|| i.value.as_deref().and_then(clean)).flatten()
    });
    (name.is_some() || mrn.is_some()).then_some(Person { name, mrn })
}

/// Given names then family name; the name's `text` when it has neither.
fn display(n: &HumanName) -> Option<String> {
    let parts: Vec<&str> = n.given.iter().map(String::as_str).chain(n.family.as_deref()).collect();
    clean(&parts.join(" ")).or_else(|| n.text.as_deref().and_then(clean))
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

    fn patient(v: serde_json::Value) -> Patient {
        serde_json::from_value(v).unwrap()
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
        let who = person(&p).unwrap();
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
        let who = person(&p).unwrap();
        assert_eq!(who.name.as_deref(), Some("Rosa Delgado"));
        assert_eq!(who.mrn, None);
        assert!(person(&patient(serde_json::json!({"id": "p"}))).is_none());
    }

    #[test]
    fn a_malformed_name_is_dropped_not_the_patient() {
        let p = patient(serde_json::json!({"gender": "female", "name": {"family": 3}, "identifier": "MR 1"}));
        assert_eq!(p.gender.as_deref(), Some("female"));
        assert!(person(&p).is_none());
    }
}
