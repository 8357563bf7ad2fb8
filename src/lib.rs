//! trialgate: finds clinical-trial candidates in FHIR R4 data and explains every verdict.
//!
//! Data flows source -> facts -> verdicts -> sinks: [`fhir`] reads resources and groups them
//! by patient, [`facts`] reduces each patient's resources to typed facts through the mappings,
//! [`criteria`] evaluates every trial's criteria (purely, for a given date), and [`report`]
//! writes the results. [`screen`] wires them together for files on disk; every other way in
//! reuses the same pieces.

pub mod board;

/// mimalloc rather than the system allocator: the reader and the evaluator make and free
/// millions of small objects, many freed on another thread than the one that made them,
/// where glibc malloc took a third of the CPU time and kept freed memory scattered.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc v3 option numbers; the Rust binding of `mi_option_set` is behind a feature that
// needs another crate, so the C function is declared here.
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}
const MI_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;
const MI_PURGE_DELAY: std::ffi::c_int = 15;

fn mi_option(option: std::ffi::c_int, value: std::ffi::c_long) {
    // SAFETY: setting an option is thread-safe, allocates nothing and takes plain integers.
    unsafe { mi_option_set(option, value) }
}

/// Tunes the allocator for batch runs: arenas are committed as used, not up front
/// (`arena_eager_commit` 0), which keeps the resident set near what is live (the default
/// costs 30 MB or more of peak for nothing here), and freed pages go back to the system
/// after 20 ms. A delay of 0 kept 4-5 MB less at peak but cost a quarter of the CPU time of
/// a BENCH-LN sweep: pages handed back and faulted in again, each with a madvise and TLB
/// shootdowns on every core. Options are read when first needed, so this runs before `main`
/// (an ELF initializer) where it can, and again, harmlessly, before the input is read.
pub fn tune_allocator() {
    mi_option(MI_ARENA_EAGER_COMMIT, 0);
    mi_option(MI_PURGE_DELAY, 20);
}

/// A long-running service frees what each request made: mimalloc's own delay (10 ms) keeps
/// its resident set close to what is live between requests.
pub fn tune_allocator_for_service() {
    mi_option(MI_PURGE_DELAY, 10);
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_AT_START: extern "C" fn() = {
    extern "C" fn tune() {
        tune_allocator();
    }
    tune
};

pub mod bulk;
pub mod config;
pub mod console;
pub mod criteria;
pub mod facts;
pub mod fhir;
pub mod gateway;
pub mod live;
pub mod notify;
mod pgtls;
pub mod pipeline;
pub mod report;
pub mod schedule;
pub mod serve;
pub mod state;
pub mod sweep;
pub mod time;
pub mod writeback;

use config::{ConfigError, yaml_files};
use criteria::decisions::Decisions;
use criteria::eval::TrialResult;
use criteria::trial::{Trial, Warning, load_trial};
use facts::Unmapped;
use facts::mappings::Mappings;
use facts::store::FactStore;
pub use facts::store::Shard;
use fhir::InputIssue;
use fhir::files::{ReadError, ReadOptions, list_files};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use time::Date;

/// Mappings plus the trials to screen against, loaded and checked.
pub struct Config {
    pub mappings: Mappings,
    pub trials: Vec<Trial>,
    pub warnings: Vec<Warning>,
    pub provenance: Provenance,
}

/// A file that went into a report: a trial, a mapping or a decisions file (hashed, as they
/// decide outcomes), or an input (named and sized; hashing gigabytes of NDJSON per run would
/// cost more than the screening).
#[derive(Debug, Clone, Serialize)]
pub struct SourceFile {
    pub kind: &'static str,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

impl SourceFile {
    /// A configuration file, with its SHA-256.
    pub fn hashed(kind: &'static str, path: &Path) -> Result<SourceFile, ConfigError> {
        Ok(SourceFile {
            kind,
            path: path.display().to_string(),
            sha256: Some(sha256_file(path)?),
            bytes: None,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub version: String,
    /// SHA-256 over the hashes of every trial and mapping file, in order.
    pub config_hash: String,
    pub sources: Vec<SourceFile>,
}

fn sha256_file(path: &Path) -> Result<String, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::io(path, e))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads the mappings and the trials. `selected` holds trial ids (looked up in `trials_dir`)
/// or paths of trial files kept elsewhere; empty means every trial in `trials_dir`.
pub fn load_config(mappings_dir: &Path, trials_dir: &Path, selected: &[String]) -> Result<Config, ConfigError> {
    let mappings = Mappings::load_dir(mappings_dir)?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut errors = Vec::new();
    if selected.is_empty() {
        files = yaml_files(trials_dir)?;
        if files.is_empty() {
            return Err(ConfigError::at(trials_dir, None, "no trial files (*.yaml) in this folder".into()));
        }
    }
    let mut ids: Option<Vec<(String, PathBuf)>> = None;
    for sel in selected {
        let p = Path::new(sel);
        if p.is_file() {
            files.push(p.to_path_buf());
            continue;
        }
        // An id: index the folder's files by the id they declare (read once).
        if ids.is_none() {
            #[derive(serde::Deserialize)]
            struct IdOnly {
                id: String,
            }
            let mut index = Vec::new();
            for f in yaml_files(trials_dir)? {
                match config::read_yaml::<IdOnly>(&f) {
                    Ok(t) => index.push((t.id, f)),
                    Err(e) => errors.push(e),
                }
            }
            ids = Some(index);
        }
        let index = ids.as_deref().unwrap_or_default();
        match index.iter().find(|(id, _)| id == sel) {
            Some((_, f)) => files.push(f.clone()),
            None => errors.push(ConfigError::at(
                trials_dir,
                None,
                format!(
                    "no trial with id `{sel}` (known: {}); pass an id or the path of a trial file",
                    index.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }
    let mut trials = Vec::new();
    let mut warnings = Vec::new();
    for f in &files {
        match load_trial(f, &mappings) {
            Ok((t, w)) => {
                if trials.iter().any(|x: &Trial| x.id == t.id) {
                    errors.push(ConfigError::at(f, None, format!("trial id `{}` is defined by two files", t.id)));
                }
                warnings.extend(w);
                trials.push(t);
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigError::Many(errors));
    }
    let mut sources = Vec::new();
    for t in &trials {
        sources.push(SourceFile::hashed("trial", &t.file)?);
    }
    for f in &mappings.files {
        sources.push(SourceFile::hashed("mapping", f)?);
    }
    let mut h = Sha256::new();
    for s in &sources {
        h.update(s.sha256.as_deref().unwrap_or_default().as_bytes());
    }
    let provenance = Provenance {
        version: env!("CARGO_PKG_VERSION").to_string(),
        config_hash: hex(&h.finalize()),
        sources,
    };
    Ok(Config {
        mappings,
        trials,
        warnings,
        provenance,
    })
}

/// The outcome of screening some input against the configured trials.
pub struct Screening {
    pub as_of: Date,
    pub patients: usize,
    pub results: Vec<TrialResult>,
    pub unmapped: Unmapped,
    pub issues: Vec<InputIssue>,
    pub provenance: Provenance,
}

/// Screens every patient found under `path` against every configured trial.
pub fn screen(path: &Path, cfg: &Config, as_of: Date, decisions: &Decisions) -> Result<Screening, ReadError> {
    let mut results = Vec::new();
    let totals = screen_each(path, cfg, as_of, decisions, None, criteria::Detail::Full, &mut |_| {}, &mut |r| {
        results.push(r)
    })?;
    Ok(totals.with(results))
}

/// [`screen`] for one shard of the patients (see [`Shard`]).
pub fn screen_shard(path: &Path, cfg: &Config, as_of: Date, decisions: &Decisions, shard: Shard) -> Result<Screening, ReadError> {
    let mut results = Vec::new();
    let totals = screen_each(
        path,
        cfg,
        as_of,
        decisions,
        Some(shard),
        criteria::Detail::Full,
        &mut |_| {},
        &mut |r| results.push(r),
    )?;
    Ok(totals.with(results))
}

/// What a screening found besides its results.
pub struct Totals {
    pub as_of: Date,
    pub patients: usize,
    pub unmapped: Unmapped,
    pub issues: Vec<InputIssue>,
    pub provenance: Provenance,
}

impl Totals {
    /// The screening of these totals and results.
    pub fn with(self, results: Vec<TrialResult>) -> Screening {
        Screening {
            as_of: self.as_of,
            patients: self.patients,
            results,
            unmapped: self.unmapped,
            issues: self.issues,
            provenance: self.provenance,
        }
    }
}

/// Screens every patient found under `path`, handing over the results as they are made (in
/// patient order) rather than holding them: what a cohort of millions needs. `begin` learns
/// the number of patients once the input is read, before the first result. With a `shard`,
/// only that shard's patients are screened. `detail` says whether the results carry their
/// explanations: ask for [`criteria::Detail::Outcome`] only when nothing downstream reads them.
#[allow(clippy::too_many_arguments)]
pub fn screen_each(
    path: &Path,
    cfg: &Config,
    as_of: Date,
    decisions: &Decisions,
    shard: Option<Shard>,
    detail: criteria::Detail,
    begin: &mut dyn FnMut(usize),
    each: &mut dyn FnMut(TrialResult),
) -> Result<Totals, ReadError> {
    let read = read_facts(path, cfg, as_of, shard)?;
    Ok(evaluate_facts(read, cfg, as_of, decisions, detail, begin, each))
}

/// Every patient's facts under `path`, with what the reading found.
pub struct FactsRead {
    /// Sorted by patient key; decoded as each patient is evaluated.
    pub facts: Vec<facts::held::Held>,
    pub issues: Vec<InputIssue>,
    pub unmapped: Unmapped,
    pub inputs: Vec<SourceFile>,
}

/// Reads `path` into every patient's facts (the first half of [`screen_each`]).
pub fn read_facts(path: &Path, cfg: &Config, as_of: Date, shard: Option<Shard>) -> Result<FactsRead, ReadError> {
    read_facts_files(&list_files(path)?, cfg, as_of, shard)
}

/// [`read_facts`] for a list of files (none: no patients).
pub fn read_facts_files(files: &[PathBuf], cfg: &Config, as_of: Date, shard: Option<Shard>) -> Result<FactsRead, ReadError> {
    tune_allocator();
    let mut store = FactStore::keeping(criteria::eval::lab_spans(&cfg.trials, &cfg.mappings, as_of)).sharded(shard);
    let mut issues = Vec::new();
    pipeline::read_files(files, cfg, &mut store, &mut issues)?;
    let inputs = files
        .iter()
        .map(|f| SourceFile {
            kind: "input",
            path: f.display().to_string(),
            sha256: None,
            bytes: std::fs::metadata(f).ok().map(|m| m.len()),
        })
        .collect();
    tracing::debug!(peak_rss_kb = pipeline::peak_rss_kb(), "input read");
    let (facts, more, unmapped) = store.finish(&cfg.mappings);
    issues.extend(more);
    Ok(FactsRead {
        facts,
        issues,
        unmapped,
        inputs,
    })
}

/// Evaluates every trial for facts already read (the second half of [`screen_each`]).
/// The facts are consumed (freed as they are evaluated).
pub fn evaluate_facts(
    read: FactsRead,
    cfg: &Config,
    as_of: Date,
    decisions: &Decisions,
    detail: criteria::Detail,
    begin: &mut dyn FnMut(usize),
    each: &mut dyn FnMut(TrialResult),
) -> Totals {
    let mut provenance = cfg.provenance.clone();
    provenance.sources.extend(read.inputs);
    let patients = read.facts.len();
    begin(patients);
    tracing::debug!(patients, ?detail, "evaluating");
    pipeline::evaluate_each(read.facts, cfg, as_of, decisions, detail, each);
    tracing::debug!(peak_rss_kb = pipeline::peak_rss_kb(), "evaluated");
    Totals {
        as_of,
        patients,
        unmapped: read.unmapped,
        issues: read.issues,
        provenance,
    }
}

/// [`evaluate_facts`], collecting the results.
pub fn screen_facts(read: FactsRead, cfg: &Config, as_of: Date, decisions: &Decisions, detail: criteria::Detail) -> Screening {
    let mut results = Vec::new();
    evaluate_facts(read, cfg, as_of, decisions, detail, &mut |_| {}, &mut |r| results.push(r)).with(results)
}

/// Whether a loaded trial reads a lab through JSONPath (its Observations must then be kept as
/// JSON until reduced: a copy of every Observation otherwise saved).
pub fn read_options(cfg: &Config) -> ReadOptions {
    let m = &cfg.mappings;
    ReadOptions {
        keep_observation_json: cfg.trials.iter().flat_map(|t| t.labs(m)).any(|l| m.labs[l].value_path.is_some()),
    }
}

/// Screens resources already read (pages from a server): reduce, evaluate.
pub fn screen_read(
    read: fhir::files::ReadOutput,
    inputs: Vec<SourceFile>,
    cfg: &Config,
    as_of: Date,
    decisions: &Decisions,
    detail: criteria::Detail,
) -> Screening {
    screen_facts(read_resources(read, inputs, cfg, as_of), cfg, as_of, decisions, detail)
}

/// Reduces resources already read (pages from a server) to every patient's facts (the first
/// half of [`screen_read`]).
pub fn read_resources(read: fhir::files::ReadOutput, inputs: Vec<SourceFile>, cfg: &Config, as_of: Date) -> FactsRead {
    let mut store = FactStore::keeping(criteria::eval::lab_spans(&cfg.trials, &cfg.mappings, as_of));
    for p in read.resources {
        store.feed(p, &cfg.mappings);
    }
    let (facts, more, unmapped) = store.finish(&cfg.mappings);
    let mut issues = read.issues;
    issues.extend(more);
    FactsRead {
        facts,
        issues,
        unmapped,
        inputs,
    }
}
