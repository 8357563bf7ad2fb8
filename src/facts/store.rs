//! Per-patient facts built up as resources stream in, so that no resource outlives the moment
//! it is read: each is reduced to the few facts the mappings take from it and dropped.
//!
//! Input can come in any order. A resource is reduced as soon as its patient (and the
//! Medication it points at, if any) is known; one that comes before them is kept aside and
//! reduced at the end, when everything has been read. Bulk Data exports, where Patient.ndjson
//! is read first, keep nothing aside.
//!
//! The reduction can run on several threads at once: each works against a frozen
//! [`Registry`] (patients and Medications known so far) and returns a [`Partial`]; partials
//! are absorbed in input order, so the facts are the same whatever the thread timing.

use super::extract::{demographics, extract_one};
use super::fast::{self, Outcome};
use super::held::{self, Held};
use super::mappings::Mappings;
use super::{Basics, PatientFacts, Present, Unmapped};
use crate::fhir::files::Parsed;
use crate::fhir::record::{MedicationIndex, normalize_reference, reference_for};
use crate::fhir::{InputIssue, Resource};
use crate::time::Window;
use std::collections::HashMap;
use std::sync::Arc;

/// One of N disjoint parts of a cohort, chosen by a stable hash of the patient id, so that N
/// processes (anywhere, in any order) split a cohort with no overlap and no gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 0-based.
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// `K/N` with 1 ≤ K ≤ N, as a batch scheduler numbers its workers from 1.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let err = || format!("`{s}`: give K/N with 1 ≤ K ≤ N, such as 2/4");
        let (k, n) = s.split_once('/').ok_or_else(err)?;
        let (k, n): (u32, u32) = (k.trim().parse().map_err(|_| err())?, n.trim().parse().map_err(|_| err())?);
        if k == 0 || n == 0 || k > n {
            return Err(err());
        }
        Ok(Shard { index: k - 1, count: n })
    }

    /// Whether this shard holds the patient with this id (or `Patient/<id>` key). FNV-1a:
    /// the same on every machine and in every version, unlike the standard library's hasher.
    pub fn holds(&self, id_or_key: &str) -> bool {
        use std::hash::Hasher;
        let id = id_or_key.strip_prefix("Patient/").unwrap_or(id_or_key);
        let mut h = Fnv::default();
        h.write(id.as_bytes());
        h.finish() % u64::from(self.count) == u64::from(self.index)
    }
}

/// A hasher for patient keys, looked up once per resource: SipHash's protection against
/// crafted collisions costs more than it is worth for ids that come from the hospital's own
/// export. FNV-1a, one multiply per byte.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// The hasher of the patient table, looked up once per resource: eight bytes a step (ids are
/// tens of bytes), then mixed so that the low bits hashbrown indexes by are spread. Not
/// stable across versions, unlike [`Fnv`], and need not be.
#[derive(Default, Clone, Copy)]
pub struct Words(u64);

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl std::hash::Hasher for Words {
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap_or_default());
            h = (h.rotate_left(23) ^ w).wrapping_mul(K);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // The last eight bytes, overlapping the words before, when there are eight: a
            // patient key's tail, read in place rather than copied into a buffer (a call).
            let w = match bytes.len().checked_sub(8) {
                Some(at) => u64::from_le_bytes(bytes[at..].try_into().unwrap_or_default()),
                None => {
                    let mut buf = [0u8; 8];
                    buf[..rest.len()].copy_from_slice(rest);
                    u64::from_le_bytes(buf)
                }
            };
            h = (h.rotate_left(23) ^ w ^ rest.len() as u64).wrapping_mul(K);
        }
        self.0 = h;
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.0 = (self.0.rotate_left(23) ^ u64::from(i)).wrapping_mul(K);
    }
}

/// Maps looked up once per resource, keyed by data from this process's own input.
pub type FastHash = std::hash::BuildHasherDefault<Words>;

/// Names (`Patient/<id>`, `fullUrl`s) to patient numbers, looked up once per resource read,
/// at random across the whole cohort: so one lookup should touch one cache line. Open
/// addressing over 64-byte slots that hold the hash's tag, the number and the name itself
/// (up to 54 bytes, which an id of 36 characters and its `Patient/` fit in); longer names are
/// kept aside and compared there. A map of `String`s touches a control group, a bucket and the
/// name's own allocation, three lines far apart.
#[derive(Debug, Default, Clone)]
struct Names {
    slots: Vec<Slot>,
    long: Vec<String>,
    count: usize,
}

const INLINE: usize = 54;

#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Slot {
    tag: u32,
    value: u32,
    /// 0: empty; `u16::MAX`: the name is `long[value of the first four name bytes]`;
    /// otherwise the name's length plus one.
    len: u16,
    name: [u8; INLINE],
}

impl Slot {
    /// Where a long name (`len == u16::MAX`) is in `Names::long`.
    fn long_index(&self) -> usize {
        u32::from_le_bytes([self.name[0], self.name[1], self.name[2], self.name[3]]) as usize
    }
}

const EMPTY: Slot = Slot {
    tag: 0,
    value: 0,
    len: 0,
    name: [0; INLINE],
};

impl Names {
    fn hash(name: &str) -> u64 {
        Self::hash_bytes(name.as_bytes())
    }

    fn hash_bytes(name: &[u8]) -> u64 {
        use std::hash::Hasher;
        let mut h = Words::default();
        h.write(name);
        h.finish()
    }

    #[inline]
    fn holds(&self, slot: &Slot, name: &str) -> bool {
        if slot.len == u16::MAX {
            return self.long[slot.long_index()] == name;
        }
        usize::from(slot.len) - 1 == name.len() && slot.name[..name.len()] == *name.as_bytes()
    }

    /// The slot holding `name`, or the empty slot where it would go.
    #[inline]
    fn find(&self, name: &str, h: u64) -> usize {
        let mask = self.slots.len() - 1;
        let tag = (h >> 32) as u32;
        let mut i = h as usize & mask;
        loop {
            let slot = &self.slots[i];
            if slot.len == 0 || (slot.tag == tag && self.holds(slot, name)) {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Starts loading the slot where `name` would be, so that a [`Names::get_hashed`] a little
    /// later finds it in cache: lookups land anywhere in a table larger than the core's cache.
    /// Returns the name's hash, for that lookup. Not inlined: it is called from within the
    /// matching of a shape, whose loop must stay small.
    #[inline(never)]
    fn prefetch(&self, name: &str) -> u64 {
        let h = Self::hash(name);
        if self.slots.is_empty() {
            return h;
        }
        let i = h as usize & (self.slots.len() - 1);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `i` is in bounds; a prefetch reads nothing and cannot fault.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(self.slots.as_ptr().add(i) as *const i8);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = i;
        h
    }

    #[inline]
    fn get(&self, name: &str) -> Option<usize> {
        self.get_hashed(name, Self::hash(name))
    }

    /// [`Names::get`] of a name whose hash is `h`.
    #[inline]
    fn get_hashed(&self, name: &str, h: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let slot = &self.slots[self.find(name, h)];
        (slot.len != 0).then_some(slot.value as usize)
    }

    fn insert(&mut self, name: String, value: usize) {
        // At most three quarters full: probes stay short, slots few.
        if (self.count + 1) * 4 > self.slots.len() * 3 {
            let size = (self.slots.len() * 2).max(1024);
            let old = std::mem::replace(&mut self.slots, vec![EMPTY; size]);
            let mask = size - 1;
            // Each name is in the table once: its slot moves whole, a long name keeping its
            // place in `long`. (Inserting every name again built a String of each, on the
            // thread that registers patients one by one.)
            for slot in old.into_iter().filter(|s| s.len != 0) {
                let h = match slot.len {
                    u16::MAX => Self::hash(self.long.get(slot.long_index()).map_or("", String::as_str)),
                    len => Self::hash_bytes(&slot.name[..usize::from(len) - 1]),
                };
                let mut i = h as usize & mask;
                while self.slots[i].len != 0 {
                    i = (i + 1) & mask;
                }
                self.slots[i] = slot;
            }
        }
        let h = Self::hash(&name);
        let i = self.find(&name, h);
        let slot = &mut self.slots[i];
        if slot.len != 0 {
            slot.value = value as u32;
            return;
        }
        slot.tag = (h >> 32) as u32;
        slot.value = value as u32;
        if name.len() <= INLINE {
            slot.len = name.len() as u16 + 1;
            slot.name[..name.len()].copy_from_slice(name.as_bytes());
        } else {
            slot.len = u16::MAX;
            slot.name[..4].copy_from_slice(&(self.long.len() as u32).to_le_bytes());
            self.long.push(name);
        }
        self.count += 1;
    }
}

/// The patients and Medications known at some point of the input.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    alias: Names,
    /// Per patient, what reducing their resources reads of them.
    basics: Vec<Basics>,
    /// Per patient, whether this process screens it (see [`Shard`]).
    mine: Vec<bool>,
    meds: MedicationIndex,
    /// Per lab, the span of time in which values can matter (None: keep all).
    spans: Option<Arc<Vec<Option<Window>>>>,
}

impl Registry {
    fn patient_of(&self, target: &str) -> Option<usize> {
        self.patient_of_hashed(target, Names::hash(target))
    }

    /// Scans `line` through `shapes` into `l` (fresh) and finds the patient it refers to: the
    /// patient's entry starts loading as soon as the scan reads the subject, and is looked up
    /// with the hash computed then. None: the line cannot be scanned (as one that is not
    /// UTF-8), or has no subject or an unknown one (the full way counts those).
    fn scan_for_patient<'a, K: fast::Kind>(&self, shapes: &mut fast::Shapes<K>, line: &'a [u8], l: &mut K::Line<'a>) -> Option<usize> {
        // The text hashed last (where it is in the line, and its length) with its hash: a
        // shape that failed after reading a subject may have hashed another text.
        let mut hashed = None;
        let on_subject = |subject: &str| hashed = Some((subject.as_ptr() as usize, subject.len(), self.alias.prefetch(subject)));
        shapes.scan(line, l, on_subject).ok()?;
        let subject = K::slot(l, K::SUBJECT).and_then(|s| *s)?;
        match hashed {
            Some((at, len, h)) if at == subject.as_ptr() as usize && len == subject.len() => self.patient_of_hashed(subject, h),
            _ => self.patient_of(subject),
        }
    }

    /// [`Registry::patient_of`] of a reference whose hash is `h`.
    fn patient_of_hashed(&self, target: &str, h: u64) -> Option<usize> {
        self.alias
            .get_hashed(target, h)
            .or_else(|| normalize_reference(target).and_then(|n| self.alias.get(&n)))
    }
}

/// A resource read but not reduced yet, with its place in the input.
#[derive(Debug)]
struct Deferred {
    order: u64,
    parsed: Parsed,
}

/// A Patient or Medication to register once its run is absorbed, in input order. A Patient
/// is reduced, on the thread that parsed it, to what registering it needs: whole Patients
/// (a few KB each) held for every block in flight made the peak of a Patient file, and grew
/// with the number of blocks.
#[derive(Debug)]
enum Structural {
    Patient {
        id: Option<String>,
        full_url: Option<String>,
        basics: Basics,
        /// Encoded by [`Held::demographics`].
        demographics: Vec<u8>,
    },
    Medication {
        med: Box<crate::fhir::model::Medication>,
        full_url: Option<String>,
    },
}

/// A resource sorted: to register, or to reduce.
enum Sorted {
    Register(Structural),
    Reduce(Parsed),
}

impl Structural {
    fn patient(mut patient: crate::fhir::model::Patient, full_url: Option<String>) -> Structural {
        Structural::patient_of(patient.id.take(), &patient, full_url)
    }

    /// A Patient to register, from its fields: a parsed Patient's or a scanned line's (no
    /// Patient is built for a line read the fast way).
    fn patient_of(id: Option<String>, fields: &impl super::extract::PatientFields, full_url: Option<String>) -> Structural {
        let d = demographics(fields);
        Structural::Patient {
            basics: Basics::of(&d),
            demographics: Held::demographics(&d),
            id,
            full_url,
        }
    }

    /// The registration of a Patient or Medication; anything else is handed back.
    fn of(parsed: Parsed) -> Sorted {
        match parsed.resource {
            Resource::Patient(patient) => Sorted::Register(Structural::patient(patient, parsed.full_url)),
            Resource::Medication(med) => Sorted::Register(Structural::Medication {
                med,
                full_url: parsed.full_url,
            }),
            resource => Sorted::Reduce(Parsed {
                resource,
                full_url: parsed.full_url,
            }),
        }
    }
}

/// `patient`'s facts in a [`Partial`], made empty when first met.
fn facts_of<'a>(
    facts: &'a mut Vec<(usize, PatientFacts)>,
    at: &mut HashMap<usize, usize, FastHash>,
    patient: usize,
) -> &'a mut PatientFacts {
    let next = facts.len();
    let i = *at.entry(patient).or_insert(next);
    if i == next {
        facts.push((patient, PatientFacts::default()));
    }
    &mut facts[i].1
}

/// What one reader's [`Partial`]s pass on to each other: the room for a block's per-patient
/// facts, empty once packed. A patient's facts are several hundred bytes; grown anew for
/// every block, the room copied each of them several times over.
#[derive(Debug, Default)]
pub struct Room {
    facts: Vec<(usize, PatientFacts)>,
    at: HashMap<usize, usize, FastHash>,
}

/// What reducing one run of resources against a frozen registry gave.
#[derive(Debug, Default)]
pub struct Partial {
    /// The facts of each patient met, in the order met: `at` finds a patient's place. (A map
    /// holding the facts themselves moves every one of them, hundreds of bytes, as it grows.)
    facts: Vec<(usize, PatientFacts)>,
    at: HashMap<usize, usize, FastHash>,
    /// The facts, once packed: per patient, the kinds of record seen and where their encoded
    /// facts end in `bytes` (each starts where the one before ends).
    packed: Vec<(usize, Present, usize)>,
    bytes: Vec<u8>,
    /// Patients and Medications, registered when the partial is absorbed.
    structural: Vec<Structural>,
    deferred: Vec<Deferred>,
    unreferenced: usize,
    unmapped: Unmapped,
    /// Patients with an Observation read the fast way (their `present.observations`).
    observed: Vec<u32>,
    /// Patients with a Condition read the fast way (their `present.conditions`).
    diagnosed: Vec<u32>,
    /// Unmapped codes counted the fast way, keyed `system\0code\0unit`.
    unmapped_fast: HashMap<String, usize, FastHash>,
    key: String,
}

impl Partial {
    /// Reduces one NDJSON Observation line the fast way (see [`super::fast`]), through the
    /// reader's `shapes`. False: the line was left alone (as one that is not UTF-8), for
    /// the full parse.
    pub fn observation_line(&mut self, reg: &Registry, line: &[u8], m: &Mappings, shapes: &mut fast::ReaderShapes) -> bool {
        let mut o = fast::ObsLine::default();
        // No subject, an unknown patient (kept aside) or no id: the full way counts them.
        let Some(patient) = reg.scan_for_patient(&mut shapes.observations, line, &mut o) else {
            return false;
        };
        if o.id.is_none() {
            return false;
        }
        if !reg.mine[patient] {
            return true; // another shard's patient
        }
        let mut labs = super::Labs::default();
        let spans = reg.spans.as_deref().map(Vec::as_slice);
        let demo = &reg.basics[patient];
        let (key, counts, slow) = (&mut self.key, &mut self.unmapped_fast, &mut self.unmapped);
        let lookups = &mut shapes.lookups;
        if let Outcome::Full = fast::reduce_observation(line, &o, demo, m, spans, lookups, key, counts, slow, &mut labs) {
            return false;
        }
        self.observed.push(patient as u32);
        if !labs.is_empty() {
            let f = facts_of(&mut self.facts, &mut self.at, patient);
            f.present.observations = true;
            for (lab, values) in labs {
                f.labs.entry(lab).or_default().extend(values);
            }
        }
        true
    }

    /// Reduces one NDJSON Condition line the fast way, through the reader's `shapes`:
    /// scanned, then reduced from its borrowed fields by `extract::condition_of`, as the full
    /// way reduces a parsed Condition. False: left for the full parse.
    pub fn condition_line(&mut self, reg: &Registry, line: &[u8], m: &Mappings, shapes: &mut fast::ReaderShapes) -> bool {
        let mut c = fast::ConditionLine::default();
        let Some(patient) = reg.scan_for_patient(&mut shapes.conditions, line, &mut c) else {
            return false;
        };
        let Some(id) = c.id else { return false };
        if !reg.mine[patient] {
            return true;
        }
        self.diagnosed.push(patient as u32);
        let reference = || ["Condition/", id].concat();
        let sets = &mut shapes.lookups.sets;
        let sets_of = |system: &str, code: &str, out: &mut Vec<usize>| sets.extend(m, system, code, out);
        if let Some(x) = super::extract::condition_of(&c.fields(), reference, m, sets_of, &mut self.unmapped) {
            let f = facts_of(&mut self.facts, &mut self.at, patient);
            f.present.conditions = true;
            f.conditions.push(x);
        }
        true
    }

    /// An empty partial in the room `room` lends it.
    pub fn in_room(room: &mut Room) -> Partial {
        Partial {
            facts: std::mem::take(&mut room.facts),
            at: std::mem::take(&mut room.at),
            ..Partial::default()
        }
    }

    /// [`Partial::pack`], then gives the room, emptied, back.
    pub fn pack_into(&mut self, room: &mut Room) {
        self.pack();
        room.facts = std::mem::take(&mut self.facts);
        room.at = std::mem::take(&mut self.at);
    }

    /// Encodes the facts gathered (see [`held`]), on the thread that gathered them: the
    /// thread absorbing runs in order then only copies bytes.
    pub fn pack(&mut self) {
        self.at.clear();
        for (patient, f) in self.facts.drain(..) {
            let present = held::encode(f, &mut self.bytes);
            self.packed.push((patient, present, self.bytes.len()));
        }
    }

    /// Registers one NDJSON Patient line read the fast way (see [`super::fast`]), through
    /// the reader's `shapes`. False: the line was left alone, for the full parse.
    pub fn patient_line(&mut self, line: &[u8], shapes: &mut fast::ReaderShapes) -> bool {
        let mut p = fast::PatientLine::default();
        if shapes.patients.scan(line, &mut p, |_| {}).is_err() {
            return false;
        }
        self.structural.push(Structural::patient_of(p.id.map(str::to_string), &p, None));
        true
    }

    /// Reduces one resource; `order` is its place in the input (for resources kept aside).
    pub fn add(&mut self, reg: &Registry, order: u64, parsed: Parsed, m: &Mappings) {
        let later = match Structural::of(parsed) {
            Sorted::Register(structural) => {
                self.structural.push(structural);
                return;
            }
            Sorted::Reduce(parsed) => Deferred { order, parsed },
        };
        let resource = &later.parsed.resource;
        let Some(target) = resource.patient_reference() else {
            self.unreferenced += 1;
            return;
        };
        let patient = reg.patient_of(target);
        let med_missing = resource.medication_reference().is_some_and(|r| reg.meds.get(r).is_none());
        // Without an id, a resource is named by its place in the input, known only at the end.
        let (Some(patient), false, Some(id)) = (patient, med_missing, resource.id()) else {
            self.deferred.push(later);
            return;
        };
        if !reg.mine[patient] {
            return; // another shard's patient
        }
        let reference = [resource.type_name(), "/", id].concat();
        let f = facts_of(&mut self.facts, &mut self.at, patient);
        extract_one(
            &reference,
            resource,
            &reg.basics[patient],
            &reg.meds,
            m,
            reg.spans.as_deref().map(Vec::as_slice),
            &mut self.unmapped,
            f,
        );
    }
}

/// Every patient's facts so far.
#[derive(Debug, Default)]
pub struct FactStore {
    /// Shared with the threads reducing a run; copied only if a Patient or Medication is
    /// registered while they hold it (during the Patient file, when it is small).
    registry: Arc<Registry>,
    facts: Vec<Held>,
    deferred: Vec<Deferred>,
    unreferenced: usize,
    duplicates: usize,
    unmapped: Unmapped,
    /// Unmapped codes counted the fast way, keyed as in [`Partial`]; split at the end only.
    unmapped_fast: HashMap<String, usize, FastHash>,
    /// Bit per patient: an Observation (a Condition) of theirs was read the fast way. Kept
    /// apart from the facts and set into them at the end: a bit per line is a write into a
    /// few kilobytes, where the patient's `present` flags sit in a different cache line each.
    observed: Vec<u64>,
    diagnosed: Vec<u64>,
    /// Resources fed one at a time so far (their order, for those kept aside).
    fed: u64,
    /// Resources fed and reduced but not absorbed yet, and how many: absorbed as one run
    /// (see [`FactStore::feed`]).
    pending: Partial,
    pending_count: usize,
    shard: Option<Shard>,
}

/// Sets bit `i` of `bits` for every `i` listed, growing `bits` as needed.
fn set_bits(bits: &mut Vec<u64>, list: &[u32]) {
    for &i in list {
        let (w, b) = (i as usize / 64, i % 64);
        if w >= bits.len() {
            bits.resize(w + 1, 0);
        }
        bits[w] |= 1 << b;
    }
}

/// Order numbers of resources fed one at a time sort after those of every parallel run.
const FED_BASE: u64 = 1 << 62;

impl FactStore {
    /// A store that keeps, of each lab, only the values inside its span (see
    /// [`crate::criteria::eval::lab_spans`]): what keeps memory flat however long the history.
    pub fn keeping(spans: Vec<Option<Window>>) -> FactStore {
        let mut store = FactStore::default();
        Arc::make_mut(&mut store.registry).spans = Some(Arc::new(spans));
        store
    }

    /// Screens only the patients of `shard`; the others are still registered (so that their
    /// resources are told apart from those of patients not in the input) but not reduced.
    pub fn sharded(mut self, shard: Option<Shard>) -> FactStore {
        self.shard = shard;
        self
    }

    /// The registry as it stands, for reducing a run of resources on other threads.
    pub fn registry(&mut self) -> Arc<Registry> {
        self.registry.clone()
    }

    fn register(&mut self, s: Structural) {
        // Only a nameless Patient or Medication (no id, no fullUrl) is named by number.
        let i = self.facts.len();
        let registry = Arc::make_mut(&mut self.registry);
        match s {
            Structural::Patient {
                id,
                full_url,
                basics,
                demographics,
            } => {
                let key = match (&id, &full_url) {
                    (Some(id), _) => ["Patient/", id.as_str()].concat(),
                    (None, Some(url)) => url.clone(),
                    (None, None) => format!("Patient#{i}"),
                };
                let existing = registry.alias.get(&key);
                let index = existing.unwrap_or(self.facts.len());
                if let Some(url) = &full_url {
                    registry.alias.insert(url.clone(), index);
                }
                if existing.is_some() {
                    // The same patient in two files (a Bundle per encounter): keep the first.
                    self.duplicates += 1;
                    return;
                }
                registry.alias.insert(key.clone(), index);
                registry.basics.push(basics);
                registry.mine.push(self.shard.is_none_or(|s| s.holds(&key)));
                self.facts.push(Held::with(key, demographics));
            }
            Structural::Medication { med, full_url } => {
                let reference = reference_for(&Resource::Medication(med.clone()), full_url.as_deref(), i);
                if let Some(url) = &full_url {
                    registry.meds.insert(url.clone(), (*med).clone());
                }
                registry.meds.insert(reference, *med);
            }
        }
    }

    /// Kept for callers that hand the registry back once a run is reduced: the registry is
    /// shared, not copied, so there is nothing to drop.
    pub fn release(&mut self) {}

    /// Merges a run reduced elsewhere. Runs must be absorbed in input order.
    pub fn absorb(&mut self, p: Partial) {
        self.flush();
        self.merge(p);
    }

    /// Absorbs the resources fed and not absorbed yet.
    fn flush(&mut self) {
        let p = std::mem::take(&mut self.pending);
        self.pending_count = 0;
        self.merge(p);
    }

    fn merge(&mut self, mut p: Partial) {
        for d in std::mem::take(&mut p.structural) {
            self.register(d);
        }
        // Lab values outside their span were never built (extract_one skips them): nothing
        // to prune here.
        p.pack();
        let mut from = 0;
        for &(patient, present, to) in &p.packed {
            self.facts[patient].append(present, &p.bytes[from..to]);
            from = to;
        }
        set_bits(&mut self.observed, &p.observed);
        set_bits(&mut self.diagnosed, &p.diagnosed);
        for (k, n) in p.unmapped_fast {
            *self.unmapped_fast.entry(k).or_default() += n;
        }
        self.deferred.extend(p.deferred);
        self.unreferenced += p.unreferenced;
        self.unmapped.merge(p.unmapped);
    }

    /// Reduces one resource now, against everything read so far. Its facts are absorbed
    /// with those of the next few thousand resources fed, as one run: a patient's held bytes
    /// are then extended once per run, not copied again for every resource (a Bundle or a
    /// server's pages holding one patient's long history).
    pub fn feed(&mut self, parsed: Parsed, m: &Mappings) {
        const RUN: usize = 4096;
        let order = FED_BASE + self.fed;
        self.fed += 1;
        let parsed = match Structural::of(parsed) {
            Sorted::Register(structural) => {
                self.register(structural);
                return;
            }
            Sorted::Reduce(parsed) => parsed,
        };
        self.pending.add(&self.registry, order, parsed, m);
        self.pending_count += 1;
        if self.pending_count >= RUN {
            self.flush();
        }
    }

    /// Reduces what was kept aside, now that everything is known, and hands over every
    /// patient's facts (sorted by patient key), the issues found and the unmapped codes.
    pub fn finish(mut self, m: &Mappings) -> (Vec<Held>, Vec<InputIssue>, Unmapped) {
        self.flush();
        let registry = Arc::unwrap_or_clone(std::mem::take(&mut self.registry));
        let mut deferred = std::mem::take(&mut self.deferred);
        deferred.sort_by_key(|d| d.order);
        let mut orphans = 0usize;
        let mut nameless = 0usize;
        // Gathered per patient and appended once each (see `feed`).
        let (mut late, mut at) = (Vec::new(), HashMap::default());
        for d in deferred {
            let resource = &d.parsed.resource;
            let Some(patient) = resource.patient_reference().and_then(|t| registry.patient_of(t)) else {
                orphans += 1;
                continue;
            };
            if !registry.mine[patient] {
                continue;
            }
            let reference = match (resource.id(), &d.parsed.full_url) {
                (Some(_), _) | (None, Some(_)) => reference_for(resource, d.parsed.full_url.as_deref(), 0),
                (None, None) => {
                    nameless += 1;
                    reference_for(resource, None, nameless)
                }
            };
            extract_one(
                &reference,
                resource,
                &registry.basics[patient],
                &registry.meds,
                m,
                registry.spans.as_deref().map(Vec::as_slice),
                &mut self.unmapped,
                facts_of(&mut late, &mut at, patient),
            );
        }
        for (patient, f) in late {
            self.facts[patient].add(f);
        }
        let mut issues = Vec::new();
        let mut say = |n: usize, message: String| {
            if n > 0 {
                issues.push(InputIssue {
                    location: "input".into(),
                    message,
                });
            }
        };
        say(
            orphans,
            format!("{orphans} resource(s) refer to a patient that is not in the input; skipped"),
        );
        say(
            self.unreferenced,
            format!("{} resource(s) have no subject/patient reference; skipped", self.unreferenced),
        );
        say(
            self.duplicates,
            format!(
                "{} Patient resource(s) appear more than once; the first copy of each was used",
                self.duplicates
            ),
        );
        for (k, n) in std::mem::take(&mut self.unmapped_fast) {
            let mut parts = k.split('\0');
            let (s, c, u) = (parts.next(), parts.next(), parts.next());
            let key = (
                s.unwrap_or("").to_string(),
                c.unwrap_or("").to_string(),
                u.unwrap_or("").to_string(),
            );
            *self.unmapped.counts.entry(key).or_default() += n;
        }
        let bit = |bits: &[u64], i: usize| bits.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1);
        // In place: a second vector of every patient's facts would double the peak.
        let mut facts = self.facts;
        for (i, f) in facts.iter_mut().enumerate() {
            let present = f.present_mut();
            present.observations |= bit(&self.observed, i);
            present.conditions |= bit(&self.diagnosed, i);
        }
        if registry.mine.iter().any(|m| !m) {
            let mut mine = registry.mine.into_iter();
            facts.retain(|_| mine.next().unwrap_or(false));
        }
        facts.shrink_to_fit();
        facts.sort_unstable_by(|a, b| a.key().cmp(b.key())); // keys are unique; no merge buffer
        tracing::debug!(
            patients = facts.len(),
            bytes = facts.iter().map(Held::len).sum::<usize>(),
            "facts held"
        );
        (facts, issues, self.unmapped)
    }
}

#[cfg(test)]
mod names_tests {
    use super::Names;

    #[test]
    fn names_find_what_was_put_short_long_and_after_growth() {
        let mut n = Names::default();
        assert_eq!(n.get("Patient/x"), None);
        let long = format!("urn:uuid:{}", "0123456789abcdef".repeat(5));
        // A long name put first moves with every growth of the table.
        let first = format!("urn:uuid:{}", "fedcba9876543210".repeat(5));
        n.insert(first.clone(), 8888);
        for i in 0..5000 {
            n.insert(format!("Patient/{i:036}"), i);
        }
        assert_eq!(n.get(&first), Some(8888));
        n.insert(long.clone(), 9999);
        n.insert(String::new(), 7);
        for i in 0..5000 {
            assert_eq!(n.get(&format!("Patient/{i:036}")), Some(i));
        }
        assert_eq!(n.get(&long), Some(9999));
        assert_eq!(n.get(""), Some(7));
        assert_eq!(n.get(&long[..long.len() - 1]), None);
        assert_eq!(n.get("Patient/5000"), None);
        n.insert("Patient/000000000000000000000000000000000001".into(), 42);
        assert_eq!(n.get("Patient/000000000000000000000000000000000001"), Some(42));
    }
}

#[cfg(test)]
mod feed_tests {
    use super::*;
    use crate::fhir::files::{ReadOptions, ReadOutput, read_text};

    fn observation(id: &str, patient: &str, value: u32) -> String {
        format!(
            r#"{{"resourceType":"Observation","id":"{id}","status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"777-3"}}]}},"subject":{{"reference":"Patient/{patient}"}},"effectiveDateTime":"2026-01-01T00:00:00Z","valueQuantity":{{"value":{value},"unit":"10*9/L","system":"http://unitsofmeasure.org","code":"10*9/L"}}}}"#
        )
    }

    /// Resources fed one at a time are absorbed in runs: across a run's end, kept aside until
    /// their patient is known, or for no patient at all, each counts once and in input order.
    #[test]
    fn fed_resources_count_once_in_order_across_runs() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let m = Mappings::load_dir(&root.join("mappings")).expect("mappings load");
        let lab = m.lab("platelets").expect("a platelets lab");
        let mut lines = vec![observation("early", "p", 1)];
        lines.push(r#"{"resourceType":"Patient","id":"p","gender":"female"}"#.to_string());
        lines.extend((0..5000).map(|i| observation(&format!("o{i}"), "p", 100 + i)));
        lines.push(observation("stray", "nobody", 7));
        let mut out = ReadOutput::default();
        read_text("t.ndjson", &lines.join("\n"), true, ReadOptions::default(), &mut out);
        assert!(out.issues.is_empty(), "{:?}", out.issues);
        let mut store = FactStore::default();
        for p in out.resources {
            store.feed(p, &m);
        }
        let (facts, issues, _) = store.finish(&m);
        assert_eq!(facts.len(), 1);
        let f = facts[0].try_facts().expect("held facts decode");
        assert!(f.present.observations);
        assert_eq!(f.demographics.gender.as_deref(), Some("female"));
        let ids: Vec<&str> = f.labs[&lab].iter().map(|v| v.tie.as_str()).collect();
        let mut want: Vec<String> = (0..5000).map(|i| format!("o{i}")).collect();
        want.push("early".into()); // kept aside until the end
        assert_eq!(ids, want);
        assert_eq!(f.labs[&lab][0].resource, "Observation/o0");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(
            issues[0]
                .message
                .starts_with("1 resource(s) refer to a patient that is not in the input")
        );
    }
}
