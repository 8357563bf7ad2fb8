//! Files to verdicts in bounded memory: the path every screening of files on disk takes.
//!
//! NDJSON files (what a Bulk Data `$export` leaves) are read in blocks of whole lines; the
//! blocks are parsed and reduced to facts on every core at once, and the facts absorbed in
//! input order. No resource and no whole file is held: memory holds the blocks in flight and
//! each patient's facts. Files are read Patients first, then Medications, so that every other
//! resource finds its patient already known (input in any other order still works; what
//! comes before its patient is kept aside until the end). Other files (Bundles, single
//! resources) are read whole, one at a time, as each is one patient's record or close to it.

use crate::criteria::decisions::Decisions;
use crate::criteria::eval::{TrialResult, evaluate};
use crate::facts::PatientFacts;
use crate::facts::mappings::Mappings;
use crate::facts::store::{FactStore, Partial, Registry};
use crate::fhir::InputIssue;
use crate::fhir::files::{ReadError, ReadOptions, ReadOutput, first_type, is_ndjson_name, read_line, read_text};
use crate::time::Date;
use crate::{Config, read_options};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel};

/// Bytes per block handed to a worker: large enough that handing over costs nothing next to
/// parsing, small enough that the blocks in flight stay a few tens of MB.
const BLOCK: usize = 1 << 20;

/// How far the current run is, for a progress display: updated by the reader, the evaluator
/// and the sweep as they go, read by whoever shows it (the CLI's progress line). Counters
/// only: one per process is enough, and a library user may ignore it.
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_read: AtomicU64,
    pub patients_total: AtomicU64,
    pub patients_done: AtomicU64,
}

pub static PROGRESS: Progress = Progress {
    bytes_total: AtomicU64::new(0),
    bytes_read: AtomicU64::new(0),
    patients_total: AtomicU64::new(0),
    patients_done: AtomicU64::new(0),
};

/// What was read, for the summary and progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadStats {
    pub bytes: u64,
    pub files: usize,
}

/// Reads `files` into `store`, appending problems to `issues`.
pub fn read_files(files: &[PathBuf], cfg: &Config, store: &mut FactStore, issues: &mut Vec<InputIssue>) -> Result<ReadStats, ReadError> {
    let rank = |f: &PathBuf| {
        if !is_ndjson_name(f) {
            return 2;
        }
        match first_type(f).as_deref() {
            Some("Patient") => 0,
            Some("Medication") => 1,
            _ => 2,
        }
    };
    let mut ordered: Vec<(u8, &PathBuf)> = files.iter().map(|f| (rank(f), f)).collect();
    ordered.sort_by_key(|(r, _)| *r);
    let threads = std::thread::available_parallelism().map(usize::from).unwrap_or(1).max(1);
    let opts = read_options(cfg);
    let mut stats = ReadStats::default();
    let mut seq = 0u64;
    let total: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    PROGRESS.bytes_total.store(total, Ordering::Relaxed);
    PROGRESS.bytes_read.store(0, Ordering::Relaxed);
    for (_, f) in ordered {
        let io = |source| ReadError::Io { path: f.clone(), source };
        stats.bytes += std::fs::metadata(f).map_err(io)?.len();
        stats.files += 1;
        if is_ndjson_name(f) {
            read_ndjson(f, &cfg.mappings, opts, threads, &mut seq, store, issues)?;
            store.release();
            tracing::debug!(file = %f.display(), peak_rss_kb = peak_rss_kb(), "file read");
        } else {
            let text = std::fs::read_to_string(f).map_err(io)?;
            PROGRESS.bytes_read.fetch_add(text.len() as u64, Ordering::Relaxed);
            // Windows tools often write a UTF-8 byte-order mark, which JSON parsers reject.
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            let mut out = ReadOutput::default();
            read_text(&f.display().to_string(), text, false, opts, &mut out);
            issues.append(&mut out.issues);
            for p in out.resources {
                store.feed(p, &cfg.mappings);
            }
        }
    }
    Ok(stats)
}

struct Block {
    seq: u64,
    first_line: usize,
    bytes: Vec<u8>,
}

struct Reduced {
    seq: u64,
    partial: Partial,
    issues: Vec<InputIssue>,
}

fn reduce(name: &str, b: &Block, reg: &Registry, opts: ReadOptions, m: &Mappings) -> Reduced {
    let mut out = ReadOutput::default();
    let mut partial = Partial::default();
    let mut index = 0u64;
    for (i, line) in b.bytes.split(|&c| c == b'\n').enumerate() {
        let loc = || format!("{name}:{}", b.first_line + i);
        match std::str::from_utf8(line) {
            Ok(text) => read_line(&loc, text, opts, &mut out),
            Err(e) => out.issues.push(InputIssue {
                location: loc(),
                message: format!("not valid UTF-8 ({e}); line skipped"),
            }),
        }
        for parsed in out.resources.drain(..) {
            partial.add(reg, (b.seq << 32) | index, parsed, m);
            index += 1;
        }
    }
    Reduced {
        seq: b.seq,
        partial,
        issues: out.issues,
    }
}

/// Absorbs, in input order, the reduced blocks that are ready.
fn absorb_ready(ready: &mut BTreeMap<u64, Reduced>, next: &mut u64, store: &mut FactStore, issues: &mut Vec<InputIssue>) {
    while let Some(r) = ready.remove(next) {
        store.absorb(r.partial);
        issues.extend(r.issues);
        *next += 1;
    }
}

fn read_ndjson(
    path: &Path,
    m: &Mappings,
    opts: ReadOptions,
    threads: usize,
    seq: &mut u64,
    store: &mut FactStore,
    issues: &mut Vec<InputIssue>,
) -> Result<(), ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let name = path.display().to_string();
    // Every block of this file is reduced against the patients known before it: the file's own
    // Patients are registered as its blocks are absorbed, for the files after it.
    let reg = store.registry();
    let mut next = *seq;
    let (work_tx, work_rx) = sync_channel::<Block>(threads * 2);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = channel::<Reduced>();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (work_rx, done_tx, reg, name) = (&work_rx, done_tx.clone(), reg.clone(), name.as_str());
            s.spawn(move || {
                loop {
                    // A poisoned lock means another worker panicked; the scope re-raises that.
                    let Ok(rx) = work_rx.lock() else { return };
                    let Ok(block) = rx.recv() else { return };
                    drop(rx);
                    if done_tx.send(reduce(name, &block, &reg, opts, m)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        let mut ready = BTreeMap::new();
        let mut carry: Vec<u8> = Vec::new();
        let mut line = 1usize;
        let mut first = true;
        let result = loop {
            let mut buf = std::mem::take(&mut carry);
            let start = buf.len();
            buf.resize(start + BLOCK, 0);
            let n = match read_full(&mut file, &mut buf[start..]) {
                Ok(n) => n,
                Err(e) => break Err(io(e)),
            };
            buf.truncate(start + n);
            if first {
                first = false;
                if buf.starts_with(b"\xef\xbb\xbf") {
                    buf.drain(..3);
                }
            }
            let at_end = n == 0;
            let cut = if at_end {
                buf.len()
            } else {
                match buf.iter().rposition(|&c| c == b'\n') {
                    Some(i) => i + 1,
                    None => {
                        carry = buf; // one line longer than a block: read on
                        continue;
                    }
                }
            };
            carry = buf.split_off(cut);
            if !buf.is_empty() {
                let lines = buf.iter().filter(|&&c| c == b'\n').count();
                let block = Block {
                    seq: *seq,
                    first_line: line,
                    bytes: buf,
                };
                *seq += 1;
                line += lines;
                PROGRESS.bytes_read.fetch_add(block.bytes.len() as u64, Ordering::Relaxed);
                if work_tx.send(block).is_err() {
                    break Ok(());
                }
            }
            while let Ok(r) = done_rx.try_recv() {
                ready.insert(r.seq, r);
            }
            absorb_ready(&mut ready, &mut next, store, issues);
            if at_end {
                break Ok(());
            }
        };
        drop(work_tx);
        for r in done_rx {
            ready.insert(r.seq, r);
        }
        absorb_ready(&mut ready, &mut next, store, issues);
        result
    })
}

/// Fills `buf` as far as the file allows; fewer bytes only at the end of the file.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Brings a stored fact state up to date with an incremental export (`_since`): each
/// resource in `files` replaces the facts its earlier version gave (an amended or
/// entered-in-error value no longer counts), each resource in `deleted` (`Observation/1`)
/// takes its facts away, a changed Patient replaces the demographics, a new one is added, a
/// deleted one removed. Lab values that aged out of every window are dropped. Medications
/// the delta does not carry are not known to it: a changed medication order that points at
/// an unchanged Medication is read without that Medication's codes.
pub fn apply_delta(
    facts: Vec<PatientFacts>,
    files: &[PathBuf],
    deleted: &[String],
    cfg: &Config,
    as_of: Date,
) -> Result<crate::FactsRead, ReadError> {
    use crate::facts::extract::{demographics, extract_one};
    use crate::fhir::Resource;
    use crate::fhir::record::{MedicationIndex, normalize_reference, reference_for};
    let m = &cfg.mappings;
    let spans = crate::criteria::eval::lab_spans(&cfg.trials, m, as_of);
    let mut facts = facts;
    let mut by_key: std::collections::HashMap<String, usize> = facts.iter().enumerate().map(|(i, f)| (f.key.clone(), i)).collect();
    let mut owner: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, f) in facts.iter().enumerate() {
        for src in f.sources() {
            owner.insert(src.to_string(), i);
        }
    }
    let mut out = ReadOutput::default();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|source| ReadError::Io { path: f.clone(), source })?;
        read_text(
            &f.display().to_string(),
            text.trim_start_matches('\u{feff}'),
            is_ndjson_name(f),
            read_options(cfg),
            &mut out,
        );
    }
    let mut removed = std::collections::HashSet::new();
    for r in deleted {
        if r.starts_with("Patient/") {
            removed.insert(r.clone());
        } else if let Some(i) = owner.remove(r) {
            facts[i].forget(r);
        }
    }
    let mut meds = MedicationIndex::default();
    let mut rest = Vec::new();
    for (n, p) in out.resources.into_iter().enumerate() {
        match p.resource {
            Resource::Patient(pt) => {
                let Some(id) = pt.id.clone() else { continue };
                let key = format!("Patient/{id}");
                let demo = demographics(&pt);
                match by_key.get(&key) {
                    Some(&i) => facts[i].demographics = demo,
                    None => {
                        by_key.insert(key.clone(), facts.len());
                        facts.push(PatientFacts {
                            key,
                            demographics: demo,
                            ..Default::default()
                        });
                    }
                }
            }
            Resource::Medication(med) => {
                let reference = reference_for(&Resource::Medication(med.clone()), p.full_url.as_deref(), n);
                meds.insert(reference, *med);
            }
            resource => rest.push((n, resource, p.full_url)),
        }
    }
    let mut unmapped = crate::facts::Unmapped::default();
    let mut orphans = 0usize;
    for (n, resource, full_url) in rest {
        let reference = reference_for(&resource, full_url.as_deref(), n);
        if let Some(i) = owner.remove(&reference) {
            facts[i].forget(&reference);
        }
        let patient = resource
            .patient_reference()
            .and_then(normalize_reference)
            .and_then(|k| by_key.get(&k).copied());
        let Some(i) = patient else {
            orphans += 1;
            continue;
        };
        let demo = facts[i].demographics.clone();
        extract_one(&reference, &resource, &demo, &meds, m, Some(&spans), &mut unmapped, &mut facts[i]);
    }
    if orphans > 0 {
        out.issues.push(InputIssue {
            location: "delta".into(),
            message: format!("{orphans} changed resource(s) refer to a patient neither stored nor in the delta; skipped"),
        });
    }
    facts.retain(|f| !removed.contains(&f.key));
    // Stored values that aged out of every window can never count again.
    for f in &mut facts {
        f.keep_within(&spans);
    }
    facts.sort_by(|a, b| a.key.cmp(&b.key));
    let inputs = files
        .iter()
        .map(|f| crate::SourceFile {
            kind: "input",
            path: f.display().to_string(),
            sha256: None,
            bytes: std::fs::metadata(f).ok().map(|m| m.len()),
        })
        .collect();
    Ok(crate::FactsRead {
        facts,
        issues: out.issues,
        unmapped,
        inputs,
    })
}

/// Patients evaluated per round: each round's results are handed over before the next, so
/// results never pile up, while the round is long enough to keep every core busy.
const ROUND: usize = 2048;

/// Evaluates every trial for every patient, on every core, handing each result to `each` in
/// patient order.
pub fn evaluate_each(facts: &[PatientFacts], cfg: &Config, as_of: Date, decisions: &Decisions, each: &mut dyn FnMut(TrialResult)) {
    let threads = std::thread::available_parallelism().map(usize::from).unwrap_or(1).max(1);
    PROGRESS.patients_total.store(facts.len() as u64, Ordering::Relaxed);
    PROGRESS.patients_done.store(0, Ordering::Relaxed);
    for round in facts.chunks(ROUND) {
        let chunk = round.len().div_ceil(threads).max(1);
        let parts: Vec<Vec<TrialResult>> = std::thread::scope(|s| {
            let handles: Vec<_> = round
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut results = Vec::with_capacity(part.len() * cfg.trials.len());
                        for f in part {
                            for t in &cfg.trials {
                                results.push(evaluate(t, f, &cfg.mappings, as_of, decisions));
                            }
                        }
                        results
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        parts.into_iter().flatten().for_each(&mut *each);
        PROGRESS.patients_done.fetch_add(round.len() as u64, Ordering::Relaxed);
    }
}

/// This process's peak resident memory in KB (VmHWM), where the system reports it (Linux).
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
