//! Outside input never panics: the fixture cohort, mutated at random (deterministically),
//! goes through the whole pipeline (read, group, extract, evaluate every trial, every report
//! format). Values are replaced by strings, numbers, dates and shapes that real feeds get
//! wrong; files are cut at random bytes. Each run must end with a result per patient and
//! trial, or with every problem reported as an input issue.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use trialgate::criteria::decisions::Decisions;
use trialgate::time::Date;

/// A small deterministic generator (64-bit LCG): the test needs variety, not quality, and
/// must fail the same way every time it fails.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn nasty(r: &mut Lcg) -> Value {
    let pool = [
        json!(""),
        json!("Ü"),
        json!("CCÜ"),
        json!("2026-13-45"),
        json!("2019"),
        json!("2026-06-01T25:61:00Z"),
        json!("2026-06-0é1T00:00:00Z"),
        json!(">"),
        json!("<0.1"),
        json!("≥ 1e400"),
        json!("ad"),
        json!(-5),
        json!(0),
        json!(1e308),
        json!(-1e308),
        json!(4.9e-324),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!([{"code": "x"}]),
        json!({"reference": "Patient/"}),
        json!({"reference": "urn:uuid:"}),
        json!({"reference": "Patient/../../x/_history/"}),
        json!({"value": 1e308, "comparator": "<", "unit": "mg/mg"}),
        json!({"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "CCÜ"}]}),
        json!({"start": "2026-06-01", "end": "1900-01-01"}),
    ];
    pool[r.below(pool.len())].clone()
}

fn mutate(v: &mut Value, r: &mut Lcg, rate: usize) {
    match v {
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                if k == "resourceType" && r.below(20) != 0 {
                    continue; // mostly keep the type, so the resource reaches the deeper code
                }
                if r.below(rate) == 0 {
                    map.insert(k, nasty(r));
                } else if let Some(child) = map.get_mut(&k) {
                    mutate(child, r, rate);
                }
            }
        }
        Value::Array(items) => {
            for item in items.iter_mut() {
                mutate(item, r, rate);
            }
        }
        Value::String(text) if r.below(rate) == 0 && r.below(2) == 0 => {
            // Perturb the real value: a multi-byte character inside it, or a truncation,
            // keeps it close enough to valid to reach code lookups and date parsing.
            let mut at = r.below(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            if r.below(2) == 0 {
                text.insert(at, 'Ü');
            } else {
                text.truncate(at);
            }
        }
        leaf => {
            if r.below(rate) == 0 {
                *leaf = nasty(r);
            }
        }
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("json" | "ndjson")) {
            out.push(p);
        }
    }
}

#[test]
fn mutated_fixtures_never_panic() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cfg = trialgate::load_config(&root.join("mappings"), &root.join("config/trials"), &[]).expect("config");
    let as_of = Date::parse("2026-06-01").unwrap();
    let mut sources = Vec::new();
    files(&root.join("fixtures"), &mut sources);
    let dir = std::env::temp_dir().join(format!("trialgate-robust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = Lcg(0x7e57_ab1e);
    let mut screened = 0;
    for round in 0..150 {
        for (i, src) in sources.iter().enumerate() {
            let text = std::fs::read_to_string(src).unwrap();
            let out = dir.join(format!("r{round}-{i}.{}", src.extension().unwrap().to_str().unwrap()));
            let mutated = if src.extension().is_some_and(|e| e == "ndjson") {
                text.lines()
                    .map(|l| match serde_json::from_str::<Value>(l) {
                        Ok(mut v) => {
                            mutate(&mut v, &mut r, 6);
                            v.to_string()
                        }
                        Err(_) => l.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            } else if round % 5 == 4 {
                // Cut the file at a random byte (on a character boundary, as a file is text).
                let mut at = r.below(text.len().max(1));
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text[..at].to_string()
            } else {
                let mut v: Value = serde_json::from_str(&text).unwrap();
                mutate(&mut v, &mut r, 8);
                v.to_string()
            };
            std::fs::write(&out, mutated).unwrap();
            let s = trialgate::screen(&out, &cfg, as_of, &Decisions::default()).expect("a readable file screens");
            assert_eq!(s.results.len(), s.patients * cfg.trials.len(), "{}", out.display());
            // Every writer must cope with whatever the evaluation produced.
            assert!(trialgate::report::json(&s).starts_with('{'));
            assert!(trialgate::report::csv(&s).starts_with("patient,trial,status"));
            assert!(!trialgate::report::text(&s).is_empty());
            screened += s.patients;
            std::fs::remove_file(&out).unwrap();
        }
    }
    assert!(
        screened > 100,
        "mutations left too few patients to exercise the engine ({screened})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
