//! The `trialgate` command line: a thin edge over the library. It parses arguments, loads
//! configuration, calls the library and maps failures to exit codes (0 success whatever the
//! verdicts, 2 bad input or configuration, 1 anything else).

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use trialgate::criteria::decisions::Decisions;
use trialgate::time::Date;

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
        /// Screening date (YYYY-MM-DD); look-back windows end on this day. Default: today (UTC).
        #[arg(long, value_name = "YYYY-MM-DD")]
        as_of: Option<String>,
        /// A trial id from the trials folder, or the path of a trial file. Repeatable. Default: all.
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Screen {
            bundle,
            as_of,
            trials,
            format,
            decisions,
            output,
        } => {
            let as_of = match as_of {
                Some(s) => Date::parse(&s).ok_or_else(|| bad(format!("--as-of `{s}` is not a date; write YYYY-MM-DD")))?,
                None => Date::today_utc(),
            };
            if !bundle.exists() {
                return Err(bad(format!("{}: no such file or folder", bundle.display())));
            }
            let cfg = trialgate::load_config(&cli.mappings, &cli.trials_dir, &trials).map_err(bad)?;
            for w in &cfg.warnings {
                tracing::info!("{}", w.0);
            }
            let decisions_path = decisions;
            let decisions = match &decisions_path {
                Some(p) => {
                    let d = Decisions::load(p).map_err(bad)?;
                    let known: Vec<(String, Vec<String>)> = cfg
                        .trials
                        .iter()
                        .map(|t| (t.id.clone(), t.criteria.iter().map(|c| c.id.clone()).collect()))
                        .collect();
                    for d in d.dangling(&known) {
                        tracing::warn!(
                            "{}: decision for trial `{}` criterion `{}` matches no loaded criterion",
                            p.display(),
                            d.trial,
                            d.criterion
                        );
                    }
                    d
                }
                None => Decisions::default(),
            };
            let started = std::time::Instant::now();
            let mut s = trialgate::screen(&bundle, &cfg, as_of, &decisions).map_err(bad)?;
            if let Some(p) = &decisions_path {
                // Decisions change outcomes, so the report names the file and its hash.
                s.provenance
                    .sources
                    .push(trialgate::SourceFile::hashed("decisions", p).map_err(bad)?);
            }
            for i in &s.issues {
                tracing::warn!("{}: {}", i.location, i.message);
            }
            tracing::info!(
                patients = s.patients,
                results = s.results.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "screening done"
            );
            let text = match format {
                Format::Json => trialgate::report::json(&s),
                Format::Text => trialgate::report::text(&s),
                Format::Csv => trialgate::report::csv(&s),
            };
            match output {
                Some(p) => std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?,
                None => {
                    let mut out = std::io::stdout().lock();
                    // A closed pipe (`| head`) is not an error worth reporting.
                    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                        if e.kind() != std::io::ErrorKind::BrokenPipe {
                            return Err(e).context("writing the report");
                        }
                    }
                }
            }
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
