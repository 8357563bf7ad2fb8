//! `--shard K/N`: N processes together screen every patient exactly once, with exactly the
//! verdicts one process gives.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use trialgate::Shard;
use trialgate::criteria::decisions::Decisions;
use trialgate::time::Date;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn four_shards_together_give_exactly_the_single_process_result() {
    let cfg = trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).unwrap();
    let as_of = Date::parse("2026-06-01").unwrap();
    for input in ["fixtures/bundles", "fixtures/bulk", "fixtures/synthea"] {
        let path = root().join(input);
        let whole = trialgate::screen(&path, &cfg, as_of, &Decisions::default()).unwrap();
        let mut union: Vec<Value> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut patients = 0;
        for k in 1..=4 {
            let shard = Shard::parse(&format!("{k}/4")).unwrap();
            let part = trialgate::screen_shard(&path, &cfg, as_of, &Decisions::default(), shard).unwrap();
            patients += part.patients;
            for r in &part.results {
                assert!(shard.holds(&r.patient), "{input}: {} screened by shard {k}", r.patient);
            }
            let mine: BTreeSet<String> = part.results.iter().map(|r| r.patient.clone()).collect();
            assert!(seen.is_disjoint(&mine), "{input}: a patient in two shards");
            seen.extend(mine);
            // The same input problems are found by every shard.
            assert_eq!(part.issues, whole.issues, "{input}");
            union.extend(part.results.iter().map(|r| serde_json::to_value(r).unwrap()));
        }
        assert_eq!(patients, whole.patients, "{input}: every patient once");
        let key = |v: &Value| (v["patient"].as_str().unwrap_or_default().to_string(), v["trial"].to_string());
        union.sort_by_key(key);
        let mut single: Vec<Value> = whole.results.iter().map(|r| serde_json::to_value(r).unwrap()).collect();
        single.sort_by_key(key);
        assert_eq!(union, single, "{input}");
    }
}

#[test]
fn shard_specifications_are_checked() {
    assert_eq!(Shard::parse("2/4"), Ok(Shard { index: 1, count: 4 }));
    for bad in ["0/4", "5/4", "1/0", "x/4", "2", ""] {
        assert!(Shard::parse(bad).is_err(), "{bad}");
    }
    // Stable across runs and machines: a fixed id always lands in the same shard.
    let s = |k| Shard { index: k, count: 4 };
    let holders: Vec<u32> = (0..4).filter(|&k| s(k).holds("Patient/meilin-zhou")).collect();
    assert_eq!(holders.len(), 1);
    assert!(s(holders[0]).holds("meilin-zhou"), "the id alone or the key");
}
