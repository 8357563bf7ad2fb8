//! BENCH-LN, encoded as an ordinary trial file, agrees patient by patient with the reference
//! implementation in ../shared/bench on a freshly generated cohort. This exercises the whole
//! engine (NDJSON reading, units, comparators, windows, ULN, condition activity) against an
//! independent implementation of the same written rules.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use trialgate::criteria::Status;
use trialgate::criteria::decisions::Decisions;
use trialgate::time::Date;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python(args: &[&str]) {
    let out = Command::new("python3")
        .args(args)
        .output()
        .expect("python3 runs (it is on every machine of this kind)");
    assert!(
        out.status.success(),
        "python3 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bench_ln_agrees_with_the_reference_implementation() {
    let bench = root().join("../shared/bench");
    let dir = std::env::temp_dir().join(format!("trialgate-bench-{}", std::process::id()));
    let data = dir.join("data");
    let reference = dir.join("ref.csv");
    std::fs::create_dir_all(&data).expect("temp dir");
    // Seed 7 and 600 patients: a cohort the shipped numbers were not tuned on, small enough
    // to generate in a couple of seconds, large enough to hold every edge case the generator makes.
    python(&[
        bench.join("gen_cohort.py").to_str().unwrap(),
        "--patients",
        "600",
        "--out",
        data.to_str().unwrap(),
        "--seed",
        "7",
    ]);
    python(&[
        bench.join("peer_python.py").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        reference.to_str().unwrap(),
    ]);

    let trial = root().join("config/bench/bench-ln.yaml").display().to_string();
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[trial]).expect("bench-ln loads");
    let as_of = Date::parse("2026-06-01").unwrap();
    let s = trialgate::screen(&data, &cfg, as_of, &Decisions::default()).expect("cohort screens");

    let ours: BTreeMap<String, &str> = s
        .results
        .iter()
        .map(|r| {
            let id = r.patient.strip_prefix("Patient/").unwrap_or(&r.patient).to_string();
            let outcome = match r.status {
                Status::Eligible => "eligible",
                Status::Ineligible => "ineligible",
                Status::PotentiallyEligible => "unknown",
                Status::Error => "error",
            };
            (id, outcome)
        })
        .collect();
    let text = std::fs::read_to_string(&reference).expect("reference output");
    let theirs: BTreeMap<String, String> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(',').map(|(p, o)| (p.to_string(), o.to_string())))
        .collect();
    assert_eq!(ours.len(), theirs.len(), "one outcome per patient");
    let disagreements: Vec<String> = theirs
        .iter()
        .filter(|(p, o)| ours.get(*p).copied() != Some(o.as_str()))
        .map(|(p, o)| format!("{p}: reference {o}, trialgate {:?}", ours.get(p)))
        .collect();
    assert!(
        disagreements.is_empty(),
        "{} disagreement(s):\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    // The cohort must exercise all three outcomes, or agreement proves little.
    for want in ["eligible", "ineligible", "unknown"] {
        assert!(ours.values().any(|o| *o == want), "no {want} patient in the cohort");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
