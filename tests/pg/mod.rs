//! A fresh database on the PostgreSQL server that scripts/test installs and starts on
//! 127.0.0.1 (its URL in TRIALGATE_PG_URL). The synchronous client runs on a thread of its
//! own: it may not be called from inside the tests' async runtime.

#![allow(dead_code)] // each test binary uses a different part

fn admin() -> String {
    std::env::var("TRIALGATE_PG_URL").unwrap_or_else(|_| {
        panic!("TRIALGATE_PG_URL is not set: run the tests through scripts/test, which installs and starts PostgreSQL on 127.0.0.1")
    })
}

fn on_thread<T: Send + 'static>(url: String, work: impl FnOnce(&mut postgres::Client) -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {url}: {e} (scripts/test starts it)"));
        work(&mut c)
    })
    .join()
    .unwrap()
}

/// An empty database of its own for one test (named after it and this process); its URL.
pub fn database(name: &str) -> String {
    let admin = admin();
    let db = format!("trialgate_{name}_{}", std::process::id());
    let d = db.clone();
    on_thread(admin.clone(), move |c| {
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {d}")).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {d}")).unwrap();
    });
    let (base, _) = admin.rsplit_once('/').expect("TRIALGATE_PG_URL ends in /database");
    format!("{base}/{db}")
}

/// The one integer `sql` selects (0 when the tables do not exist yet).
pub fn count(url: &str, sql: &'static str) -> i64 {
    on_thread(url.to_string(), move |c| {
        c.query_one(sql, &[]).map(|r| r.get::<_, i64>(0)).unwrap_or(0)
    })
}

/// Ends every other connection to the database of `url`, as a server restart would.
pub fn drop_connections(url: &str) {
    let db = url.rsplit('/').next().unwrap_or_default().to_string();
    on_thread(admin(), move |c| {
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db],
        )
        .unwrap();
    });
}

/// How many connections to the database of `url` (other than this one) are encrypted, and how
/// many there are in all.
pub fn connections(url: &str) -> (i64, i64) {
    let db = url.rsplit('/').next().unwrap_or_default().to_string();
    on_thread(admin(), move |c| {
        let row = c
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE s.ssl), COUNT(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
                &[&db],
            )
            .unwrap();
        (row.get(0), row.get(1))
    })
}
