//! The streaming reader: NDJSON read in blocks on every core gives the same verdicts whatever
//! the order of the input, reports problems at their true line however deep in a file, and
//! reads lines longer than a block.

use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use trialgate::criteria::Status;
use trialgate::criteria::decisions::Decisions;
use trialgate::time::Date;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trialgate-streaming-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn as_of() -> Date {
    Date::parse("2026-06-01").unwrap()
}

/// Every result as JSON, for comparing two screenings criterion by criterion.
fn results(s: &trialgate::Screening) -> Vec<Value> {
    s.results.iter().map(|r| serde_json::to_value(r).unwrap()).collect()
}

/// The Bulk fixture read as Bulk writes it (Patients first), and the same resources in one
/// file with every Observation and Condition before the Patient it belongs to: the second
/// keeps them aside until their patient is known, and must give exactly the same results
/// (the order of each type's own lines is kept: it is the order evidence is listed in).
#[test]
fn input_order_does_not_change_any_result() {
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let bulk = root().join("fixtures/bulk");
    let ordered = trialgate::screen(&bulk, &cfg, as_of(), &Decisions::default()).unwrap();

    let dir = temp("order");
    let mut all = String::new();
    for f in ["Observation.ndjson", "Condition.ndjson", "Patient.ndjson"] {
        all.push_str(&std::fs::read_to_string(bulk.join(f)).unwrap());
    }
    std::fs::write(dir.join("everything.ndjson"), all).unwrap();
    let shuffled = trialgate::screen(&dir, &cfg, as_of(), &Decisions::default()).unwrap();

    assert!(ordered.patients > 0);
    assert_eq!(shuffled.patients, ordered.patients);
    let (a, b) = (results(&shuffled), results(&ordered));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(x == y, "{} {}:\n{x}\n{y}", y["patient"], y["trial"]);
    }
    // The fixture's truncated Observation line is reported in both readings.
    assert_eq!(shuffled.issues.len(), ordered.issues.len(), "{:?}", shuffled.issues);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file of several blocks with a broken line deep inside: the problem is reported at its
/// true line, every other patient is read. One line longer than a block (a Bundle of 4,000
/// Observations) is read whole.
#[test]
fn large_files_are_read_in_blocks_with_true_line_numbers() {
    let dir = temp("blocks");
    let mut patients = std::fs::File::create(dir.join("Patient.ndjson")).unwrap();
    let bad_line = 4500;
    for i in 1..=6000 {
        if i == bad_line {
            writeln!(patients, "{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"birthDate\":").unwrap();
            continue;
        }
        // Padded to about 300 bytes, so that the file spans blocks.
        let p = json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": "female", "birthDate": "1990-01-01",
            "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": format!("MRN-{i:0>200}")}]});
        writeln!(patients, "{p}").unwrap();
    }
    drop(patients);
    let egfr = |i: usize, value: f64, when: &str| {
        json!({"fullUrl": format!("urn:uuid:o{i}"), "resource": {"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "98979-8"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": "mL/min/{1.73_m2}", "system": "http://unitsofmeasure.org", "code": "mL/min/{1.73_m2}"}}})
    };
    // 3,999 old, healthy values and one recent low one, all on one line.
    let mut entries: Vec<Value> = (0..3999).map(|i| egfr(i, 95.0, "2019-01-01T09:00:00Z")).collect();
    entries.push(egfr(3999, 40.0, "2026-05-20T09:00:00Z"));
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": entries}).to_string();
    assert!(bundle.len() > 1 << 20, "the line must be longer than a block");
    std::fs::write(dir.join("Observation.ndjson"), format!("{bundle}\n")).unwrap();

    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &["NCT06406205".into()]).unwrap();
    let s = trialgate::screen(&dir, &cfg, as_of(), &Decisions::default()).unwrap();
    assert_eq!(s.patients, 5999);
    assert_eq!(s.issues.len(), 1, "{:?}", s.issues);
    assert!(
        s.issues[0].location.ends_with(&format!("Patient.ndjson:{bad_line}")),
        "{}",
        s.issues[0].location
    );
    let status = |p: &str| s.results.iter().find(|r| r.patient == p).map(|r| r.status);
    assert_eq!(
        status("Patient/p1"),
        Some(Status::Ineligible),
        "eGFR 40 from the long line excludes"
    );
    assert_ne!(status("Patient/p2"), Some(Status::Ineligible));
    assert_eq!(status(&format!("Patient/p{bad_line}")), None);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A line that is not UTF-8 is reported at its line and skipped, whichever way it would have
/// been read; lines with other non-ASCII text (a name, a display) are read as any other.
#[test]
fn lines_that_are_not_utf8_are_reported_and_the_rest_read() {
    let dir = temp("utf8");
    // Written as exports write them, resourceType first, so that they take the fast ways.
    let patient = |id: &str, family: &str| {
        format!(r#"{{"resourceType":"Patient","id":"{id}","gender":"female","birthDate":"1990-01-01","name":[{{"family":"{family}"}}]}}"#)
    };
    let egfr = |id: &str, patient: &str, display: &str| {
        format!(
            r#"{{"resourceType":"Observation","id":"{id}","status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"98979-8","display":"{display}"}}]}},"subject":{{"reference":"Patient/{patient}"}},"effectiveDateTime":"2026-05-20T09:00:00Z","valueQuantity":{{"value":40,"unit":"mL/min/{{1.73_m2}}","system":"http://unitsofmeasure.org","code":"mL/min/{{1.73_m2}}"}}}}"#
        )
    };
    // An ISO-8859-1 byte where UTF-8 is due: "M\xfcller" is Müller in Latin-1.
    let latin1 = |line: String, from: &str| {
        line.replace(from, "M\u{1}ller")
            .into_bytes()
            .iter()
            .map(|&b| if b == 1 { 0xfc } else { b })
            .collect::<Vec<u8>>()
    };
    let mut patients = Vec::new();
    for line in [
        patient("p1", "Plain").into_bytes(),
        patient("p2", "Zoë").into_bytes(),
        latin1(patient("p3", "X"), "X"),
    ] {
        patients.extend(line);
        patients.push(b'\n');
    }
    std::fs::write(dir.join("Patient.ndjson"), patients).unwrap();
    let mut observations = Vec::new();
    for line in [
        egfr("o1", "p1", "Débit de filtration glomérulaire").into_bytes(),
        latin1(egfr("o2", "p2", "X"), "X"),
    ] {
        observations.extend(line);
        observations.push(b'\n');
    }
    std::fs::write(dir.join("Observation.ndjson"), observations).unwrap();

    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &["NCT06406205".into()]).unwrap();
    let s = trialgate::screen(&dir, &cfg, as_of(), &Decisions::default()).unwrap();
    assert_eq!(s.patients, 2, "{:?}", s.issues);
    let mut at: Vec<&str> = s.issues.iter().map(|i| i.location.as_str()).collect();
    at.sort();
    assert_eq!(at.len(), 2, "{:?}", s.issues);
    assert!(
        at[0].ends_with("Observation.ndjson:2") && at[1].ends_with("Patient.ndjson:3"),
        "{at:?}"
    );
    assert!(s.issues.iter().all(|i| i.message.contains("not valid UTF-8")), "{:?}", s.issues);
    let status = |p: &str| s.results.iter().find(|r| r.patient == p).map(|r| r.status);
    assert_eq!(
        status("Patient/p1"),
        Some(Status::Ineligible),
        "the accented Observation line is read: eGFR 40 excludes"
    );
    assert!(
        matches!(status("Patient/p2"), Some(s) if s != Status::Ineligible),
        "the broken line gives no eGFR"
    );
    assert_eq!(status("Patient/p3"), None);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Observation lines are scanned a few lines ahead of the one being reduced; the lines the
/// fast way leaves (here, every third one has more codings than it holds) and the lines of
/// another type still take their turn: a patient's values come out in the order of the file.
#[test]
fn lines_the_fast_way_leaves_keep_their_place() {
    let dir = temp("place");
    std::fs::write(
        dir.join("Patient.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"p1\",\"gender\":\"female\",\"birthDate\":\"1990-01-01\"}\n",
    )
    .unwrap();
    let platelets = |i: usize| {
        let extra: String = if i % 3 == 1 {
            (0..4)
                .map(|k| format!(r#",{{"system":"http://example.org/lab","code":"x{k}"}}"#))
                .collect()
        } else {
            String::new()
        };
        format!(
            r#"{{"resourceType":"Observation","id":"o{i}","status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"777-3"}}{extra}]}},"subject":{{"reference":"Patient/p1"}},"effectiveDateTime":"2026-05-{:02}T09:00:00Z","valueQuantity":{{"value":{},"unit":"10*9/L","system":"http://unitsofmeasure.org","code":"10*9/L"}}}}"#,
            1 + i % 28,
            100 + i
        )
    };
    let mut lines: Vec<String> = (0..40).map(platelets).collect();
    lines.insert(
        20,
        r#"{"resourceType":"Condition","id":"c1","code":{"coding":[{"system":"http://snomed.info/sct","code":"55464009"}]},"subject":{"reference":"Patient/p1"}}"#.into(),
    );
    std::fs::write(dir.join("Observation.ndjson"), lines.join("\n") + "\n").unwrap();

    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let read = trialgate::read_facts(&dir, &cfg, as_of(), None).unwrap();
    assert!(read.issues.is_empty(), "{:?}", read.issues);
    assert_eq!(read.facts.len(), 1);
    let f = read.facts[0].try_facts().unwrap();
    let lab = cfg.mappings.lab("platelets").unwrap();
    let ids: Vec<&str> = f.labs[&lab].iter().map(|v| v.tie.as_str()).collect();
    let want: Vec<String> = (0..40).map(|i| format!("o{i}")).collect();
    assert_eq!(ids, want);
    assert_eq!(f.conditions.len(), 1, "the Condition among them is read");
    let _ = std::fs::remove_dir_all(&dir);
}
