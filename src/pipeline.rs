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
use crate::facts::fast::ReaderShapes;
use crate::facts::held::Held;
use crate::facts::mappings::Mappings;
use crate::facts::store::{FactStore, Partial, Registry, Room};
use crate::fhir::InputIssue;
use crate::fhir::files::{ReadError, ReadOptions, ReadOutput, first_type, is_ndjson_name, read_line, read_text};
use crate::time::Date;
use crate::{Config, read_options};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;

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

/// What reducing one block of an NDJSON file gave.
struct Reduced {
    seq: u64,
    partial: Partial,
    /// Lines that start in the block: the line numbers of later blocks depend on it.
    lines: usize,
    /// Problems, each with its line's index in the block; the location is completed (file
    /// and line number) once the lines before the block are counted.
    issues: Vec<(usize, InputIssue)>,
}

/// Marks where the file and line go in an issue's location until they are known.
const LINE_MARK: &str = "\0";

/// Reduces the lines of one block. Observation, Condition and Patient lines take the fast
/// way (`facts::fast`) first; it hands back, for the full parse, an Observation whose lab is read
/// through JSONPath (the full parse then keeps its JSON).
fn reduce(seq: u64, text: &[u8], reg: &Registry, opts: ReadOptions, m: &Mappings, shapes: &mut ReaderShapes, room: &mut Room) -> Reduced {
    let mut out = ReadOutput::default();
    let mut partial = Partial::in_room(room);
    let mut issues = Vec::new();
    if text.is_empty() {
        return Reduced {
            seq,
            partial,
            lines: 0,
            issues,
        };
    }
    let mut index = 0u64;
    let mut lines = 0;
    let mut from = 0;
    for i in 0.. {
        if from > text.len() {
            break;
        }
        let to = memchr::memchr(b'\n', &text[from..]).map_or(text.len(), |n| from + n);
        let line = &text[from..to];
        from = to + 1;
        lines = i + 1;
        // The fast ways take the line's bytes: they check that it is UTF-8 as they scan it,
        // nearly for free (see `Scanner::map`), and leave it alone when it is not.
        let t = line.trim_ascii_end();
        let done = if t.starts_with(b"{\"resourceType\":\"Observation\"") {
            partial.observation_line(reg, t, m, shapes)
        } else if t.starts_with(b"{\"resourceType\":\"Condition\"") {
            partial.condition_line(reg, t, m, shapes)
        } else if t.starts_with(b"{\"resourceType\":\"Patient\"") {
            partial.patient_line(t, shapes)
        } else {
            false
        };
        if done {
            continue;
        }
        let loc = || LINE_MARK.to_string();
        let text = match std::str::from_utf8(line) {
            Ok(text) => text,
            Err(e) => {
                issues.push((
                    i,
                    InputIssue {
                        location: loc(),
                        message: format!("not valid UTF-8 ({e}); line skipped"),
                    },
                ));
                continue;
            }
        };
        read_line(&loc, text, opts, &mut out);
        for parsed in out.resources.drain(..) {
            partial.add(reg, (seq << 32) | index, parsed, m);
            index += 1;
        }
        issues.extend(out.issues.drain(..).map(|x| (i, x)));
    }
    // A block ends with its last line's newline: the empty piece after it is no line.
    if text.last() == Some(&b'\n') {
        lines -= 1;
    }
    partial.pack_into(room);
    Reduced {
        seq,
        partial,
        lines,
        issues,
    }
}

/// Absorbs, in input order, the reduced blocks that are ready; `line` is the number of the
/// first line of the next block.
fn absorb_ready(
    ready: &mut BTreeMap<u64, Reduced>,
    next: &mut u64,
    line: &mut usize,
    name: &str,
    store: &mut FactStore,
    issues: &mut Vec<InputIssue>,
) {
    while let Some(r) = ready.remove(next) {
        store.absorb(r.partial);
        for (i, mut x) in r.issues {
            x.location = x.location.replacen(LINE_MARK, &format!("{name}:{}", *line + i), 1);
            issues.push(x);
        }
        *line += r.lines;
        *next += 1;
    }
}

/// Reads one NDJSON file on every core. The file is cut into blocks of `BLOCK` bytes; the
/// workers take blocks in turn, each reading its own with positioned reads (no thread copies
/// for another), and reduce the lines that *start* in it (a line running past the block's end
/// is read on to its newline; the partial line at a block's start belongs to the block
/// before). The main thread only absorbs the results in file order.
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
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let name = path.display().to_string();
    // Every block of this file is reduced against the patients known before it: the file's own
    // Patients are registered as its blocks are absorbed, for the files after it.
    let reg = store.registry();
    let blocks = len.div_ceil(BLOCK as u64);
    let first_seq = *seq;
    *seq += blocks;
    let taken = AtomicU64::new(0);
    let failed: Mutex<Option<std::io::Error>> = Mutex::new(None);
    // Bounded: blocks reduced faster than the main thread absorbs them (a Patient file, whose
    // Patients the main thread registers one by one) would otherwise pile up in the
    // channel, a peak that grows with the file. The main thread never stops receiving, so a
    // worker waits only while it is ahead.
    let (done_tx, done_rx) = sync_channel::<Reduced>(threads);
    std::thread::scope(|s| {
        for _ in 0..threads.min(blocks as usize).max(1) {
            let (done_tx, reg, file, taken, failed) = (done_tx.clone(), &reg, &file, &taken, &failed);
            s.spawn(move || {
                // Room for a block and the end of its last line from the start: growing it
                // then would copy the whole block.
                let mut buf = Vec::with_capacity(BLOCK + BLOCK / 8);
                // Kept from block to block: a file's lines keep their shapes.
                let mut shapes = ReaderShapes::default();
                let mut room = Room::default();
                loop {
                    let k = taken.fetch_add(1, Ordering::Relaxed);
                    if k >= blocks {
                        return;
                    }
                    let region = match block_lines(file, k, len, &mut buf) {
                        Ok(r) => r,
                        Err(e) => {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                            // Stop the others too: the file cannot be read whole.
                            taken.store(blocks, Ordering::Relaxed);
                            return;
                        }
                    };
                    PROGRESS.bytes_read.fetch_add(region.len() as u64, Ordering::Relaxed);
                    if done_tx
                        .send(reduce(first_seq + k, &buf[region], reg, opts, m, &mut shapes, &mut room))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        let mut ready = BTreeMap::new();
        let (mut next, mut line) = (first_seq, 1usize);
        for r in done_rx {
            ready.insert(r.seq, r);
            absorb_ready(&mut ready, &mut next, &mut line, &name, store, issues);
        }
    });
    match failed.into_inner().ok().flatten() {
        Some(e) => Err(io(e)),
        None => Ok(()),
    }
}

/// Reads into `buf` the lines that start in block `k` of the file: from the first line start
/// at or after `k * BLOCK` (a byte-order mark at the very start of the file is left out) to
/// the end of the last such line. Returns their range in `buf` (empty when none start there).
fn block_lines(file: &std::fs::File, k: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<std::ops::Range<usize>> {
    let start = k * BLOCK as u64;
    let end = (start + BLOCK as u64).min(len);
    // One byte before the block tells whether a line starts right at it.
    let from = start.saturating_sub(1);
    // `buf` is reused from block to block: grown (zeroed) only when too short, never cleared,
    // so the file is not preceded by a memset of every byte.
    let mut used = (end - from) as usize;
    if buf.len() < used {
        buf.resize(used, 0);
    }
    read_exact_at(file, &mut buf[..used], from)?;
    let first = if k == 0 {
        if buf[..used].starts_with(b"\xef\xbb\xbf") { 3 } else { 0 }
    } else {
        match memchr::memchr(b'\n', &buf[..used]) {
            Some(i) => i + 1,
            None => return Ok(0..0), // inside one long line that began earlier
        }
    };
    if first >= used {
        return Ok(0..0);
    }
    // Read on to the end of the last line.
    if buf[used - 1] != b'\n' {
        let mut at = end;
        while at < len {
            let n = (BLOCK as u64 / 16).min(len - at) as usize;
            if buf.len() < used + n {
                buf.resize(used + n, 0);
            }
            read_exact_at(file, &mut buf[used..used + n], at)?;
            at += n as u64;
            if let Some(i) = memchr::memchr(b'\n', &buf[used..used + n]) {
                used += i + 1;
                break;
            }
            used += n;
        }
    }
    Ok(first..used)
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(not(unix))]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(buf)
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
        let demo = crate::facts::Basics::of(&facts[i].demographics);
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
        facts: facts.into_iter().map(Held::from).collect(),
        issues: out.issues,
        unmapped,
        inputs,
    })
}

/// Results (patients × trials) per chunk: small enough that the results in flight stay few
/// (a result with its explanations can weigh kilobytes), large enough that handing over
/// costs nothing.
const ROUND: usize = 128;

/// Evaluates every trial for every patient, on every core, handing each result to `each` in
/// patient order. The facts are consumed (see [`evaluate_held`], which borrows them).
pub fn evaluate_each(
    facts: Vec<Held>,
    cfg: &Config,
    as_of: Date,
    decisions: &Decisions,
    detail: crate::criteria::Detail,
    each: &mut dyn FnMut(TrialResult),
) {
    evaluate_held(&facts, cfg, as_of, decisions, detail, Some(&PROGRESS), &mut |results| {
        results.into_iter().for_each(&mut *each);
        true
    });
}

/// Evaluates every trial for every patient, on every core, handing the results to `each` in
/// patient order, a chunk at a time, until `each` answers false. The workers take chunks of
/// patients in turn; the calling thread hands the finished chunks over (writing a report
/// row, freeing the result) while the workers go on, so that no core waits for the writing.
/// At most a few chunks per worker are in flight. With `progress`, the patients evaluated are
/// counted there.
///
/// The facts are only borrowed, so that a sweep can evaluate them again for each thing it
/// writes rather than hold every verdict: a held patient is a few hundred bytes, a result
/// with its explanations several kilobytes per trial.
pub fn evaluate_held(
    facts: &[Held],
    cfg: &Config,
    as_of: Date,
    decisions: &Decisions,
    detail: crate::criteria::Detail,
    progress: Option<&Progress>,
    each: &mut dyn FnMut(Vec<TrialResult>) -> bool,
) {
    let threads = std::thread::available_parallelism().map(usize::from).unwrap_or(1).max(1);
    if let Some(p) = progress {
        p.patients_total.store(facts.len() as u64, Ordering::Relaxed);
        p.patients_done.store(0, Ordering::Relaxed);
    }
    let per_chunk = (ROUND / cfg.trials.len().max(1)).max(1);
    let chunks = facts.len().div_ceil(per_chunk);
    // The next chunk's number: chunk k holds the k-th run of patients.
    let next_chunk = AtomicUsize::new(0);
    // Bounded: a worker far ahead of the writer waits rather than piling results up.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, usize, Vec<TrialResult>)>(threads);
    std::thread::scope(|s| {
        for _ in 0..threads.min(chunks) {
            let (tx, next_chunk) = (tx.clone(), &next_chunk);
            s.spawn(move || {
                loop {
                    let k = next_chunk.fetch_add(1, Ordering::Relaxed);
                    let start = k.saturating_mul(per_chunk);
                    let Some(part) = facts
                        .get(start..facts.len().min(start.saturating_add(per_chunk)))
                        .filter(|p| !p.is_empty())
                    else {
                        return;
                    };
                    let mut results = Vec::with_capacity(part.len() * cfg.trials.len());
                    for held in part {
                        // Decoded one at a time: only held facts are kept for every patient.
                        let f = held.facts();
                        for t in &cfg.trials {
                            results.push(evaluate(t, &f, &cfg.mappings, as_of, decisions, detail));
                        }
                    }
                    // Refused once the caller stopped listening: nothing more is wanted.
                    if tx.send((k, part.len(), results)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut ready = BTreeMap::new();
        let mut next = 0usize;
        'hand: for (k, n, results) in rx.iter() {
            ready.insert(k, (n, results));
            while let Some((n, results)) = ready.remove(&next) {
                if !each(results) {
                    break 'hand;
                }
                if let Some(p) = progress {
                    p.patients_done.fetch_add(n as u64, Ordering::Relaxed);
                }
                next += 1;
            }
        }
        // Workers blocked on a full channel see it closed and stop.
        drop(rx);
    });
}

/// This process's peak resident memory in KB (VmHWM), where the system reports it (Linux).
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
