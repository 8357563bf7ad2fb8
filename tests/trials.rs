//! The shipped trial files against their sources: every criterion's text (and context) is
//! quoted verbatim from the seed listing it names, in the listing's order, and the ids the
//! product promises exist.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config() -> trialgate::Config {
    trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).expect("shipped config loads")
}

#[test]
fn the_five_seed_trials_are_configured_with_the_promised_ids() {
    let ids: Vec<String> = config().trials.iter().map(|t| t.id.clone()).collect();
    assert_eq!(
        ids,
        [
            "NCT06406205",
            "belimumab-multitarget-ln",
            "felzartamab-refractory-ln",
            "NCT06535412",
            "biologic-induction-ln"
        ]
    );
}

/// Collapses whitespace so that a criterion quoted on one line matches a listing wrapped
/// differently; nothing else is normalised.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn every_criterion_is_quoted_verbatim_and_in_listing_order() {
    let cfg = config();
    for t in &cfg.trials {
        // `source` is written relative to the folder holding the checkout and shared/.
        let seed_path = root().join("..").join(&t.source);
        let seed = squash(&std::fs::read_to_string(&seed_path).unwrap_or_else(|e| panic!("{}: {e}", seed_path.display())));
        let mut last_inclusion = 0;
        let mut last_exclusion = 0;
        for c in &t.criteria {
            let text = squash(&c.text);
            let at = seed
                .find(&text)
                .unwrap_or_else(|| panic!("{} {}: text is not in {}: {text}", t.id, c.id, t.source));
            if let Some(ctx) = &c.context {
                assert!(seed.contains(&squash(ctx)), "{} {}: context is not in the seed", t.id, c.id);
            }
            // Within each kind, criteria follow the listing. Items taken from a listing's
            // summary (their note says so) are placed after the bullets and are not ordered.
            if c.note.as_deref().is_some_and(|n| n.contains("summary")) {
                continue;
            }
            let last = match c.kind {
                trialgate::criteria::Kind::Inclusion => &mut last_inclusion,
                trialgate::criteria::Kind::Exclusion => &mut last_exclusion,
            };
            assert!(at >= *last, "{} {}: out of the listing's order", t.id, c.id);
            *last = at;
        }
    }
}

#[test]
fn shipped_config_has_no_unacknowledged_suspect_thresholds() {
    // Loading succeeds only when every inverted-looking threshold is marked `suspect:`; the two
    // seed-text problems of codes.md section 0 must be among the acknowledged ones.
    let cfg = config();
    let warned: Vec<&str> = cfg.warnings.iter().map(|w| w.0.as_str()).collect();
    assert!(
        warned.iter().any(|w| w.contains("001-belimumab") && w.contains("inc-4")),
        "{warned:?}"
    );
    assert!(
        warned.iter().any(|w| w.contains("004-biologic") && w.contains("exc-1")),
        "{warned:?}"
    );
}

#[test]
fn the_benchmark_trial_loads_from_its_own_folder() {
    let bench = root().join("config/bench/bench-ln.yaml");
    let cfg = trialgate::load_config(&root().join("mappings"), Path::new("/nonexistent"), &[bench.display().to_string()])
        .expect("bench-ln loads");
    assert_eq!(cfg.trials.len(), 1);
    assert_eq!(cfg.trials[0].id, "bench-ln");
}

/// Synthea's lupus module codes lupus as SNOMED 200936003 "Lupus erythematosus", which does
/// not say whether it is systemic: every seed trial must send it to review, not reject it,
/// while a patient with no lupus code at all is rejected by the SLE inclusion.
#[test]
fn unspecified_lupus_is_a_review_item_in_every_seed_trial() {
    let dir = std::env::temp_dir().join(format!("trialgate-trials-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = |code: &str| {
        serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p", "gender": "female", "birthDate": "1990-01-01"}},
            {"resource": {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p"},
                "clinicalStatus": {"coding": [{"code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
                "onsetDateTime": "2015-03-01"}}]})
        .to_string()
    };
    let cfg = config();
    let as_of = trialgate::time::Date::parse("2026-06-01").unwrap();
    let decisions = trialgate::criteria::decisions::Decisions::default();

    let unspecified = dir.join("unspecified.json");
    std::fs::write(&unspecified, bundle("200936003")).unwrap();
    let s = trialgate::screen(&unspecified, &cfg, as_of, &decisions).unwrap();
    assert_eq!(s.results.len(), 5);
    for r in &s.results {
        let c = r
            .criteria
            .iter()
            .find(|c| c.reason.contains("lupus erythematosus, unspecified"))
            .unwrap_or_else(|| panic!("{}: no criterion mentions the unspecified lupus code", r.trial));
        assert_eq!(c.outcome, trialgate::criteria::Outcome::Manual, "{} {}", r.trial, c.id);
        assert!(!r.decided_by.iter().any(|d| d.id == c.id), "{}: {} must not exclude", r.trial, c.id);
    }

    // Another disease entirely (rheumatoid arthritis): the SLE inclusion of 000 is not met.
    let other = dir.join("other.json");
    std::fs::write(&other, bundle("69896004")).unwrap();
    let s = trialgate::screen(&other, &cfg, as_of, &decisions).unwrap();
    let r000 = s.results.iter().find(|r| r.trial == "NCT06406205").unwrap();
    assert_eq!(r000.status, trialgate::criteria::Status::Ineligible);
    assert!(r000.decided_by.iter().any(|d| d.id == "inc-3"), "{:?}", r000.decided_by);
    let _ = std::fs::remove_dir_all(&dir);
}
