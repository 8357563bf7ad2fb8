//! Sweep state in an embedded SQLite database: every batch of verdicts is committed as it is
//! made, so a sweep killed at any moment (kill -9, power loss) resumes from its last commit
//! with nobody screened twice and nobody missed; and the verdicts of finished runs are kept,
//! so each run can say who became eligible or ineligible since the one before.
//!
//! A run is identified by what decides its verdicts: the source, the cohort, the trials (by
//! their configuration hash), the shard and the screening date. Starting the same run again
//! while an earlier one is unfinished resumes that one. A different screening date is a new
//! run of the same cohort, compared with the last finished one.

use crate::criteria::eval::TrialResult;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("sweep state {path}: {source}")]
    Db { path: String, source: rusqlite::Error },
    #[error("sweep state {path}: a stored verdict cannot be read ({source}); the file may come from another version")]
    Stored { path: String, source: serde_json::Error },
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
    conn: Connection,
    path: String,
    run: i64,
    cohort_key: String,
    /// Whether this run picks up one that was interrupted.
    pub resumed: bool,
}

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
";

fn now() -> i64 {
    crate::time::Instant::now().0
}

impl State {
    /// Opens (creating if needed) the state at `path` and starts, or resumes, the run
    /// `run_key` of the cohort `cohort_key`.
    pub fn open(path: &Path, run_key: &str, cohort_key: &str, as_of: &str) -> Result<State, StateError> {
        let shown = path.display().to_string();
        let db = |source| StateError::Db {
            path: shown.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        // WAL with full sync: a commit survives a killed process and a power cut.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        let open: Option<i64> = conn
            .query_row(
                "SELECT id FROM runs WHERE run_key = ?1 AND finished IS NULL ORDER BY id DESC LIMIT 1",
                params![run_key],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let (run, resumed) = match open {
            Some(id) => (id, true),
            None => {
                conn.execute(
                    "INSERT INTO runs (run_key, cohort_key, as_of, started) VALUES (?1, ?2, ?3, ?4)",
                    params![run_key, cohort_key, as_of, now()],
                )
                .map_err(db)?;
                (conn.last_insert_rowid(), false)
            }
        };
        Ok(State {
            conn,
            path: shown,
            run,
            cohort_key: cohort_key.to_string(),
            resumed,
        })
    }

    /// The screening date of the newest unfinished run of `cohort_key` in the state at `path`,
    /// if the file exists and holds one.
    pub fn unfinished_as_of(path: &Path, cohort_key: &str) -> Result<Option<String>, StateError> {
        if !path.exists() {
            return Ok(None);
        }
        let db = |source| StateError::Db {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.query_row(
            "SELECT as_of FROM runs WHERE cohort_key = ?1 AND finished IS NULL ORDER BY id DESC LIMIT 1",
            params![cohort_key],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)
    }

    fn db(&self, source: rusqlite::Error) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// The verdicts this run has already committed (none for a new run).
    pub fn done(&self) -> Result<Vec<TrialResult>, StateError> {
        self.json_rows("SELECT result FROM results WHERE run = ?1 ORDER BY patient, trial", self.run)
    }

    /// The JSON in the one column `sql` selects, read back into `T`.
    fn json_rows<T: serde::de::DeserializeOwned>(&self, sql: &str, param: impl rusqlite::ToSql) -> Result<Vec<T>, StateError> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.db(e))?;
        let rows = stmt.query_map(params![param], |r| r.get::<_, String>(0)).map_err(|e| self.db(e))?;
        let mut out = Vec::new();
        for row in rows {
            let text = row.map_err(|e| self.db(e))?;
            out.push(serde_json::from_str(&text).map_err(|source| StateError::Stored {
                path: self.path.clone(),
                source,
            })?);
        }
        Ok(out)
    }

    /// Commits a batch of verdicts: the checkpoint a resumed run starts from. Results in
    /// `error` are not kept, so a resumed run tries those patients again.
    pub fn save(&mut self, results: &[TrialResult]) -> Result<(), StateError> {
        let run = self.run;
        let tx = self.conn.transaction().map_err(|e| StateError::Db {
            path: self.path.clone(),
            source: e,
        })?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT OR REPLACE INTO results (run, patient, trial, status, result) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(|e| StateError::Db {
                    path: self.path.clone(),
                    source: e,
                })?;
            for r in results.iter().filter(|r| r.status != crate::criteria::Status::Error) {
                // Serializing plain structs of strings and numbers cannot fail.
                let json = serde_json::to_string(r).unwrap_or_default();
                stmt.execute(params![run, r.patient, r.trial, r.status.as_str(), json])
                    .map_err(|e| StateError::Db {
                        path: self.path.clone(),
                        source: e,
                    })?;
            }
        }
        tx.commit().map_err(|e| self.db(e))
    }

    /// The fact state an incremental export starts from: every patient's facts and the
    /// `transactionTime` of the export they are current to. None before the first full run.
    pub fn saved_facts(&self) -> Result<Option<(Vec<crate::facts::PatientFacts>, String)>, StateError> {
        let since: Option<String> = self
            .conn
            .query_row(
                "SELECT transaction_time FROM exports WHERE cohort_key = ?1",
                params![self.cohort_key],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        let Some(since) = since else { return Ok(None) };
        let facts = self.json_rows("SELECT facts FROM facts WHERE cohort_key = ?1 ORDER BY patient", &self.cohort_key)?;
        Ok(Some((facts, since)))
    }

    /// Replaces the fact state with `facts`, current to the export of `transaction_time`.
    pub fn save_facts(&mut self, facts: &[crate::facts::PatientFacts], transaction_time: &str) -> Result<(), StateError> {
        let key = self.cohort_key.clone();
        let path = self.path.clone();
        let db = |source| StateError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        tx.execute("DELETE FROM facts WHERE cohort_key = ?1", params![key]).map_err(db)?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO facts (cohort_key, patient, facts) VALUES (?1, ?2, ?3)")
                .map_err(db)?;
            for f in facts {
                // Serializing plain structs of strings and numbers cannot fail.
                stmt.execute(params![key, f.key, serde_json::to_string(f).unwrap_or_default()])
                    .map_err(db)?;
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO exports (cohort_key, transaction_time) VALUES (?1, ?2)",
            params![key, transaction_time],
        )
        .map_err(db)?;
        tx.commit().map_err(db)
    }

    /// Marks the run finished and compares it with the previous finished run of the cohort.
    pub fn finish(&mut self) -> Result<Changes, StateError> {
        self.conn
            .execute("UPDATE runs SET finished = ?1 WHERE id = ?2", params![now(), self.run])
            .map_err(|e| self.db(e))?;
        let previous: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT id, as_of FROM runs WHERE cohort_key = ?1 AND finished IS NOT NULL AND id < ?2 ORDER BY id DESC LIMIT 1",
                params![self.cohort_key, self.run],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        let Some((prev, since)) = previous else {
            return Ok(Changes::default());
        };
        let statuses = |run: i64| -> Result<BTreeMap<(String, String), String>, StateError> {
            let mut stmt = self
                .conn
                .prepare("SELECT patient, trial, status FROM results WHERE run = ?1")
                .map_err(|e| self.db(e))?;
            let rows = stmt
                .query_map(params![run], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
                .map_err(|e| self.db(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.db(e))
        };
        let (before, now) = (statuses(prev)?, statuses(self.run)?);
        let candidate = |s: &str| s == "eligible" || s == "potentially-eligible";
        let mut changes = Changes {
            since: Some(since),
            ..Default::default()
        };
        for ((patient, trial), to) in now {
            let from = before.get(&(patient.clone(), trial.clone())).cloned();
            let was = from.as_deref().is_some_and(candidate);
            let change = Change {
                patient,
                trial,
                from,
                to: to.clone(),
            };
            if candidate(&to) && !was {
                changes.newly_eligible.push(change);
            } else if to == "ineligible" && was {
                changes.newly_ineligible.push(change);
            }
        }
        Ok(changes)
    }
}
