//! Sweep state in a database: every batch of verdicts is committed as it is made, so a sweep
//! killed at any moment (kill -9, power loss) resumes from its last commit with nobody
//! screened twice and nobody missed; and the verdicts of finished runs are kept, so each run
//! can say who became eligible or ineligible since the one before.
//!
//! The database is an embedded SQLite file by default, or PostgreSQL (a `postgres://` URL)
//! when several processes share a cohort: the shards of one sweep, or a daemon and its
//! stand-by. Both hold the same tables and answer the same few queries, written once.
//!
//! A run is identified by what decides its verdicts: the source, the cohort, the trials (by
//! their configuration hash), the shard and the screening date. Starting the same run again
//! while an earlier one is unfinished resumes that one. A different screening date is a new
//! run of the same cohort, compared with the last finished one.

use crate::criteria::eval::TrialResult;
use rusqlite::Connection;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("sweep state {path}: {source}")]
    Db { path: String, source: rusqlite::Error },
    #[error("sweep state {path}: {message}")]
    Postgres { path: String, message: String },
    #[error("sweep state {path}: a stored verdict cannot be read ({source}); the file may come from another version")]
    Stored { path: String, source: serde_json::Error },
    /// Not stored rather than stored in part: later deltas would build on what was lost.
    #[error("sweep state {path}: the fact state was not saved: {source}")]
    Facts {
        path: String,
        source: crate::facts::held::HeldError,
    },
    /// A resumed sweep's earlier verdicts are read from its state: it must be given.
    #[error("sweep state: {0} patient(s) were screened before the interruption and their verdicts are in the state, which was not given")]
    NotGiven(usize),
    #[error(
        "sweep state {path}: another process is running this sweep now (same cohort, trials, shard and date); \
         wait for it, or give each process its own --shard"
    )]
    Busy { path: String },
}

/// Where the state lives: a SQLite file, or a PostgreSQL database shared by processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    Postgres(String),
}

impl Location {
    /// A `postgres://` or `postgresql://` URL is PostgreSQL; anything else is a file path.
    pub fn parse(s: &str) -> Location {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Location::Postgres(s.to_string())
        } else {
            Location::File(PathBuf::from(s))
        }
    }

    /// For messages and logs: a URL without its password.
    pub fn shown(&self) -> String {
        match self {
            Location::File(p) => p.display().to_string(),
            Location::Postgres(url) => redact(url),
        }
    }

    /// Whether the database answers (for `/health`). A file not created yet is not an error.
    pub fn ping(&self) -> Result<&'static str, String> {
        match self {
            Location::File(p) if !p.exists() => Ok("not created yet (the first sweep creates it)"),
            Location::File(p) => Connection::open(p)
                .and_then(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
                .map(|_| "ok")
                .map_err(|e| e.to_string()),
            Location::Postgres(url) => {
                let pg = Pg::connect(url).map_err(|e| e.to_string())?;
                pg.query("SELECT 1", Vec::new()).map(|_| "ok").map_err(|e| e.to_string())
            }
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

/// `postgres://user:secret@host/db` shown as `postgres://user:***@host/db`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(x) => x,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// A patient whose status for a trial changed since the previous finished run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub patient: String,
    pub trial: String,
    /// None: not screened by the previous run.
    pub from: Option<String>,
    pub to: String,
}

#[derive(Debug, Default)]
pub struct Changes {
    /// The screening date of the run compared with, if any.
    pub since: Option<String>,
    pub newly_eligible: Vec<Change>,
    pub newly_ineligible: Vec<Change>,
}

pub struct State {
    db: Backend,
    run: i64,
    cohort_key: String,
    /// Whether this run picks up one that was interrupted.
    pub resumed: bool,
}

/// The tables, in SQLite's types; `schema` turns them into PostgreSQL's.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    run_key TEXT NOT NULL,
    cohort_key TEXT NOT NULL,
    as_of TEXT NOT NULL,
    started INTEGER NOT NULL,
    finished INTEGER
);
CREATE INDEX IF NOT EXISTS runs_by_key ON runs (run_key, finished);
CREATE TABLE IF NOT EXISTS facts (
    cohort_key TEXT NOT NULL,
    patient TEXT NOT NULL,
    facts TEXT NOT NULL,
    PRIMARY KEY (cohort_key, patient)
);
CREATE TABLE IF NOT EXISTS exports (
    cohort_key TEXT PRIMARY KEY,
    transaction_time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    run INTEGER NOT NULL REFERENCES runs (id),
    patient TEXT NOT NULL,
    trial TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (run, patient, trial)
);
CREATE TABLE IF NOT EXISTS latest (
    patient TEXT NOT NULL,
    trial TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (patient, trial)
);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    patient TEXT NOT NULL,
    trial TEXT NOT NULL,
    from_status TEXT,
    to_status TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_by_patient ON transitions (patient, trial, at);
CREATE TABLE IF NOT EXISTS subscription_events (
    subscription TEXT PRIMARY KEY,
    event_number INTEGER NOT NULL,
    at TEXT NOT NULL
);
";

/// PostgreSQL's form of `SCHEMA`: 64-bit integers, a sequence for run ids. Processes starting
/// at once would race on `CREATE TABLE IF NOT EXISTS` (not atomic there): a transaction lock
/// orders them.
fn postgres_schema() -> String {
    let tables = SCHEMA
        .replace("id INTEGER PRIMARY KEY", "id BIGSERIAL PRIMARY KEY")
        .replace("INTEGER", "BIGINT");
    format!("BEGIN;\nSELECT pg_advisory_xact_lock(7240571);\n{tables}COMMIT;\n")
}

fn now() -> i64 {
    crate::time::Instant::now().0
}

impl State {
    /// Opens (creating if needed) the state at `location` and starts, or resumes, the run
    /// `run_key` of the cohort `cohort_key`. With PostgreSQL the run is locked for as long as
    /// this `State` lives: a second process starting the same run is refused (`Busy`).
    pub fn open(location: &Location, run_key: &str, cohort_key: &str, as_of: &str) -> Result<State, StateError> {
        let db = Backend::open(location)?;
        if matches!(db.kind, Kind::Pg(_)) {
            let got = db.query("SELECT pg_try_advisory_lock(hashtextextended(?1, 0))", vec![Val::text(run_key)])?;
            if first(got).and_then(Val::int) != Some(1) {
                return Err(StateError::Busy { path: location.shown() });
            }
        }
        let open = db.query(
            "SELECT id FROM runs WHERE run_key = ?1 AND finished IS NULL ORDER BY id DESC LIMIT 1",
            vec![Val::text(run_key)],
        )?;
        let (run, resumed) = match first(open).and_then(Val::int) {
            Some(id) => (id, true),
            None => {
                let made = db.query(
                    "INSERT INTO runs (run_key, cohort_key, as_of, started) VALUES (?1, ?2, ?3, ?4) RETURNING id",
                    vec![Val::text(run_key), Val::text(cohort_key), Val::text(as_of), Val::Int(now())],
                )?;
                let id = first(made).and_then(Val::int).ok_or_else(|| db.odd("no id for the new run"))?;
                (id, false)
            }
        };
        Ok(State {
            db,
            run,
            cohort_key: cohort_key.to_string(),
            resumed,
        })
    }

    /// The screening date of the newest unfinished run of `cohort_key` in the state at
    /// `location`, if it exists and holds one.
    pub fn unfinished_as_of(location: &Location, cohort_key: &str) -> Result<Option<String>, StateError> {
        if let Location::File(path) = location {
            if !path.exists() {
                return Ok(None);
            }
        }
        let db = Backend::open(location)?;
        let rows = db.query(
            "SELECT as_of FROM runs WHERE cohort_key = ?1 AND finished IS NULL ORDER BY id DESC LIMIT 1",
            vec![Val::text(cohort_key)],
        )?;
        Ok(first(rows).and_then(Val::into_text))
    }

    /// The patients whose verdicts this run has already committed (none for a new run), as
    /// the results name them (`Patient/<id>`). Their verdicts stay in the database until
    /// read, a few at a time, by [`State::done_of`]: a resumed cohort's can be gigabytes.
    pub fn done_patients(&self) -> Result<Vec<String>, StateError> {
        let rows = self
            .db
            .query("SELECT DISTINCT patient FROM results WHERE run = ?1", vec![Val::Int(self.run)])?;
        Ok(rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().and_then(Val::into_text))
            .collect())
    }

    /// The verdicts this run has committed for these patients.
    pub fn done_of(&self, patients: &[String]) -> Result<Vec<TrialResult>, StateError> {
        if patients.is_empty() {
            return Ok(Vec::new());
        }
        let marks: Vec<String> = (2..patients.len() + 2).map(|i| format!("?{i}")).collect();
        let sql = format!("SELECT result FROM results WHERE run = ?1 AND patient IN ({})", marks.join(", "));
        let mut params = vec![Val::Int(self.run)];
        params.extend(patients.iter().map(|p| Val::text(p)));
        self.json_rows(&sql, params)
    }

    /// The JSON in the one column `sql` selects, read back into `T`.
    fn json_rows<T: serde::de::DeserializeOwned>(&self, sql: &str, params: Vec<Val>) -> Result<Vec<T>, StateError> {
        let rows = self.db.query(sql, params)?;
        let mut out = Vec::with_capacity(rows.len());
        for text in rows.into_iter().filter_map(|r| r.into_iter().next().and_then(Val::into_text)) {
            out.push(serde_json::from_str(&text).map_err(|source| StateError::Stored {
                path: self.db.shown.clone(),
                source,
            })?);
        }
        Ok(out)
    }

    /// Commits a batch of verdicts: the checkpoint a resumed run starts from. Results in
    /// `error` are not kept, so a resumed run tries those patients again.
    pub fn save(&mut self, results: &[TrialResult]) -> Result<(), StateError> {
        let rows = kept(results)
            .map(|(r, json)| {
                vec![
                    Val::Int(self.run),
                    Val::text(&r.patient),
                    Val::text(&r.trial),
                    Val::text(r.status.as_str()),
                    json,
                ]
            })
            .collect();
        self.db.write(vec![Step {
            sql: "INSERT INTO results (run, patient, trial, status, result) VALUES (?1, ?2, ?3, ?4, ?5) \
                  ON CONFLICT (run, patient, trial) DO UPDATE SET status = excluded.status, result = excluded.result",
            rows,
        }])
    }

    /// Forgets the verdicts this run has committed. A pass that stores every verdict of the
    /// cohort (a Bulk sweep's) starts with it: a pass cut short before left rows behind,
    /// and a patient gone from the cohort since would keep one.
    pub fn clear(&mut self) -> Result<(), StateError> {
        self.db.write(vec![Step {
            sql: "DELETE FROM results WHERE run = ?1",
            rows: vec![vec![Val::Int(self.run)]],
        }])
    }

    /// The fact state an incremental export starts from: every patient's facts and the
    /// `transactionTime` of the export they are current to. None before the first full run.
    pub fn saved_facts(&self) -> Result<Option<(Vec<crate::facts::PatientFacts>, String)>, StateError> {
        let since = self.db.query(
            "SELECT transaction_time FROM exports WHERE cohort_key = ?1",
            vec![Val::text(&self.cohort_key)],
        )?;
        let Some(since) = first(since).and_then(Val::into_text) else {
            return Ok(None);
        };
        let key = Val::text(&self.cohort_key);
        let facts = self.json_rows("SELECT facts FROM facts WHERE cohort_key = ?1 ORDER BY patient", vec![key])?;
        Ok(Some((facts, since)))
    }

    /// Replaces the fact state with `facts`, current to the export of `transaction_time`.
    pub fn save_facts(&mut self, facts: &[crate::facts::held::Held], transaction_time: &str) -> Result<(), StateError> {
        let key = Val::text(&self.cohort_key);
        let mut rows = Vec::with_capacity(facts.len());
        for h in facts {
            let f = h.try_facts().map_err(|source| StateError::Facts {
                path: self.db.shown.clone(),
                source,
            })?;
            // Serializing plain structs of strings and numbers cannot fail.
            rows.push(vec![
                key.clone(),
                Val::text(h.key()),
                Val::Text(serde_json::to_string(&f).unwrap_or_default()),
            ]);
        }
        self.db.write(vec![
            Step {
                sql: "DELETE FROM facts WHERE cohort_key = ?1",
                rows: vec![vec![key.clone()]],
            },
            Step {
                sql: "INSERT INTO facts (cohort_key, patient, facts) VALUES (?1, ?2, ?3)",
                rows,
            },
            Step {
                sql: "INSERT INTO exports (cohort_key, transaction_time) VALUES (?1, ?2) \
                      ON CONFLICT (cohort_key) DO UPDATE SET transaction_time = excluded.transaction_time",
                rows: vec![vec![key, Val::text(transaction_time)]],
            },
        ])
    }

    /// Marks the run finished and compares it with the previous finished run of the cohort.
    pub fn finish(&mut self) -> Result<Changes, StateError> {
        self.mark_finished()?;
        self.changes()
    }

    /// Marks the run finished: its verdicts join the history, and the next run of the cohort
    /// is compared with it. A sweep marks it once its report and write-back are done, so that
    /// a run whose write-back failed is run again, not taken as the one to compare with.
    pub fn mark_finished(&mut self) -> Result<(), StateError> {
        let (at, run) = (Val::Int(now()), Val::Int(self.run));
        // The run's verdicts join the history every route shares (notifications, the page):
        // a transition where the status differs from the latest known, then the latest.
        self.db.write(vec![
            Step {
                sql: "UPDATE runs SET finished = ?1 WHERE id = ?2",
                rows: vec![vec![at.clone(), run.clone()]],
            },
            Step {
                sql: "INSERT INTO transitions (at, patient, trial, from_status, to_status, source) \
                      SELECT ?1, r.patient, r.trial, l.status, r.status, 'sweep' FROM results r \
                      LEFT JOIN latest l ON l.patient = r.patient AND l.trial = r.trial \
                      WHERE r.run = ?2 AND (l.status IS NULL OR l.status <> r.status)",
                rows: vec![vec![at.clone(), run.clone()]],
            },
            Step {
                sql: "INSERT INTO latest (patient, trial, status, result, at) \
                      SELECT patient, trial, status, result, ?1 FROM results WHERE run = ?2 \
                      ON CONFLICT (patient, trial) DO UPDATE SET status = excluded.status, result = excluded.result, at = excluded.at",
                rows: vec![vec![at, run]],
            },
        ])
    }

    /// This run's changes since the previous finished run of the cohort (of any date): who
    /// became eligible or potentially eligible, and who became ineligible.
    pub fn changes(&self) -> Result<Changes, StateError> {
        let previous = self.db.query(
            "SELECT id, as_of FROM runs WHERE cohort_key = ?1 AND finished IS NOT NULL AND id < ?2 ORDER BY id DESC LIMIT 1",
            vec![Val::text(&self.cohort_key), Val::Int(self.run)],
        )?;
        let mut previous = previous.into_iter().next().unwrap_or_default().into_iter();
        let (Some(prev), Some(since)) = (previous.next().and_then(Val::int), previous.next().and_then(Val::into_text)) else {
            return Ok(Changes::default());
        };
        // Only the changed pairs leave the database: a cohort's statuses, two runs of them,
        // would be ~100 bytes per patient and trial in memory.
        let rows = self.db.query(
            "SELECT n.patient, n.trial, p.status, n.status FROM results n \
             LEFT JOIN results p ON p.run = ?1 AND p.patient = n.patient AND p.trial = n.trial \
             WHERE n.run = ?2 AND ( \
               (n.status IN ('eligible', 'potentially-eligible') \
                 AND (p.status IS NULL OR p.status NOT IN ('eligible', 'potentially-eligible'))) \
               OR (n.status = 'ineligible' AND p.status IN ('eligible', 'potentially-eligible')))",
            vec![Val::Int(prev), Val::Int(self.run)],
        )?;
        let mut changed: Vec<Change> = rows
            .into_iter()
            .filter_map(|r| {
                let mut r = r.into_iter().map(Val::into_text);
                let (patient, trial, from, to) = (r.next()??, r.next()??, r.next()?, r.next()??);
                Some(Change { patient, trial, from, to })
            })
            .collect();
        // In Rust's order, not the database's collation (PostgreSQL's may sort otherwise).
        changed.sort_by(|a, b| (&a.patient, &a.trial).cmp(&(&b.patient, &b.trial)));
        let mut changes = Changes {
            since: Some(since),
            ..Default::default()
        };
        for change in changed {
            if change.to == "ineligible" {
                changes.newly_ineligible.push(change);
            } else {
                changes.newly_eligible.push(change);
            }
        }
        Ok(changes)
    }
}

/// The verdict history outside sweeps: what `serve` records when a notification or a
/// `$screen` screens a patient again. Each verdict is compared with the latest known one
/// (from a sweep or an earlier event); a change is kept as a transition.
pub struct Ledger {
    db: Backend,
    location: Location,
}

/// A status change of one patient for one trial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Seconds since the epoch.
    pub at: i64,
    /// None: the first verdict known.
    pub from: Option<String>,
    pub to: String,
    /// `sweep`, `notification`, `$screen` or `screen` (a posted patient written back).
    pub source: String,
}

/// One verdict, as the history holds it.
#[derive(Debug, Clone)]
pub struct Latest {
    pub result: TrialResult,
    /// When it was decided (seconds since the epoch).
    pub at: i64,
    /// The status before the last change, if the history knows one.
    pub previous: Option<String>,
}

impl Ledger {
    pub fn open(location: &Location) -> Result<Ledger, StateError> {
        Ok(Ledger {
            db: Backend::open(location)?,
            location: location.clone(),
        })
    }

    /// Records `results` as the latest verdicts, from `source` (`notification`, `$screen`);
    /// returns those whose status changed (or that are new). A service outlives database
    /// restarts: a PostgreSQL connection that fails is opened again once before giving up.
    pub fn record(&mut self, results: &[TrialResult], source: &str) -> Result<Vec<Change>, StateError> {
        match self.record_once(results, source) {
            Err(StateError::Postgres { .. }) => {
                self.db = Backend::open(&self.location)?;
                self.record_once(results, source)
            }
            other => other,
        }
    }

    fn record_once(&mut self, results: &[TrialResult], source: &str) -> Result<Vec<Change>, StateError> {
        let mut changes = Vec::new();
        for r in results.iter().filter(|r| r.status != crate::criteria::Status::Error) {
            let known = self.db.query(
                "SELECT status FROM latest WHERE patient = ?1 AND trial = ?2",
                vec![Val::text(&r.patient), Val::text(&r.trial)],
            )?;
            let from = first(known).and_then(Val::into_text);
            if from.as_deref() != Some(r.status.as_str()) {
                changes.push(Change {
                    patient: r.patient.clone(),
                    trial: r.trial.clone(),
                    from,
                    to: r.status.as_str().to_string(),
                });
            }
        }
        let at = Val::Int(now());
        let rows = kept(results)
            .map(|(r, json)| {
                vec![
                    Val::text(&r.patient),
                    Val::text(&r.trial),
                    Val::text(r.status.as_str()),
                    json,
                    at.clone(),
                ]
            })
            .collect();
        let moved = changes
            .iter()
            .map(|c| {
                let from = c.from.as_deref().map_or(Val::Null, Val::text);
                vec![
                    at.clone(),
                    Val::text(&c.patient),
                    Val::text(&c.trial),
                    from,
                    Val::text(&c.to),
                    Val::text(source),
                ]
            })
            .collect();
        self.db.write(vec![
            Step {
                sql: "INSERT INTO transitions (at, patient, trial, from_status, to_status, source) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rows: moved,
            },
            Step {
                sql: "INSERT INTO latest (patient, trial, status, result, at) VALUES (?1, ?2, ?3, ?4, ?5) \
                      ON CONFLICT (patient, trial) DO UPDATE SET status = excluded.status, result = excluded.result, at = excluded.at",
                rows,
            },
        ])?;
        Ok(changes)
    }

    /// Every patient's latest verdict per trial, with the status before its last change.
    pub fn latest(&mut self) -> Result<Vec<Latest>, StateError> {
        match self.latest_once() {
            Err(StateError::Postgres { .. }) => {
                self.db = Backend::open(&self.location)?;
                self.latest_once()
            }
            other => other,
        }
    }

    fn latest_once(&self) -> Result<Vec<Latest>, StateError> {
        let rows = self.db.query(
            "SELECT l.result, l.at, (SELECT t.from_status FROM transitions t WHERE t.patient = l.patient \
             AND t.trial = l.trial ORDER BY t.id DESC LIMIT 1) FROM latest l ORDER BY l.patient, l.trial",
            Vec::new(),
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut row = row.into_iter();
            let (Some(Val::Text(json)), Some(Val::Int(at)), previous) = (row.next(), row.next(), row.next()) else {
                continue;
            };
            let result = serde_json::from_str(&json).map_err(|source| StateError::Stored {
                path: self.db.shown.clone(),
                source,
            })?;
            out.push(Latest {
                result,
                at,
                previous: previous.and_then(Val::into_text),
            });
        }
        Ok(out)
    }

    /// The last event number seen of each Subscription, and when it was seen: a restarted
    /// service still notices the events it missed while it was down.
    pub fn events_seen(&self) -> Result<Vec<(String, u64, String)>, StateError> {
        let rows = self
            .db
            .query("SELECT subscription, event_number, at FROM subscription_events", Vec::new())?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let mut r = r.into_iter();
                let sub = r.next()?.into_text()?;
                let number = u64::try_from(r.next()?.int()?).ok()?;
                Some((sub, number, r.next()?.into_text()?))
            })
            .collect())
    }

    /// Keeps the last event number seen of a Subscription (a lower one, arriving late, does
    /// not replace a higher one).
    pub fn event_seen(&mut self, subscription: &str, number: u64, at: &str) -> Result<(), StateError> {
        let Ok(number) = i64::try_from(number) else {
            return Ok(()); // beyond any real server's count: nothing sensible to keep
        };
        self.db.write(vec![Step {
            sql: "INSERT INTO subscription_events (subscription, event_number, at) VALUES (?1, ?2, ?3) \
                  ON CONFLICT (subscription) DO UPDATE SET event_number = excluded.event_number, at = excluded.at \
                  WHERE excluded.event_number >= subscription_events.event_number",
            rows: vec![vec![Val::text(subscription), Val::Int(number), Val::text(at)]],
        }])
    }

    /// The transitions of one patient and trial, oldest first.
    pub fn history(&self, patient: &str, trial: &str) -> Result<Vec<Transition>, StateError> {
        let rows = self.db.query(
            "SELECT at, from_status, to_status, source FROM transitions WHERE patient = ?1 AND trial = ?2 ORDER BY id",
            vec![Val::text(patient), Val::text(trial)],
        )?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let mut r = r.into_iter();
                Some(Transition {
                    at: r.next()?.int()?,
                    from: r.next()?.into_text(),
                    to: r.next()?.into_text()?,
                    source: r.next()?.into_text()?,
                })
            })
            .collect())
    }
}

/// A value in or out of the few queries above: they hold only integers and text.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Int(i64),
    Text(String),
    Null,
}

impl Val {
    fn text(s: &str) -> Val {
        Val::Text(s.to_string())
    }
    fn int(self) -> Option<i64> {
        match self {
            Val::Int(i) => Some(i),
            _ => None,
        }
    }
    fn into_text(self) -> Option<String> {
        match self {
            Val::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// The verdicts worth keeping (not `error`: those patients are tried again), with their JSON.
fn kept(results: &[TrialResult]) -> impl Iterator<Item = (&TrialResult, Val)> {
    results
        .iter()
        .filter(|r| r.status != crate::criteria::Status::Error)
        // Serializing plain structs of strings and numbers cannot fail.
        .map(|r| (r, Val::Text(serde_json::to_string(r).unwrap_or_default())))
}

/// The first column of the first row, if any.
fn first(rows: Vec<Vec<Val>>) -> Option<Val> {
    rows.into_iter().next()?.into_iter().next()
}

/// One statement, run once per row of parameters; the steps of a `write` form one transaction.
struct Step {
    sql: &'static str,
    rows: Vec<Vec<Val>>,
}

/// The database, with its location as shown in messages. Statements are written once in
/// SQLite's `?N` placeholders and translated to PostgreSQL's `$N`.
struct Backend {
    kind: Kind,
    shown: String,
}

enum Kind {
    Lite(Connection),
    Pg(Pg),
}

impl Backend {
    fn open(location: &Location) -> Result<Backend, StateError> {
        let shown = location.shown();
        let kind = match location {
            Location::File(path) => Kind::Lite(open_sqlite(path).map_err(|source| StateError::Db {
                path: shown.clone(),
                source,
            })?),
            Location::Postgres(url) => {
                let pg = Pg::connect(url).map_err(|message| StateError::Postgres {
                    path: shown.clone(),
                    message,
                })?;
                pg.batch(postgres_schema()).map_err(|message| StateError::Postgres {
                    path: shown.clone(),
                    message,
                })?;
                Kind::Pg(pg)
            }
        };
        Ok(Backend { kind, shown })
    }

    fn odd(&self, message: &str) -> StateError {
        StateError::Postgres {
            path: self.shown.clone(),
            message: message.to_string(),
        }
    }

    fn lite(&self, source: rusqlite::Error) -> StateError {
        StateError::Db {
            path: self.shown.clone(),
            source,
        }
    }

    fn pg(&self, message: String) -> StateError {
        StateError::Postgres {
            path: self.shown.clone(),
            message,
        }
    }

    fn query(&self, sql: &str, params: Vec<Val>) -> Result<Vec<Vec<Val>>, StateError> {
        match &self.kind {
            Kind::Lite(conn) => lite_query(conn, sql, &params).map_err(|e| self.lite(e)),
            Kind::Pg(pg) => {
                let sql = sql.replace('?', "$");
                pg.query(&sql, params).map_err(|e| self.pg(e))
            }
        }
    }

    fn write(&mut self, steps: Vec<Step>) -> Result<(), StateError> {
        match &mut self.kind {
            Kind::Lite(conn) => lite_write(conn, &steps).map_err(|e| self.lite(e)),
            Kind::Pg(pg) => pg.write(steps).map_err(|e| self.pg(e)),
        }
    }
}

fn open_sqlite(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    // WAL with full sync: a commit survives a killed process and a power cut.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value};
        Ok(match self {
            Val::Int(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            Val::Text(s) => ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Text(s.as_bytes())),
            Val::Null => ToSqlOutput::Owned(Value::Null),
        })
    }
}

fn lite_query(conn: &Connection, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>, rusqlite::Error> {
    use rusqlite::types::ValueRef;
    let mut stmt = conn.prepare_cached(sql)?;
    let columns = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut vals = Vec::with_capacity(columns);
        for i in 0..columns {
            vals.push(match row.get_ref(i)? {
                ValueRef::Integer(n) => Val::Int(n),
                ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                _ => Val::Null,
            });
        }
        out.push(vals);
    }
    Ok(out)
}

fn lite_write(conn: &mut Connection, steps: &[Step]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    for step in steps {
        let mut stmt = tx.prepare_cached(step.sql)?;
        for row in &step.rows {
            stmt.execute(rusqlite::params_from_iter(row))?;
        }
    }
    tx.commit()
}

/// A PostgreSQL connection on a thread of its own. The `postgres` client drives an async
/// runtime of its own and may not be called from inside another (sweeps run in tokio), so
/// callers hand it work and wait for the answer; the connection, and the run's advisory
/// lock with it, lasts until this is dropped.
struct Pg {
    /// `None` only while dropping.
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    /// Told (or dropped) once the connection is closed.
    closed: std::sync::mpsc::Receiver<()>,
}

impl Drop for Pg {
    /// Waits for the database thread to close its connection, so that a state dropped has let
    /// go of its run's lock: the same run opened right after (a retry, the next daemon run)
    /// must not find it still held. Not for ever: a server gone silent must not hang the exit.
    fn drop(&mut self) {
        self.jobs.take();
        let _ = self.closed.recv_timeout(std::time::Duration::from_secs(5));
    }
}

type Job = Box<dyn FnOnce(&mut postgres::Client) + Send>;

fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        // "error connecting to server" alone does not say why: the cause is its source.
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// The URL's settings, with the password from `TRIALGATE_STATE_PASSWORD` when the URL has
/// none: a URL in a config file need not hold a secret.
fn pg_config(url: &str) -> Result<postgres::Config, postgres::Error> {
    let mut config: postgres::Config = url.parse()?;
    if config.get_password().is_none() {
        if let Ok(p) = std::env::var("TRIALGATE_STATE_PASSWORD") {
            config.password(p);
        }
    }
    Ok(config)
}

/// Connects as the URL says, over TLS when it asks for it (see [`crate::pgtls`]).
fn pg_connect(url: &str) -> Result<postgres::Client, String> {
    let (url, tls) = crate::pgtls::split(url)?;
    let config = pg_config(&url).map_err(|e| pg_message(&e))?;
    match tls {
        crate::pgtls::Tls::On { roots, any_name } => {
            let given = roots.is_some();
            config
                .connect(crate::pgtls::connector(roots.as_deref(), any_name)?)
                .map_err(|e| match pg_message(&e) {
                    m if !given && m.contains("UnknownIssuer") => {
                        format!("{m} (no system CA signed the server's certificate: give its CA with sslrootcert=FILE)")
                    }
                    m => m,
                })
        }
        crate::pgtls::Tls::Off => config.connect(postgres::NoTls).map_err(|e| pg_message(&e)),
    }
}

impl Pg {
    fn connect(url: &str) -> Result<Pg, String> {
        let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
        let (ready, started) = std::sync::mpsc::channel::<Result<(), String>>();
        let url = url.to_string();
        let (closing, closed) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("trialgate-state".into())
            .spawn(move || match pg_connect(&url) {
                Ok(mut client) => {
                    let _ = ready.send(Ok(()));
                    for job in inbox {
                        job(&mut client);
                    }
                    drop(client);
                    let _ = closing.send(());
                }
                Err(e) => {
                    let _ = ready.send(Err(format!("cannot connect: {e}")));
                }
            })
            .map_err(|e| format!("cannot start the database thread: {e}"))?;
        started.recv().map_err(|_| "the database thread stopped".to_string())??;
        Ok(Pg { jobs: Some(jobs), closed })
    }

    fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.jobs
            .as_ref()
            .ok_or_else(|| "the database thread stopped".to_string())?
            .send(Box::new(move |c| {
                let _ = reply.send(work(c).map_err(|e| pg_message(&e)));
            }))
            .map_err(|_| "the database connection is closed".to_string())?;
        answer.recv().map_err(|_| "the database connection is closed".to_string())?
    }

    fn batch(&self, sql: String) -> Result<(), String> {
        self.run(move |c| c.batch_execute(&sql))
    }

    fn query(&self, sql: &str, params: Vec<Val>) -> Result<Vec<Vec<Val>>, String> {
        let sql = sql.to_string();
        self.run(move |c| {
            let rows = c.query(sql.as_str(), &pg_params(&params))?;
            rows.iter().map(pg_row).collect()
        })
    }

    fn write(&self, steps: Vec<Step>) -> Result<(), String> {
        self.run(move |c| {
            let mut tx = c.transaction()?;
            for step in &steps {
                let stmt = tx.prepare(&step.sql.replace('?', "$"))?;
                for row in &step.rows {
                    tx.execute(&stmt, &pg_params(row))?;
                }
            }
            tx.commit()
        })
    }
}

fn pg_params(params: &[Val]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    // The only NULL written is a text column's (a transition's first `from`).
    const NULL: Option<&str> = None;
    params
        .iter()
        .map(|v| match v {
            Val::Int(i) => i as &(dyn postgres::types::ToSql + Sync),
            Val::Text(s) => s as &(dyn postgres::types::ToSql + Sync),
            Val::Null => &NULL as &(dyn postgres::types::ToSql + Sync),
        })
        .collect()
}

fn pg_row(row: &postgres::Row) -> Result<Vec<Val>, postgres::Error> {
    use postgres::types::Type;
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let t = col.type_();
        out.push(if *t == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.map_or(Val::Null, Val::Int)
        } else if *t == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?.map_or(Val::Null, |n| Val::Int(n.into()))
        } else if *t == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)?.map_or(Val::Null, |b| Val::Int(b.into()))
        } else {
            row.try_get::<_, Option<String>>(i)?.map_or(Val::Null, Val::Text)
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_and_redaction() {
        assert_eq!(Location::parse("state.db"), Location::File("state.db".into()));
        let pg = Location::parse("postgres://sweeper:s3cret@db.example:5432/trialgate");
        assert_eq!(pg.shown(), "postgres://sweeper:***@db.example:5432/trialgate");
        assert_eq!(Location::parse("postgresql://db/x").shown(), "postgresql://db/x");
    }

    /// A verdict read back is the verdict stored, to the last bit of its numbers: a resumed
    /// run reports what an uninterrupted one does (serde_json's default float parsing can be
    /// one ulp off; the `float_roundtrip` feature makes it exact).
    /// An empty folder of this test's own.
    fn fresh_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("trialgate-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_last_event_seen_of_a_subscription_is_the_highest() {
        let dir = fresh_dir("events");
        let at = Location::File(dir.join("state.sqlite"));
        let mut l = Ledger::open(&at).unwrap();
        assert!(l.events_seen().unwrap().is_empty());
        for (sub, n, when) in [("s1", 5, "t5"), ("s1", 3, "t3"), ("s2", 1, "u1"), ("s1", 6, "t6")] {
            l.event_seen(sub, n, when).unwrap();
        }
        let mut seen = Ledger::open(&at).unwrap().events_seen().unwrap();
        seen.sort();
        assert_eq!(
            seen,
            [("s1".to_string(), 6, "t6".to_string()), ("s2".to_string(), 1, "u1".to_string())]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stored_verdicts_come_back_bit_for_bit() {
        let dir = fresh_dir("floats");
        let mut st = State::open(&Location::File(dir.join("state.sqlite")), "run", "cohort", "2026-06-01").unwrap();
        // 0.8 mg/dL of bilirubin in umol/L, as the conversion computes it.
        let value: f64 = 0.8 * 17.1;
        assert_eq!(value.to_string(), "13.680000000000001");
        let result: TrialResult = serde_json::from_value(serde_json::json!({
            "patient": "Patient/p1", "trial": "t", "status": "eligible", "decided_by": [], "facts": [],
            "criteria": [{"id": "exc-2", "kind": "exclusion", "text": "", "outcome": "unknown", "reason": "",
                "evidence": [{"resource": "Observation/o1", "normalized_value": value}]}]
        }))
        .unwrap();
        st.save(std::slice::from_ref(&result)).unwrap();
        let back = st.done_of(&st.done_patients().unwrap()).unwrap();
        let got = back[0].criteria[0].evidence[0].normalized_value;
        assert_eq!(got.map(f64::to_bits), Some(value.to_bits()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A cleared run keeps none of its verdicts, and saves anew after; other runs keep theirs.
    #[test]
    fn clearing_a_run_forgets_only_its_verdicts() {
        let dir = fresh_dir("clear");
        let at = Location::File(dir.join("state.sqlite"));
        let result = |p: &str| TrialResult {
            patient: format!("Patient/{p}"),
            person: None,
            trial: "t".into(),
            status: crate::criteria::Status::Eligible,
            record: None,
            decided_by: Vec::new(),
            criteria: Vec::new(),
            facts: Vec::new(),
        };
        let patients = |st: &State| {
            let mut p = st.done_patients().unwrap();
            p.sort();
            p
        };
        let mut other = State::open(&at, "run-a", "cohort-a", "2026-06-01").unwrap();
        other.save(&[result("x")]).unwrap();
        let mut st = State::open(&at, "run-b", "cohort-b", "2026-06-01").unwrap();
        st.save(&[result("gone"), result("kept")]).unwrap();
        st.clear().unwrap();
        assert!(patients(&st).is_empty());
        st.save(&[result("kept")]).unwrap();
        assert_eq!(patients(&st), ["Patient/kept"]);
        assert_eq!(patients(&other), ["Patient/x"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
