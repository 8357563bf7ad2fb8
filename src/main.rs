//! The `trialgate` command line: a thin edge over the library. It parses arguments, loads
//! configuration, calls the library and maps failures to exit codes (0 success whatever the
//! verdicts, 2 bad input or configuration, 1 anything else).

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use trialgate::criteria::decisions::Decisions;
use trialgate::fhir::client::{ClientOptions, FhirClient};
use trialgate::sweep::{Cohort, SweepOptions};
use trialgate::time::Date;
use trialgate::writeback::WriteOptions;

#[derive(Parser)]
#[command(
    name = "trialgate",
    version,
    about = "Find clinical-trial candidates in FHIR R4 data, with an explained verdict per criterion",
    long_about = "Find clinical-trial candidates in FHIR R4 data.\n\n\
        trialgate reads FHIR resources (Bundles, single resources or Bulk Data NDJSON), maps \
        them to facts through the terminology and unit mappings in mappings/, and evaluates \
        every criterion of every trial in config/trials/: met, not-met, unknown (data missing \
        or unusable) or manual (needs a person), with the evidence and the protocol's words.\n\n\
        Start with:\n  trialgate screen --bundle fixtures/ --as-of 2026-06-01\n  trialgate check",
    after_help = "Exit status: 0 on success (whatever the verdicts), 2 on bad input or configuration, 1 on other failures.\n\
        Logs go to stderr; set RUST_LOG=debug for more."
)]
struct Cli {
    /// Folder of mapping files (terminology and units).
    #[arg(long, global = true, env = "TRIALGATE_MAPPINGS", default_value = "mappings")]
    mappings: PathBuf,
    /// Folder of trial files screened by default.
    #[arg(long, global = true, env = "TRIALGATE_TRIALS", default_value = "config/trials")]
    trials_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Json,
    Text,
    Csv,
    /// A page for the study coordinator (sortable, filterable; open it in a browser).
    Html,
}

#[derive(Subcommand)]
enum Command {
    /// Screen every patient in FHIR files against the trials.
    #[command(after_help = "Examples:\n  \
        trialgate screen --bundle fixtures/ --as-of 2026-06-01\n  \
        trialgate screen --bundle export/ --trial NCT06406205 --format csv > verdicts.csv\n  \
        trialgate screen --bundle p.json --trial my-trial.yaml --decisions decisions.yaml --format json\n\n\
        PATH may be a Bundle (collection, searchset, transaction, batch), a single resource, an NDJSON \
        file (one resource per line), or a folder searched recursively for .json/.ndjson files. \
        Malformed resources are reported with file and line and skipped.")]
    Screen {
        /// FHIR file or folder to screen.
        #[arg(long, value_name = "PATH")]
        bundle: PathBuf,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Screen a cohort fetched from a FHIR R4 server (the same report as `screen`), and write ResearchSubjects back.
    #[command(after_help = "Examples:\n  \
        trialgate sweep --server https://fhir.example.org/r4 --as-of 2026-06-01\n  \
        trialgate sweep --server $FHIR --group ln-clinic --format csv > verdicts.csv\n  \
        trialgate sweep --server $FHIR --patients 'Condition?code=http://snomed.info/sct|55464009'\n  \
        FHIR_TOKEN=... trialgate sweep --server $FHIR --patient 123 --patient 456 --token-env FHIR_TOKEN\n\n\
        The cohort is every Patient unless --group, --patients or --patient says otherwise. For each \
        batch of patients trialgate searches each resource type the trials read (patient=a,b,c), \
        follows every page, and retries timeouts, 429 and 5xx with backoff (honouring Retry-After). \
        A patient whose data still cannot be fetched is reported with status `error` and the \
        server's reason. A summary of requests and errors goes to stderr.")]
    Sweep(Box<SweepArgs>),
    /// Run the configured sweep on its schedule ([schedule] in the gateway configuration), one
    /// run at a time, until stopped.
    #[command(after_help = "Examples:\n  \
        trialgate daemon                                  # [schedule] cron in config/gateway.toml\n  \
        trialgate daemon --once                           # one run now, then exit (for an outside scheduler)\n  \
        TRIALGATE_SCHEDULE_CRON='0 2 * * *' trialgate daemon\n\n\
        Each run is `trialgate sweep` with the gateway configuration, screening as of the day it \
        starts (UTC), with the [schedule] state file (so a run killed midway resumes at the next \
        start, and a Bulk sweep after the first is incremental) and its JSON report and changes \
        written to the [schedule] reports folder. A failed run is logged and the daemon waits for \
        the next; runs never overlap.")]
    Daemon {
        /// The gateway configuration (sweep, schedule, state and reports).
        #[arg(long, value_name = "FILE", env = "TRIALGATE_CONFIG", default_value = "config/gateway.toml")]
        config: PathBuf,
        /// Run once now and exit, whatever the schedule.
        #[arg(long)]
        once: bool,
    },
    /// Serve screening over HTTP for integration engines: POST /screen, /notify (FHIR
    /// Subscriptions), /fhir/Patient/{id}/$screen; GET /trials, /health, /metrics,
    /// /openapi.json; and the coordinator's page (GET /, with sign-in). Also runs the
    /// [schedule] sweeps when a cron is set.
    #[command(after_help = "Examples:\n  \
        TRIALGATE_API_TOKENS=s3cret trialgate serve\n  \
        curl -H 'Authorization: Bearer s3cret' --data-binary @fixtures/bundles/01-meilin-zhou.json \\\n    \
        'http://127.0.0.1:8080/screen?as_of=2026-06-01&trial=NCT06406205'\n\n\
        Every API route but /health needs a bearer token from the variable [serve] token_env names \
        (comma-separated for several). Errors are FHIR OperationOutcomes. The page at / signs in with \
        one of those tokens (for a session cookie), or through a proxy's [serve] trusted_user_header. \
        The routes are described \
        in openapi.json. With [server] url set, $screen and /notify read patients from that server \
        and, with [write_back] enabled, write changed statuses back; register the Subscription with \
        `trialgate subscribe`. [serve] tls_cert and tls_key turn on HTTPS. Ctrl-C or SIGTERM stop \
        it after the requests in flight.")]
    Serve {
        /// The gateway configuration ([serve] listen, token_env, max_body_mb).
        #[arg(long, value_name = "FILE", env = "TRIALGATE_CONFIG", default_value = "config/gateway.toml")]
        config: PathBuf,
        /// Address and port to listen on (default: [serve] listen).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Accept requests without a token. Only for a service reachable by nobody else.
        #[arg(long)]
        no_auth: bool,
    },
    /// Register (or update) a FHIR Subscription on the server, so it posts changes to
    /// trialgate's /notify and each changed patient is screened again at once.
    #[command(after_help = "Examples:\n  \
        TRIALGATE_API_TOKENS=s3cret trialgate subscribe --endpoint https://trialgate.example.org/notify \\\n    \
        --topic http://example.org/SubscriptionTopic/lab-result --lab-codes\n  \
        trialgate subscribe --endpoint https://trialgate.example.org/notify --topic URL --dry-run\n\n\
        The Subscription is R4 with the Subscriptions R5 Backport profile (rest-hook, JSON, id-only \
        payloads by default, so no clinical data travels in notifications). It carries \
        `Authorization: Bearer <token>` with the first token of [serve] token_env (or --token-env), \
        which the server sends back with every notification; the token is never printed. Run it \
        again to update the same Subscription (found by its endpoint).")]
    Subscribe {
        /// The gateway configuration ([server], [auth], [serve] token_env).
        #[arg(long, value_name = "FILE", env = "TRIALGATE_CONFIG", default_value = "config/gateway.toml")]
        config: PathBuf,
        /// The FHIR server to subscribe on (default: [server] url).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// Where the server posts notifications: this service's /notify, as the server reaches it.
        #[arg(long, value_name = "URL")]
        endpoint: String,
        /// The server's SubscriptionTopic canonical URL (servers publish the topics they support).
        #[arg(long, value_name = "URL")]
        topic: String,
        /// A filter criterion the topic allows (e.g. 'Observation?category=laboratory'). Repeatable.
        #[arg(long = "filter", value_name = "EXPR")]
        filters: Vec<String>,
        /// Add a filter on the lab codes the trials read (Observation?code=...).
        #[arg(long)]
        lab_codes: bool,
        /// Payload content: id-only (default), full-resource or empty.
        #[arg(long, value_name = "KIND", default_value = "id-only", value_parser = ["id-only", "full-resource", "empty"])]
        content: String,
        /// Seconds between heartbeats (a missed heartbeat tells the service the link is down).
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        heartbeat: u32,
        /// The variable holding the token the server must send (default: [serve] token_env).
        #[arg(long, value_name = "VAR")]
        token_env: Option<String>,
        /// Print the Subscription (token hidden) and send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate every trial and mapping file, and lint criteria for suspect thresholds.
    #[command(
        after_help = "Examples:\n  trialgate check\n  trialgate check --trial config/bench/bench-ln.yaml\n  trialgate check --list\n\n\
        Reports unknown fact or set names, units that cannot convert, thresholds in the wrong unit, \
        duplicate ids and thresholds that look inverted (an inclusion requiring a low eGFR), each with \
        the file, criterion and line. Exit status 2 when anything is wrong."
    )]
    Check {
        /// Check these trials (ids or files) instead of the whole trials folder.
        #[arg(long = "trial", value_name = "ID|FILE")]
        trials: Vec<String>,
        /// Also list the labs and sets the mappings define (the names rules may use).
        #[arg(long)]
        list: bool,
    },
}

/// What to screen against, as of when, and how to report: shared by `screen` and `sweep`.
#[derive(clap::Args)]
struct ReportArgs {
    /// Screening date (YYYY-MM-DD); look-back windows end on this day. Default: today (UTC).
    #[arg(long, value_name = "YYYY-MM-DD")]
    as_of: Option<String>,
    /// A trial id from the trials folder, or the path of a trial file. Repeatable. Default: all
    /// (for sweep: [sweep] trials, else all).
    #[arg(long = "trial", value_name = "ID|FILE")]
    trials: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Coordinators' recorded answers to manual criteria (YAML list; see README).
    #[arg(long, value_name = "FILE")]
    decisions: Option<PathBuf>,
    /// Write the report here instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Screen only part K of N of the patients (1 ≤ K ≤ N), chosen by a stable hash of the
    /// patient id: N processes with 1/N ... N/N together screen everyone exactly once.
    #[arg(long, value_name = "K/N", value_parser = trialgate::Shard::parse)]
    shard: Option<trialgate::Shard>,
}

#[derive(clap::Args)]
struct SweepArgs {
    /// The gateway configuration; flags override its keys and the TRIALGATE_<SECTION>_<KEY>
    /// environment variables (see the file's comments).
    #[arg(long, value_name = "FILE", env = "TRIALGATE_CONFIG", default_value = "config/gateway.toml")]
    config: PathBuf,
    /// Base URL of the FHIR R4 server (default: [server] url).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// Screen the members of this Group.
    #[arg(long, value_name = "ID", conflicts_with_all = ["patients", "patient"])]
    group: Option<String>,
    /// Screen the subjects of this search, e.g. 'Condition?code=http://snomed.info/sct|55464009'.
    #[arg(long, value_name = "SEARCH", conflicts_with = "patient")]
    patients: Option<String>,
    /// Screen this patient id (repeatable).
    #[arg(long, value_name = "ID")]
    patient: Vec<String>,
    #[command(flatten)]
    report: ReportArgs,
    /// Environment variable holding a bearer token for the server.
    #[arg(long, value_name = "VAR", conflicts_with = "token_file")]
    token_env: Option<String>,
    /// File holding a bearer token for the server.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Patients per search request.
    #[arg(long)]
    batch: Option<usize>,
    /// Searches in flight at once.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Resources per page asked of the server (_count).
    #[arg(long)]
    page_size: Option<usize>,
    /// Fetch every Observation of the cohort, not only those with the codes the trials read:
    /// slower, but the report then lists the lab codes seen that no mapping knows (`unmapped`),
    /// which is how a site finds its local codes.
    #[arg(long)]
    all_observations: bool,
    /// Seconds to wait for a response before retrying.
    #[arg(long)]
    timeout: Option<u64>,
    /// Retries of one request after its first attempt.
    #[arg(long)]
    max_retries: Option<u32>,
    /// SMART Backend Services: the client id registered with the server's authorization server.
    #[arg(long, value_name = "ID", requires = "smart_key", conflicts_with_all = ["token_env", "token_file"])]
    smart_client_id: Option<String>,
    /// SMART Backend Services: the PEM private key that signs the client assertion.
    #[arg(long, value_name = "FILE", requires = "smart_client_id")]
    smart_key: Option<PathBuf>,
    /// SMART Backend Services: RS384 or ES384 (default: [auth] smart_alg, RS384).
    #[arg(long, value_name = "ALG")]
    smart_alg: Option<String>,
    /// SMART Backend Services: the key id (`kid`) registered in the client's JWKS.
    #[arg(long, value_name = "KID")]
    smart_kid: Option<String>,
    /// SMART Backend Services: scopes to ask for (default: read what screening needs, and
    /// write ResearchStudy/ResearchSubject with --write-back).
    #[arg(long, value_name = "SCOPES")]
    smart_scope: Option<String>,
    /// SMART Backend Services: the token endpoint, when the server does not publish
    /// .well-known/smart-configuration.
    #[arg(long, value_name = "URL")]
    smart_token_endpoint: Option<String>,
    /// Write a ResearchSubject per patient and trial (potential candidates and eligible
    /// patients, and updates of written ones that turned ineligible).
    #[arg(long)]
    write_back: bool,
    /// Also write ResearchSubjects for ineligible patients.
    #[arg(long)]
    write_ineligible: bool,
    /// Write to this server instead of the one read (same token).
    #[arg(long, value_name = "URL")]
    write_to: Option<String>,
    /// Show the batch Bundle that would be written (on stdout, instead of the report) and
    /// write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Fetch the cohort with a Bulk Data export (`Group/ID/$export` with --group, else
    /// `Patient/$export`) instead of searches: the way in for whole-hospital cohorts.
    #[arg(long, conflicts_with_all = ["patients", "patient"])]
    bulk: bool,
    /// With --bulk: only what changed since this instant (`_since`, e.g. the
    /// `transactionTime` the previous export printed).
    #[arg(long, value_name = "INSTANT", requires = "bulk")]
    since: Option<String>,
    /// With --bulk: keep the exported NDJSON files in this folder (default: a temporary
    /// folder, removed after the run).
    #[arg(long, value_name = "DIR", requires = "bulk")]
    bulk_dir: Option<PathBuf>,
    /// With --bulk: the longest pause between two status requests, in seconds; the server's
    /// Retry-After is honoured up to this.
    #[arg(long, value_name = "SECS", default_value_t = 30, requires = "bulk")]
    bulk_poll_max: u64,
    /// Keep the sweep's state in this SQLite file, or in PostgreSQL when given a
    /// `postgres://user@host:port/db` URL (for shards or processes that share a cohort): each
    /// batch of verdicts is committed as it is made, so the same sweep started again after a
    /// crash or kill resumes where it stopped; and finished runs are compared, listing who
    /// became eligible or ineligible. A URL without a password takes it from
    /// TRIALGATE_STATE_PASSWORD.
    #[arg(long, value_name = "FILE|URL", env = "TRIALGATE_STATE", value_parser = parse_state)]
    state: Option<trialgate::state::Location>,
    /// With --state: write the patients whose status changed since the previous finished run
    /// of this cohort to this CSV file (patient,trial,from,to).
    #[arg(long, value_name = "FILE", requires = "state")]
    changes: Option<PathBuf>,
}

/// How the FHIR server is authenticated: flags merged over the gateway configuration.
struct AuthArgs {
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    smart_client_id: Option<String>,
    smart_key: Option<PathBuf>,
    smart_alg: String,
    smart_kid: Option<String>,
    smart_scope: Option<String>,
    smart_token_endpoint: Option<String>,
}

impl AuthArgs {
    /// The `[auth]` section alone (`serve` and `subscribe` take no auth flags; `sweep`'s go
    /// over it).
    fn from_config(g: &trialgate::gateway::Gateway) -> AuthArgs {
        let nonempty = |s: &String| (!s.is_empty()).then(|| s.clone());
        let (bearer, smart) = (g.auth.method == "bearer", g.auth.method == "smart");
        AuthArgs {
            token_env: nonempty(&g.auth.token_env).filter(|_| bearer),
            token_file: nonempty(&g.auth.token_file).filter(|_| bearer).map(PathBuf::from),
            smart_client_id: nonempty(&g.auth.smart_client_id).filter(|_| smart),
            smart_key: nonempty(&g.auth.smart_key_file).filter(|_| smart).map(PathBuf::from),
            smart_alg: g.auth.smart_alg.clone(),
            smart_kid: nonempty(&g.auth.smart_kid),
            smart_scope: nonempty(&g.auth.smart_scope),
            smart_token_endpoint: nonempty(&g.auth.smart_token_endpoint),
        }
    }

    /// The client options: the token read (never logged or echoed), the SMART key checked.
    fn options(self, g: &trialgate::gateway::Gateway, timeout: u64, max_retries: u32, write_back: bool) -> anyhow::Result<ClientOptions> {
        let AuthArgs {
            token_env,
            token_file,
            smart_client_id,
            smart_key,
            smart_alg,
            smart_kid,
            smart_scope,
            smart_token_endpoint,
        } = self;
        let bearer = match (token_env, token_file) {
            (Some(var), _) => {
                Some(std::env::var(&var).map_err(|_| bad(format!("--token-env: the environment variable {var} is not set")))?)
            }
            (None, Some(f)) => Some(
                std::fs::read_to_string(&f)
                    .map_err(|e| bad(format!("--token-file {}: {e}", f.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let smart = match (smart_client_id, smart_key) {
            (Some(client_id), Some(key)) => {
                let alg = trialgate::fhir::smart::Alg::parse(&smart_alg)
                    .ok_or_else(|| bad(format!("--smart-alg `{smart_alg}`: use RS384 or ES384")))?;
                let key_pem = std::fs::read_to_string(&key).map_err(|e| bad(format!("--smart-key {}: {e}", key.display())))?;
                let scope = smart_scope.unwrap_or_else(|| {
                    let read = "system/Patient.rs system/Observation.rs system/Condition.rs system/MedicationRequest.rs system/MedicationStatement.rs system/MedicationAdministration.rs system/Medication.rs system/Procedure.rs system/Immunization.rs system/AllergyIntolerance.rs system/DiagnosticReport.rs system/Group.rs";
                    if write_back { format!("{read} system/ResearchStudy.cru system/ResearchSubject.cru") } else { read.to_string() }
                });
                let smart = trialgate::fhir::smart::SmartClient {
                    client_id,
                    key_pem,
                    alg,
                    kid: smart_kid,
                    scope,
                    token_endpoint: smart_token_endpoint,
                };
                // Fail now, not at the first request, if the key does not fit the algorithm.
                smart.assertion("https://check.invalid/token").map_err(bad)?;
                Some(smart)
            }
            _ => None,
        };
        Ok(ClientOptions {
            read_timeout: std::time::Duration::from_secs(timeout.max(1)),
            max_retries,
            retry_budget: g.server.retry_budget,
            bearer,
            smart,
            ..Default::default()
        })
    }
}

/// `trialgate daemon`: the configured sweep on its cron schedule, one run at a time (also
/// run by `serve` beside the HTTP routes when a schedule is configured).
fn daemon(mappings: &Path, trials_dir: &Path, config: &Path, once: bool) -> anyhow::Result<()> {
    let g = trialgate::gateway::Gateway::load(config, &|k| std::env::var(k).ok()).map_err(bad)?;
    let schedule = match (once, g.schedule.cron.as_str()) {
        (true, _) => None,
        (false, "") => {
            return Err(bad(format!(
                "no schedule: set [schedule] cron in {} (or TRIALGATE_SCHEDULE_CRON), or pass --once",
                config.display()
            )));
        }
        (false, cron) => Some(trialgate::schedule::Schedule::parse(cron).map_err(bad)?),
    };
    let reports = PathBuf::from(&g.schedule.reports);
    std::fs::create_dir_all(&reports).with_context(|| format!("creating the reports folder {}", reports.display()))?;
    loop {
        if let Some(s) = &schedule {
            let now = trialgate::time::Instant::now();
            let Some(next) = s.next_after(now) else {
                return Err(bad(format!("[schedule] cron `{s}` never fires")));
            };
            tracing::info!(schedule = %s, next = %next, "waiting for the next sweep");
            eprintln!("daemon: next sweep at {next} (cron `{s}`)");
            std::thread::sleep(std::time::Duration::from_secs((next.0 - now.0).max(0) as u64));
        }
        let stamp = {
            let t = trialgate::time::Instant::now();
            format!("{}T{:02}{:02}", t.date(), (t.0 / 3600).rem_euclid(24), (t.0 / 60).rem_euclid(60))
        };
        let report = reports.join(format!("{stamp}.json"));
        let changes = reports.join(format!("{stamp}.changes.csv"));
        // Exactly a `sweep` command line, so a scheduled run is what a person would run.
        let mut argv: Vec<std::ffi::OsString> = vec!["trialgate".into(), "--mappings".into(), mappings.into()];
        argv.extend(["--trials-dir".into(), trials_dir.into(), "sweep".into()]);
        argv.extend(["--config".into(), config.into(), "--format".into(), "json".into()]);
        argv.extend([
            "-o".into(),
            report.clone().into(),
            "--state".into(),
            g.schedule.state.clone().into(),
        ]);
        argv.extend(["--changes".into(), changes.into_os_string()]);
        if g.schedule.bulk {
            argv.push("--bulk".into());
        }
        let outcome = Cli::try_parse_from(&argv).map_err(anyhow::Error::from).and_then(run);
        match (&outcome, once) {
            (Ok(()), _) => eprintln!("daemon: run done; report {}", report.display()),
            (Err(e), false) => {
                tracing::error!("the scheduled sweep failed: {e:#}");
                eprintln!("daemon: the run failed ({e:#}); waiting for the next");
            }
            (Err(_), true) => {}
        }
        if once {
            return outcome;
        }
    }
}

fn parse_state(s: &str) -> Result<trialgate::state::Location, String> {
    if s.is_empty() {
        return Err("give a file path or a postgres:// URL".into());
    }
    Ok(trialgate::state::Location::parse(s))
}

/// An error that is the user's input or configuration (exit 2), as opposed to a failure (exit 1).
#[derive(Debug)]
struct BadInput(String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

fn bad(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(BadInput(e.to_string()))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<BadInput>().is_some() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn parse_as_of(as_of: Option<String>) -> anyhow::Result<Date> {
    match as_of {
        Some(s) => Date::parse(&s).ok_or_else(|| bad(format!("--as-of `{s}` is not a date; write YYYY-MM-DD"))),
        None => Ok(Date::today_utc()),
    }
}

fn load_config(mappings: &Path, trials_dir: &Path, trials: &[String]) -> anyhow::Result<trialgate::Config> {
    let cfg = trialgate::load_config(mappings, trials_dir, trials).map_err(bad)?;
    for w in &cfg.warnings {
        tracing::info!("{}", w.0);
    }
    Ok(cfg)
}

fn load_decisions(path: &Option<PathBuf>, cfg: &trialgate::Config) -> anyhow::Result<Decisions> {
    let Some(p) = path else { return Ok(Decisions::default()) };
    let d = Decisions::load(p).map_err(bad)?;
    let known: Vec<(String, Vec<String>)> = cfg
        .trials
        .iter()
        .map(|t| (t.id.clone(), t.criteria.iter().map(|c| c.id.to_string()).collect()))
        .collect();
    for x in d.dangling(&known) {
        tracing::warn!(
            "{}: decision for trial `{}` criterion `{}` matches no loaded criterion",
            p.display(),
            x.trial,
            x.criterion
        );
    }
    Ok(d)
}

/// Names the decisions file in the provenance, logs input problems, writes the report.
/// A progress line on a terminal (redrawn four times a second), or a log line every ten
/// seconds when stderr is not one (a scheduler's log); stops when dropped.
struct ProgressDisplay {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressDisplay {
    fn start(what: &'static str) -> ProgressDisplay {
        use std::io::IsTerminal;
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let terminal = std::io::stderr().is_terminal();
        let thread = std::thread::spawn(move || {
            let p = &trialgate::pipeline::PROGRESS;
            let started = std::time::Instant::now();
            let (tick, every) = if terminal { (250, 1) } else { (250, 40) };
            let mut n = 0u64;
            let mut shown = false;
            while !flag.load(Relaxed) {
                // Parked, not slept: the drop below wakes it at once.
                std::thread::park_timeout(std::time::Duration::from_millis(tick));
                if flag.load(Relaxed) {
                    break;
                }
                n += 1;
                if n % every != 0 {
                    continue;
                }
                let secs = started.elapsed().as_secs_f64();
                let (read, total) = (p.bytes_read.load(Relaxed), p.bytes_total.load(Relaxed));
                let (done, all) = (p.patients_done.load(Relaxed), p.patients_total.load(Relaxed));
                let line = if total > 0 && read < total {
                    let rate = read as f64 / secs;
                    let eta = (total - read) as f64 / rate.max(1.0);
                    format!(
                        "{what}: read {:.0} of {:.0} MB ({:.0}%), {:.0} MB/s, about {eta:.0} s left",
                        read as f64 / 1e6,
                        total as f64 / 1e6,
                        100.0 * read as f64 / total as f64,
                        rate / 1e6
                    )
                } else if all > 0 {
                    let done = done.min(all);
                    format!(
                        "{what}: {done} of {all} patients ({:.0}%), {:.1} s",
                        100.0 * done as f64 / all as f64,
                        secs
                    )
                } else {
                    format!("{what}: starting, {secs:.0} s")
                };
                if terminal {
                    eprint!("\r\x1b[K{line}");
                    shown = true;
                } else {
                    tracing::info!("{line}");
                }
            }
            if shown {
                eprint!("\r\x1b[K");
            }
        });
        ProgressDisplay {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ProgressDisplay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Adds the decisions file to the provenance (decisions change outcomes) and logs the input
/// problems.
fn note_inputs(
    provenance: &mut trialgate::Provenance,
    issues: &[trialgate::fhir::InputIssue],
    decisions: &Option<PathBuf>,
) -> anyhow::Result<()> {
    if let Some(p) = decisions {
        provenance.sources.push(trialgate::SourceFile::hashed("decisions", p).map_err(bad)?);
    }
    // Locations can name patients (a search's label lists its patient ids) and messages can
    // quote data: the details go to the report, and to the log only at debug level.
    if !issues.is_empty() {
        tracing::warn!(
            problems = issues.len(),
            "input problems were found and skipped; see input_issues in the report"
        );
    }
    for i in issues {
        tracing::debug!("{}: {}", i.location, i.message);
    }
    Ok(())
}

/// The end-of-run summary's verdict counts per trial, and why patients are in error.
#[derive(Default)]
struct Tally {
    trials: Vec<(String, [usize; 4])>,
    /// Distinct reasons with their patient counts, the first few kept: a reason can name a
    /// resource, and a cohort of failures must not grow this without bound.
    errors: Vec<(String, usize)>,
    other_errors: usize,
    /// The patient last counted in error: its other trials' results say the same.
    last_error: String,
}

impl Tally {
    const REASONS: usize = 10;

    fn add(&mut self, r: &trialgate::criteria::eval::TrialResult) {
        let i = self.trials.iter().position(|(t, _)| *t == r.trial).unwrap_or_else(|| {
            self.trials.push((r.trial.clone(), [0; 4]));
            self.trials.len() - 1
        });
        self.trials[i].1[r.status as usize] += 1;
        if r.status == trialgate::criteria::Status::Error && r.patient != self.last_error {
            self.last_error.clone_from(&r.patient);
            let why = r.record.as_deref().unwrap_or("no reason given");
            match self.errors.iter().position(|(w, _)| w == why) {
                Some(k) => self.errors[k].1 += 1,
                None if self.errors.len() < Self::REASONS => self.errors.push((why.to_string(), 1)),
                None => self.other_errors += 1,
            }
        }
    }

    fn print(&self) {
        for (trial, [e, p, i, x]) in &self.trials {
            let errors = if *x > 0 { format!(", {x} in error") } else { String::new() };
            eprintln!("  {trial}: {e} eligible, {p} potentially eligible, {i} ineligible{errors}");
        }
        for (why, n) in &self.errors {
            eprintln!("  {n} patient(s) in error: {why}");
        }
        if self.other_errors > 0 {
            eprintln!("  {} patient(s) in error for other reasons (see the report)", self.other_errors);
        }
    }
}

impl From<Format> for trialgate::report::Format {
    fn from(f: Format) -> Self {
        match f {
            Format::Json => trialgate::report::Format::Json,
            Format::Text => trialgate::report::Format::Text,
            Format::Csv => trialgate::report::Format::Csv,
            Format::Html => trialgate::report::Format::Html,
        }
    }
}

/// Where a report goes: standard output, or a file written beside its final name and renamed
/// into place at the end, so that a run that fails halfway never leaves half a report there.
/// Standard output can be held back the same way (in a temporary file, copied out at the
/// end) where the run may still fail after its first rows: a sweep writing back as it reports.
enum ReportSink {
    Stdout,
    File {
        path: PathBuf,
        partial: PathBuf,
    },
    /// An unnamed file: created owner-only under a fresh name and unlinked at once, so that
    /// no other user reads the verdicts and a killed process leaves nothing behind.
    HeldStdout {
        file: std::fs::File,
        dir: PathBuf,
    },
}

impl ReportSink {
    fn open(output: Option<&std::path::Path>) -> anyhow::Result<ReportSink> {
        ReportSink::open_holding(output, false)
    }

    /// [`ReportSink::open`]; with `hold`, standard output gets nothing until [`ReportSink::close`].
    fn open_holding(output: Option<&std::path::Path>, hold: bool) -> anyhow::Result<ReportSink> {
        Ok(match output {
            None if hold => {
                let dir = std::env::temp_dir();
                let file = unnamed_file(&dir).with_context(|| {
                    format!(
                        "holding the report in a temporary file in {} (set TMPDIR, or give -o FILE)",
                        dir.display()
                    )
                })?;
                ReportSink::HeldStdout { file, dir }
            }
            None => ReportSink::Stdout,
            Some(p) => {
                let mut name = p.file_name().unwrap_or_default().to_os_string();
                name.push(".partial");
                let partial = p.with_file_name(name);
                std::fs::File::create(&partial).with_context(|| format!("writing {}", partial.display()))?;
                ReportSink::File {
                    path: p.to_path_buf(),
                    partial,
                }
            }
        })
    }

    fn writer(&self) -> Box<dyn Write> {
        match self {
            ReportSink::Stdout => Box::new(std::io::BufWriter::new(std::io::stdout())),
            ReportSink::File { partial, .. } => match std::fs::OpenOptions::new().write(true).truncate(true).open(partial) {
                Ok(f) => Box::new(std::io::BufWriter::new(f)),
                Err(e) => Box::new(FailingWriter(Some(e))),
            },
            // The clone shares the file's offset: `close` rewinds before copying out.
            ReportSink::HeldStdout { file, .. } => match file.try_clone() {
                Ok(f) => Box::new(std::io::BufWriter::new(f)),
                Err(e) => Box::new(FailingWriter(Some(e))),
            },
        }
    }

    fn discard(&self) {
        if let ReportSink::File { partial, .. } = self {
            let _ = std::fs::remove_file(partial);
        }
    }

    fn close<W>(self, written: std::io::Result<W>) -> anyhow::Result<()> {
        match (self, written) {
            (ReportSink::Stdout, Ok(_)) => Ok(()),
            // A closed pipe (`| head`) is not an error worth reporting.
            (ReportSink::Stdout, Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            (ReportSink::Stdout, Err(e)) => Err(e).context("writing the report"),
            (ReportSink::File { path, partial }, Ok(_)) => {
                std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))
            }
            (ReportSink::File { path, partial }, Err(e)) => {
                let _ = std::fs::remove_file(&partial);
                Err(e).with_context(|| format!("writing {}", path.display()))
            }
            (ReportSink::HeldStdout { dir, .. }, Err(e)) => Err(e).with_context(|| {
                format!(
                    "holding the report in a temporary file in {} (set TMPDIR, or give -o FILE)",
                    dir.display()
                )
            }),
            (ReportSink::HeldStdout { mut file, .. }, Ok(_)) => {
                use std::io::Seek;
                let copied = file.rewind().and_then(|()| {
                    let mut out = std::io::stdout().lock();
                    std::io::copy(&mut file, &mut out)?;
                    out.flush()
                });
                match copied {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the report"),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// A new file in `dir` that only this process can reach: created owner-only under a name
/// nobody else holds, then unlinked (it lives as long as its handle).
fn unnamed_file(dir: &Path) -> std::io::Result<std::fs::File> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for attempt in 0..16u32 {
        let path = dir.join(format!(
            "trialgate-report-{}-{:08x}",
            std::process::id(),
            seed.wrapping_add(attempt)
        ));
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        match opts.open(&path) {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
}

/// A writer that reports the error met opening its file at the first write.
struct FailingWriter(Option<std::io::Error>);

impl Write for FailingWriter {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(self
            .0
            .take()
            .unwrap_or_else(|| std::io::Error::other("the report file could not be opened")))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Screen {
            bundle,
            report:
                ReportArgs {
                    as_of,
                    trials,
                    format,
                    decisions,
                    output,
                    shard,
                },
        } => {
            let as_of = parse_as_of(as_of)?;
            if !bundle.exists() {
                return Err(bad(format!("{}: no such file or folder", bundle.display())));
            }
            let cfg = load_config(&cli.mappings, &cli.trials_dir, &trials)?;
            let loaded = load_decisions(&decisions, &cfg)?;
            let started = std::time::Instant::now();
            let sink = ReportSink::open(output.as_deref())?;
            let progress = ProgressDisplay::start("screen");
            let writer = std::cell::RefCell::new(None);
            let version = cfg.provenance.version.clone();
            let mut tally = Tally::default();
            let format_out: trialgate::report::Format = format.into();
            // The report is the only reader of these results: build what it shows, no more.
            let mut totals = trialgate::screen_each(
                &bundle,
                &cfg,
                as_of,
                &loaded,
                shard,
                format_out.detail(),
                &mut |patients| {
                    *writer.borrow_mut() = Some(trialgate::report::Writer::new(
                        sink.writer(),
                        format.into(),
                        as_of,
                        &version,
                        patients,
                    ));
                },
                &mut |r| {
                    tally.add(&r);
                    if let Some(w) = writer.borrow_mut().as_mut() {
                        w.result(&r);
                    }
                },
            )
            .map_err(|e| {
                sink.discard();
                bad(e)
            })?;
            drop(progress);
            let mb = trialgate::pipeline::PROGRESS.bytes_total.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6;
            eprintln!(
                "screen: {} patient(s), {mb:.1} MB, {:.1} s; {} input problem(s){}",
                totals.patients,
                started.elapsed().as_secs_f64(),
                totals.issues.len(),
                if totals.issues.is_empty() {
                    ""
                } else {
                    " (logged above; in the report)"
                }
            );
            tally.print();
            note_inputs(&mut totals.provenance, &totals.issues, &decisions)?;
            let Some(w) = writer.into_inner() else {
                anyhow::bail!("internal: the screening never started its report");
            };
            let t = trialgate::report::Totals {
                patients: totals.patients,
                provenance: &totals.provenance,
                unmapped: &totals.unmapped,
                issues: &totals.issues,
            };
            sink.close(w.finish(&t))
        }
        Command::Sweep(args) => {
            let SweepArgs {
                config,
                server,
                group,
                patients,
                patient,
                report:
                    ReportArgs {
                        as_of,
                        trials,
                        format,
                        decisions,
                        output,
                        shard,
                    },
                token_env,
                token_file,
                batch,
                concurrency,
                page_size,
                all_observations,
                timeout,
                max_retries,
                smart_client_id,
                smart_key,
                smart_alg,
                smart_kid,
                smart_scope,
                smart_token_endpoint,
                write_back,
                write_ineligible,
                write_to,
                dry_run,
                bulk,
                since,
                bulk_dir,
                bulk_poll_max,
                state,
                changes,
            } = *args;
            let g = trialgate::gateway::Gateway::load(&config, &|k| std::env::var(k).ok()).map_err(bad)?;
            let nonempty = |s: &String| (!s.is_empty()).then(|| s.clone());
            let server = server.or_else(|| nonempty(&g.server.url)).ok_or_else(|| {
                bad(format!(
                    "no FHIR server: pass --server URL, or set [server] url in {} or TRIALGATE_SERVER_URL",
                    config.display()
                ))
            })?;
            let trials = if trials.is_empty() { g.sweep.trials.clone() } else { trials };
            let (batch, concurrency, page_size) = (
                batch.unwrap_or(g.sweep.batch),
                concurrency.unwrap_or(g.sweep.concurrency),
                page_size.unwrap_or(g.sweep.page_size),
            );
            let (timeout, max_retries) = (
                timeout.unwrap_or(g.server.timeout_secs),
                max_retries.unwrap_or(g.server.max_retries),
            );
            // Flags over `[auth]`: a flag naming a way in (a token or a SMART client) replaces the
            // configured method whole; the SMART details are taken flag by flag.
            let mut auth = AuthArgs::from_config(&g);
            if token_env.is_some() || token_file.is_some() || smart_client_id.is_some() {
                (auth.token_env, auth.token_file, auth.smart_client_id, auth.smart_key) =
                    (token_env, token_file, smart_client_id, smart_key);
            }
            auth.smart_alg = smart_alg.unwrap_or(auth.smart_alg);
            auth.smart_kid = smart_kid.or(auth.smart_kid);
            auth.smart_scope = smart_scope.or(auth.smart_scope);
            auth.smart_token_endpoint = smart_token_endpoint.or(auth.smart_token_endpoint);
            let write_back = write_back || g.write_back.enabled;
            let write_ineligible = write_ineligible || g.write_back.write_ineligible;
            let write_to = write_to.or_else(|| nonempty(&g.write_back.target_url));
            if (dry_run || write_ineligible || write_to.is_some()) && !write_back {
                return Err(bad(
                    "--dry-run, --write-ineligible and --write-to need write-back (--write-back, or [write_back] enabled = true)",
                ));
            }
            let configured_cohort = group.is_none() && patients.is_none() && patient.is_empty();
            let as_of_given = as_of.is_some();
            let mut as_of = parse_as_of(as_of)?;
            let cfg = load_config(&cli.mappings, &cli.trials_dir, &trials)?;
            let loaded = load_decisions(&decisions, &cfg)?;
            let opts = auth.options(&g, timeout, max_retries, write_back)?;
            let client = FhirClient::new(&server, opts.clone()).map_err(bad)?;
            let writer = match (&write_to, write_back) {
                (Some(url), _) => Some(FhirClient::new(url, opts).map_err(bad)?),
                (None, true) => Some(client.counted_apart()),
                (None, false) => None,
            };
            let cohort = match (group, patients, patient.is_empty()) {
                _ if configured_cohort => g.cohort(),
                (Some(g), _, _) => Cohort::Group(g),
                (None, Some(q), _) => Cohort::Search(q),
                (None, None, false) => Cohort::Ids(patient),
                (None, None, true) => Cohort::All,
            };
            let sweep_opts = SweepOptions {
                shard,
                cohort,
                batch,
                concurrency,
                page_size,
                code_filter: !all_observations && g.sweep.code_filter,
                report_progress: true,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let started = std::time::Instant::now();
            // The run is what decides its verdicts: the same key resumes an interrupted run.
            let mut state = match &state {
                Some(path) => {
                    let cohort_key = format!(
                        "{server}|{:?}|{}|{:?}|{}",
                        sweep_opts.cohort,
                        cfg.provenance.config_hash,
                        shard,
                        if bulk { "bulk" } else { "rest" }
                    );
                    // Without an explicit date, an interrupted run of this cohort is finished first,
                    // as of its own date: a daily schedule must not abandon it.
                    if !as_of_given {
                        if let Some(d) = trialgate::state::State::unfinished_as_of(path, &cohort_key)
                            .map_err(bad)?
                            .and_then(|d| Date::parse(&d))
                        {
                            as_of = d;
                        }
                    }
                    let run_key = format!("{cohort_key}|{as_of}");
                    let st = trialgate::state::State::open(path, &run_key, &cohort_key, &as_of.to_string()).map_err(bad)?;
                    if st.resumed {
                        eprintln!("sweep: resuming the interrupted run as of {as_of} recorded in {path}");
                    }
                    Some(st)
                }
                None => None,
            };
            let progress = ProgressDisplay::start("sweep");
            if bulk && shard.is_some() {
                return Err(bad(
                    "--shard with --bulk would export the whole cohort once per shard: export once (--bulk --bulk-dir DIR), then run `trialgate screen --bundle DIR --shard K/N` in each process",
                ));
            }
            let (mut swept, errors, unfetched) = if bulk {
                let group = match &sweep_opts.cohort {
                    Cohort::Group(g) => Some(g.clone()),
                    Cohort::All => None,
                    _ => {
                        return Err(bad(
                            "--bulk exports a Group (--group) or every patient; the configured cohort is a search or an id list",
                        ));
                    }
                };
                let (dir, temporary) = match bulk_dir {
                    Some(d) => (d, false),
                    None => (std::env::temp_dir().join(format!("trialgate-export-{}", std::process::id())), true),
                };
                let bulk_opts = trialgate::sweep::BulkOptions {
                    group,
                    since,
                    code_filter: sweep_opts.code_filter,
                    max_poll: std::time::Duration::from_secs(bulk_poll_max),
                };
                let outcome = runtime.block_on(trialgate::sweep::bulk_read(&client, &cfg, as_of, &bulk_opts, &dir, state.as_mut()));
                if temporary {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                let (read, outcome) = outcome?;
                let s = trialgate::sweep::Swept::of_facts(read, &cfg, as_of);
                // The verdicts are not held (a cohort's can be gigabytes with their explanations):
                // this pass stores them, the one below writes them back and reports them.
                if let Some(st) = state.as_mut() {
                    st.clear()?;
                    // A Bulk sweep has no earlier verdicts to read back: it evaluates every patient.
                    s.each_run(&cfg, &loaded, trialgate::criteria::Detail::Full, None, &mut |run| st.save(run))?;
                }
                let exported = &outcome.exported;
                match &outcome.incremental_since {
                    Some(t) => eprintln!(
                        "bulk export: only what changed since {t}, applied to the stored facts; {} deleted resource(s) removed",
                        exported.deleted.len()
                    ),
                    None if state.is_some() => eprintln!("bulk export: full; its facts are stored for the next, incremental run"),
                    None => {}
                }
                eprintln!(
                    "bulk export: {} file(s), {:.1} MB, transactionTime {}; {} server error(s); {} request(s), {} retried",
                    exported.files.len(),
                    exported.bytes as f64 / 1e6,
                    exported.transaction_time.as_deref().unwrap_or("not given"),
                    exported.issues.len(),
                    client.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
                    client.stats.retries.load(std::sync::atomic::Ordering::Relaxed),
                );
                eprintln!("sweep: {} patient(s); {:.1} s", s.totals.patients, started.elapsed().as_secs_f64());
                (s, 0, 0)
            } else {
                let (s, summary) = runtime.block_on(trialgate::sweep::sweep_held(
                    &client,
                    &cfg,
                    as_of,
                    &loaded,
                    &sweep_opts,
                    state.as_mut(),
                ))?;
                eprintln!(
                    "sweep: {} patient(s), {} in error; {} read request(s), {} retried, {} failed; {:.1} s",
                    summary.patients,
                    summary.errors,
                    summary.requests,
                    summary.retries,
                    summary.failed_requests,
                    started.elapsed().as_secs_f64()
                );
                (s, summary.errors, summary.unfetched)
            };
            drop(progress);
            // A run whose every patient was fetched is finished; one with patients that could not
            // be fetched stays open, to be resumed, and those patients tried again. (An id the
            // server has no Patient for is a definite answer: it does not hold the run open.)
            // Statuses before this run, of those that changed: the page marks them.
            let mut previous = std::collections::HashMap::new();
            let mut found = None;
            if let (Some(st), 0) = (state.as_ref(), unfetched) {
                let c = st.changes()?;
                for ch in c.newly_eligible.iter().chain(&c.newly_ineligible) {
                    let was = ch
                        .from
                        .as_ref()
                        .and_then(|f| serde_json::from_value(serde_json::Value::String(f.clone())).ok());
                    if let Some(was) = was {
                        previous.insert((ch.patient.clone(), ch.trial.clone()), was);
                    }
                }
                match &c.since {
                    Some(since) => eprintln!(
                        "changes since the run as of {since}: {} newly eligible or potentially eligible, {} newly ineligible",
                        c.newly_eligible.len(),
                        c.newly_ineligible.len()
                    ),
                    None => eprintln!("changes: this is the first finished run of this cohort"),
                }
                found = Some(c);
            }
            // The run is finished (and its changes written) once its report and write-back are
            // done: one that failed there is run again, not taken as what the next run compares
            // with.
            let finish_run = |state: &mut Option<trialgate::state::State>| -> anyhow::Result<()> {
                let (Some(st), Some(c)) = (state.as_mut(), &found) else {
                    return Ok(());
                };
                st.mark_finished()?;
                if let Some(path) = &changes {
                    let mut out = String::from("patient,trial,from,to\n");
                    for ch in c.newly_eligible.iter().chain(&c.newly_ineligible) {
                        out.push_str(&format!(
                            "{},{},{},{}\n",
                            ch.patient,
                            ch.trial,
                            ch.from.as_deref().unwrap_or(""),
                            ch.to
                        ));
                    }
                    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
                }
                Ok(())
            };
            // Write-back and the report take the verdicts in one pass, a run at a time.
            note_inputs(&mut swept.totals.provenance, &swept.totals.issues, &decisions)?;
            let wopts = WriteOptions {
                write_ineligible,
                dry_run,
                ..Default::default()
            };
            let mut back = writer
                .as_ref()
                .map(|w| trialgate::writeback::Writer::new(w, &cfg.trials, as_of, &wopts, vec![swept.totals.patients; cfg.trials.len()]));
            // A dry run prints the writes it would make instead of a report.
            let sink = if dry_run {
                None
            } else {
                // Written back as it is reported: a write that fails halfway must not leave
                // half a report on standard output.
                Some(ReportSink::open_holding(output.as_deref(), writer.is_some())?)
            };
            let mut report = sink.as_ref().map(|k| {
                trialgate::report::Writer::new(
                    k.writer(),
                    format.into(),
                    as_of,
                    &swept.totals.provenance.version,
                    swept.totals.patients,
                )
                .changes(previous)
                .link_to(&server)
            });
            // Write-back writes the reasons; a report alone may need less.
            let detail = if back.is_some() {
                trialgate::criteria::Detail::Full
            } else {
                trialgate::report::Format::from(format).detail()
            };
            let mut tally = Tally::default();
            // A dry run prints its plan as it is made: a cohort's worth would not fit in memory.
            let mut plan = dry_run.then(|| trialgate::writeback::BundlePrinter::new(std::io::BufWriter::new(std::io::stdout())));
            let passed = swept.each_run(&cfg, &loaded, detail, state.as_ref(), &mut |run| {
                run.iter().for_each(|r| tally.add(r));
                if let Some(b) = back.as_mut() {
                    runtime.block_on(b.add(run)).context("writing ResearchSubjects")?;
                    if let Some(p) = plan.as_mut() {
                        for e in b.take_planned() {
                            p.entry(&e).context("printing the planned writes")?;
                        }
                    }
                }
                if let Some(r) = report.as_mut() {
                    run.iter().for_each(|x| r.result(x));
                }
                anyhow::Ok(())
            });
            let written = match (passed, back) {
                (Err(e), _) => Err(e),
                (Ok(()), None) => Ok(None),
                (Ok(()), Some(b)) => runtime.block_on(b.finish()).context("writing ResearchSubjects").map(Some),
            };
            let written = match written {
                Ok(w) => w,
                Err(e) => {
                    if let Some(k) = &sink {
                        k.discard();
                    }
                    return Err(e);
                }
            };
            tally.print();
            if let (Some(w), Some(writer)) = (&written, &writer) {
                eprintln!(
                    "write-back{}: {} created, {} updated, {} unchanged, {} left alone (moved on by a person), {} not written, {} refused; {} request(s), {} retried",
                    if dry_run { " (dry run: nothing sent)" } else { "" },
                    w.created,
                    w.updated,
                    w.unchanged,
                    w.left_alone,
                    w.not_written,
                    w.failed.len(),
                    writer.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
                    writer.stats.retries.load(std::sync::atomic::Ordering::Relaxed)
                );
                for (ident, why) in &w.failed {
                    tracing::warn!("ResearchSubject {ident} was refused: {why}");
                }
                if let Some(mut p) = plan.take() {
                    for e in &w.planned {
                        p.entry(e).context("printing the planned writes")?;
                    }
                    p.finish().context("printing the planned writes")?;
                    finish_run(&mut state)?;
                    return Ok(());
                }
            }
            if let (Some(k), Some(r)) = (sink, report) {
                let totals = trialgate::report::Totals {
                    patients: swept.totals.patients,
                    provenance: &swept.totals.provenance,
                    unmapped: &swept.totals.unmapped,
                    issues: &swept.totals.issues,
                };
                k.close(r.finish(&totals))?;
            }
            finish_run(&mut state)?;
            if let Some(w) = written.filter(|w| !w.failed.is_empty()) {
                anyhow::bail!(
                    "{} ResearchSubject write(s) were refused by the server (see the warnings above)",
                    w.failed.len()
                );
            }
            // The report is written either way; the exit status tells a scheduler that some
            // patients could not be screened.
            if errors > 0 {
                anyhow::bail!("{errors} patient(s) could not be screened: see status `error` in the report");
            }
            Ok(())
        }
        Command::Daemon { config, once } => daemon(&cli.mappings, &cli.trials_dir, &config, once),
        Command::Serve { config, listen, no_auth } => {
            trialgate::tune_allocator_for_service();
            let g = trialgate::gateway::Gateway::load(&config, &|k| std::env::var(k).ok()).map_err(bad)?;
            let listen = listen.unwrap_or_else(|| g.serve.listen.clone());
            let addr: std::net::SocketAddr = listen
                .parse()
                .map_err(|_| bad(format!("--listen `{listen}` is not an address such as 127.0.0.1:8080")))?;
            let tokens: Vec<String> = std::env::var(&g.serve.token_env)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect();
            if tokens.is_empty() && !no_auth {
                return Err(bad(format!(
                    "no API tokens: set {} to one or more bearer tokens (comma-separated), or pass --no-auth for a service nobody else can reach",
                    g.serve.token_env
                )));
            }
            if no_auth {
                tracing::warn!("serving without authentication (--no-auth)");
            }
            let cfg = load_config(&cli.mappings, &cli.trials_dir, &[])?;
            // /health checks the configured FHIR server (its CapabilityStatement, public by the
            // FHIR specification, with a short timeout and no retries) and the state database.
            let fhir = if g.server.url.is_empty() {
                None
            } else {
                let opts = ClientOptions {
                    read_timeout: std::time::Duration::from_secs(3),
                    connect_timeout: std::time::Duration::from_secs(3),
                    max_retries: 0,
                    ..Default::default()
                };
                Some(FhirClient::new(&g.server.url, opts).map_err(bad)?)
            };
            let state = (!g.schedule.state.is_empty()).then(|| trialgate::state::Location::parse(&g.schedule.state));
            // `$screen`, `/notify` and write-back read (and write) the configured server with the
            // sweep's authentication. A service runs for months: no run-wide retry budget.
            let live = if g.server.url.is_empty() {
                None
            } else {
                let mut opts = AuthArgs::from_config(&g).options(&g, g.server.timeout_secs, g.server.max_retries, g.write_back.enabled)?;
                opts.retry_budget = u32::MAX;
                let client = FhirClient::new(&g.server.url, opts.clone()).map_err(bad)?;
                let writer = match (g.write_back.enabled, g.write_back.target_url.as_str()) {
                    (false, _) => None,
                    (true, "") => Some(client.counted_apart()),
                    (true, url) => Some(FhirClient::new(url, opts).map_err(bad)?),
                };
                let ledger = match &state {
                    Some(loc) => Some(trialgate::state::Ledger::open(loc).map_err(bad)?),
                    None => None,
                };
                let wopts = WriteOptions {
                    write_ineligible: g.write_back.write_ineligible,
                    ..Default::default()
                };
                Some(std::sync::Arc::new(trialgate::live::Live::new(
                    client,
                    writer,
                    wopts,
                    g.sweep.code_filter,
                    ledger,
                )))
            };
            let tls = match (g.serve.tls_cert.as_str(), g.serve.tls_key.as_str()) {
                ("", "") => None,
                ("", _) | (_, "") => return Err(bad("[serve] tls_cert and tls_key go together: set both for HTTPS, or neither")),
                (cert, key) => Some(trialgate::serve::tls_config(Path::new(cert), Path::new(key)).map_err(bad)?),
            };
            let header = g.serve.trusted_user_header.trim();
            let page = trialgate::console::PageOptions {
                session_ttl: std::time::Duration::from_secs(g.serve.session_hours * 3600),
                // Checked when the configuration was loaded.
                trusted_user_header: (!header.is_empty())
                    .then(|| axum::http::HeaderName::from_bytes(header.as_bytes()).ok())
                    .flatten(),
                // Over HTTPS the session cookie is never sent in clear.
                secure_cookies: tls.is_some(),
                link_base: (!g.server.url.is_empty()).then(|| g.server.url.clone()),
                board_rows: g.serve.board_rows as usize,
            };
            let app = trialgate::serve::App::with(
                cfg,
                if no_auth { Vec::new() } else { tokens },
                (g.serve.max_body_mb as usize) << 20,
                trialgate::serve::Services { fhir, state, live, page },
            );
            // The scheduled sweeps run in the same process, on a thread of their own (each is a
            // `sweep` run with its own runtime); each batch is checkpointed as it is made.
            if !g.schedule.cron.is_empty() {
                let (mappings, trials_dir) = (cli.mappings.clone(), cli.trials_dir.clone());
                std::thread::Builder::new()
                    .name("trialgate-schedule".into())
                    .spawn(move || {
                        if let Err(e) = daemon(&mappings, &trials_dir, &config, false) {
                            tracing::error!("the sweep schedule stopped: {e:#}");
                        }
                    })
                    .context("starting the schedule")?;
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                eprintln!(
                    "serving on {}://{addr} (the coordinator's page at /; POST /screen, /notify, /fhir/Patient/{{id}}/$screen; GET /trials, /health, /metrics, /openapi.json)",
                    if tls.is_some() { "https" } else { "http" }
                );
                match tls {
                    Some(tls) => trialgate::serve::serve_tls(listener, app, tls).await.context("serving"),
                    None => trialgate::serve::serve(listener, app).await.context("serving"),
                }
            })
        }
        Command::Subscribe {
            config,
            server,
            endpoint,
            topic,
            mut filters,
            lab_codes,
            content,
            heartbeat,
            token_env,
            dry_run,
        } => {
            let g = trialgate::gateway::Gateway::load(&config, &|k| std::env::var(k).ok()).map_err(bad)?;
            let server = server
                .or_else(|| (!g.server.url.is_empty()).then(|| g.server.url.clone()))
                .ok_or_else(|| {
                    bad(format!(
                        "no FHIR server: pass --server URL, or set [server] url in {}",
                        config.display()
                    ))
                })?;
            if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
                return Err(bad(format!("--endpoint `{endpoint}` is not an http(s) URL")));
            }
            let var = token_env.unwrap_or_else(|| g.serve.token_env.clone());
            let token = std::env::var(&var)
                .ok()
                .and_then(|v| v.split(',').map(str::trim).find(|t| !t.is_empty()).map(str::to_string))
                .ok_or_else(|| {
                    bad(format!(
                        "no token for the server to send: set {var} (the service's API tokens) or pass --token-env VAR"
                    ))
                })?;
            if lab_codes {
                let cfg = load_config(&cli.mappings, &cli.trials_dir, &g.sweep.trials)?;
                let codes = trialgate::sweep::observation_codes(&cfg, false);
                if !codes.is_empty() {
                    filters.push(format!("Observation?code={}", codes.join(",")));
                }
            }
            let spec = trialgate::notify::SubscriptionSpec {
                topic,
                endpoint: endpoint.clone(),
                filters,
                content,
                heartbeat_secs: heartbeat,
                authorization: Some(format!("Bearer {token}")),
            };
            if dry_run {
                let shown = trialgate::notify::SubscriptionSpec {
                    authorization: Some("Bearer <the token, not shown>".into()),
                    ..spec
                };
                println!("{}", serde_json::to_string_pretty(&shown.resource(None)).unwrap_or_default());
                return Ok(());
            }
            let opts = AuthArgs::from_config(&g).options(&g, g.server.timeout_secs, g.server.max_retries, true)?;
            let client = FhirClient::new(&server, opts).map_err(bad)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let (id, created) = runtime
                .block_on(trialgate::live::subscribe(&client, &spec))
                .context("registering the Subscription")?;
            println!(
                "{} Subscription/{id}: topic {}, posting {} notifications to {endpoint}, heartbeat every {heartbeat} s",
                if created { "created" } else { "updated" },
                spec.topic,
                spec.content
            );
            Ok(())
        }
        Command::Check { trials, list } => {
            let cfg = trialgate::load_config(&cli.mappings, &cli.trials_dir, &trials).map_err(bad)?;
            for w in &cfg.warnings {
                println!("note: {}", w.0);
            }
            let criteria: usize = cfg.trials.iter().map(|t| t.criteria.len()).sum();
            println!(
                "ok: {} trial(s), {criteria} criteria, {} lab(s), {} set(s) in {} mapping file(s)",
                cfg.trials.len(),
                cfg.mappings.labs.len(),
                cfg.mappings.sets.len(),
                cfg.mappings.files.len()
            );
            if list {
                println!("\nlabs (canonical unit):");
                for l in &cfg.mappings.labs {
                    println!("  {:<24} {:<20} {}", l.name, l.spec.unit, l.spec.description);
                }
                println!("\nsets:");
                for s in &cfg.mappings.sets {
                    println!("  {:<28} {}", s.name, s.spec.description);
                }
            }
            Ok(())
        }
    }
}
