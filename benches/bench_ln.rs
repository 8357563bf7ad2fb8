//! BENCH-LN at hospital scale: generates the cohort with ../shared/bench/gen_cohort.py (once,
//! cached under target/), screens it through the same library path as `trialgate screen`
//! (streaming reader, evaluator, CSV writer), checks every patient against the reference
//! implementation's outcome, and prints the figures. Timings are printed, never asserted.
//!
//!     cargo bench --bench bench_ln                   # N = 20,000, seed 42, 3 runs
//!     BENCH_N=2000 BENCH_RUNS=5 cargo bench --bench bench_ln
//!
//! Also timed on the same data, when present: the plain-Python reference peer, the DuckDB
//! peer (if `import duckdb` works in `$BENCH_PYTHON`, default python3), and all five seed
//! trials together. Memory growth per patient is the difference of the peak RSS of one
//! screening at N and at N/4 (each in a fresh process: this one, run again), divided by the
//! difference in patients; the N/4 cohort is generated beside the other (`BENCH_SMALL_DIR`
//! names another folder holding its NDJSON; `BENCH_GROWTH=0` skips it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use trialgate::criteria::decisions::Decisions;
use trialgate::report::{Format, Totals, Writer};
use trialgate::time::Date;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU seconds this process has used (user + system), from /proc (Linux clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn python(args: &[&str]) -> Result<f64, String> {
    run_python("python3", args)
}

fn run_python(interpreter: &str, args: &[&str]) -> Result<f64, String> {
    let started = Instant::now();
    let out = Command::new(interpreter)
        .args(args)
        .output()
        .map_err(|e| format!("{interpreter}: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One screening, as the CLI does it, written as CSV to `out`. Returns (wall s, CPU s).
fn screen(data: &Path, cfg: &trialgate::Config, out: &Path) -> (f64, f64) {
    let as_of = Date::parse("2026-06-01").expect("a valid date");
    let (wall, cpu) = (Instant::now(), cpu_seconds());
    let mut file = Some(std::io::BufWriter::new(
        std::fs::File::create(out).expect("the output file can be written"),
    ));
    let writer = std::cell::RefCell::new(None);
    let totals = trialgate::screen_each(
        data,
        cfg,
        as_of,
        &Decisions::default(),
        None,
        // What the CLI asks for with --format csv.
        Format::Csv.detail(),
        &mut |n| {
            if let Some(f) = file.take() {
                *writer.borrow_mut() = Some(Writer::new(f, Format::Csv, as_of, "bench", n));
            }
        },
        &mut |r| {
            if let Some(w) = writer.borrow_mut().as_mut() {
                w.result(&r);
            }
        },
    )
    .expect("the cohort can be read");
    let w = writer.into_inner().expect("the screening started");
    w.finish(&Totals {
        patients: totals.patients,
        provenance: &totals.provenance,
        unmapped: &totals.unmapped,
        issues: &totals.issues,
    })
    .expect("the report is written");
    (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu)
}

/// Peak RSS (KB) of one BENCH-LN screening of `data` in a fresh process (this benchmark,
/// run again with `BENCH_CHILD` set).
fn child_peak_kb(data: &Path) -> Result<u64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .arg("--bench")
        .env("BENCH_CHILD", data)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("peak_rss_kb="))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no figure from the child: {}", String::from_utf8_lossy(&out.stderr)))
}

/// `data`, the NDJSON folder of a cohort of `n` patients, generated there if missing.
fn cohort(data: PathBuf, bench: &Path, n: usize, seed: u64) -> PathBuf {
    if !data.join("Observation.ndjson").is_file() {
        std::fs::create_dir_all(&data).expect("the data folder can be made");
        eprintln!("generating N = {n} (seed {seed}) into {} ...", data.display());
        let generator = bench.join("gen_cohort.py");
        python(&[
            generator.to_str().unwrap_or_default(),
            "--patients",
            &n.to_string(),
            "--out",
            data.to_str().unwrap_or_default(),
            "--seed",
            &seed.to_string(),
        ])
        .unwrap_or_else(|e| panic!("gen_cohort.py failed (is ../shared beside the checkout?): {e}"));
    }
    data
}

/// Where a cohort of `n` patients is cached under `target/bench-ln`.
fn cached(root: &Path, n: usize, seed: u64) -> PathBuf {
    root.join(format!("target/bench-ln/n{n}-seed{seed}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo test --all-targets` runs bench targets too, without `--bench`: a 470 MB benchmark
    // has no place in the test run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("bench_ln: run it with `cargo bench --bench bench_ln`");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bench = root.join("../shared/bench");
    let bench_trial = || {
        trialgate::load_config(
            &root.join("mappings"),
            &root.join("config/trials"),
            &[root.join("config/bench/bench-ln.yaml").display().to_string()],
        )
        .expect("the bench trial loads")
    };
    // A child run for the memory figure: one screening, then the peak.
    if let Ok(data) = std::env::var("BENCH_CHILD") {
        let out = std::env::temp_dir().join(format!("bench-ln-child-{}.csv", std::process::id()));
        screen(Path::new(&data), &bench_trial(), &out);
        let _ = std::fs::remove_file(&out);
        println!("peak_rss_kb={}", trialgate::pipeline::peak_rss_kb().unwrap_or(0));
        return;
    }
    let n: usize = env_or("BENCH_N", 20_000);
    let seed: u64 = env_or("BENCH_SEED", 42);
    let runs: usize = env_or("BENCH_RUNS", 3).max(1);
    let dir = std::env::var("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cached(&root, n, seed));
    let data = cohort(dir.join("data"), &bench, n, seed);
    let bytes: u64 = std::fs::read_dir(&data)
        .expect("the data folder")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();

    // The reference outcomes, and the plain-Python peer's time on the same data.
    let reference = dir.join("reference.csv");
    let peer = bench.join("peer_python.py");
    let python_wall = python(&[
        peer.to_str().unwrap_or_default(),
        "--data",
        data.to_str().unwrap_or_default(),
        "--out",
        reference.to_str().unwrap_or_default(),
    ])
    .unwrap_or_else(|e| panic!("peer_python.py failed: {e}"));
    // The DuckDB peer needs its module, which is best kept in a venv: BENCH_PYTHON names it.
    let duck = std::env::var("BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let duckdb_wall = run_python(&duck, &["-c", "import duckdb"])
        .map_err(|e| format!("`import duckdb` fails in {duck}: {}", e.trim().lines().last().unwrap_or_default()))
        .and_then(|_| {
            let peer = bench.join("peer_duckdb.py");
            let out = dir.join("duckdb.csv");
            let args = [
                peer.to_str().unwrap_or_default(),
                "--data",
                data.to_str().unwrap_or_default(),
                "--out",
                out.to_str().unwrap_or_default(),
            ];
            run_python(&duck, &args)
        });

    let bench_cfg = bench_trial();
    let out = dir.join("trialgate.csv");
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..runs {
        let (w, c) = screen(&data, &bench_cfg, &out);
        walls.push(w);
        cpus.push(c);
    }
    let peak_mb = trialgate::pipeline::peak_rss_kb().map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN);

    // Every patient against the reference (its `unknown` is our potentially-eligible).
    let reference: BTreeMap<String, String> = std::fs::read_to_string(&reference)
        .expect("the reference outcomes")
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(','))
        .map(|(p, o)| {
            (
                p.to_string(),
                if o == "unknown" {
                    "potentially-eligible".into()
                } else {
                    o.to_string()
                },
            )
        })
        .collect();
    let ours: BTreeMap<String, String> = std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            let patient = f.next()?.strip_prefix("Patient/")?.to_string();
            Some((patient, f.nth(1)?.to_string()))
        })
        .collect();
    let disagree = reference.iter().filter(|(p, o)| ours.get(*p) != Some(*o)).count();

    let all_cfg = trialgate::load_config(&root.join("mappings"), &root.join("config/trials"), &[]).expect("the seed trials load");
    let (five_wall, five_cpu) = screen(&data, &all_cfg, &dir.join("five-trials.csv"));

    let (wall, cpu) = (median(walls), median(cpus));
    // Memory growth: one screening at N and at N/4, each in a fresh process.
    let growth = (env_or("BENCH_GROWTH", 1) != 0 && n >= 8).then(|| {
        let small_n = n / 4;
        let small = std::env::var("BENCH_SMALL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| cohort(cached(&root, small_n, seed).join("data"), &bench, small_n, seed));
        let patients = |d: &Path| {
            std::fs::read_to_string(d.join("Patient.ndjson"))
                .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
                .unwrap_or(0)
        };
        let (big_kb, small_kb) = (child_peak_kb(&data)?, child_peak_kb(&small)?);
        let (big_p, small_p) = (patients(&data), patients(&small));
        Ok::<_, String>((small_p, small_kb, big_p, big_kb))
    });
    let mb = bytes as f64 / 1e6;
    println!("BENCH-LN  N = {n}  seed {seed}  {mb:.0} MB of NDJSON  {runs} run(s), median");
    println!(
        "  trialgate   {wall:7.2} s wall  {cpu:6.2} CPU-s  {:8.0} patients/s  {:6.0} MB/s  peak RSS {peak_mb:.0} MB",
        n as f64 / wall,
        mb / wall
    );
    println!(
        "  five seed trials together  {five_wall:6.2} s wall  {five_cpu:6.2} CPU-s  ({:.2}x BENCH-LN alone in wall time, {:.2}x in CPU time; target at most 2x)",
        five_wall / wall,
        five_cpu / cpu
    );
    match growth {
        Some(Ok((sp, skb, bp, bkb))) => println!(
            "  memory: one screening peaks at {:.0} MB for {bp} patients, {:.0} MB for {sp}: {:.2} KB more per added patient (target under 1 KB; peak under 100 MB)",
            bkb as f64 / 1024.0,
            skb as f64 / 1024.0,
            (bkb as f64 - skb as f64) / (bp as f64 - sp as f64)
        ),
        Some(Err(e)) => println!("  memory growth not measured: {e}"),
        None => {}
    }
    println!("  peer_python {python_wall:7.2} s wall (includes its interpreter start)");
    match duckdb_wall {
        Ok(d) => println!("  peer_duckdb {d:7.2} s wall (target: trialgate at most a quarter of this)"),
        Err(e) => println!(
            "  peer_duckdb not run: {} (install ../shared/bench/requirements-duckdb.txt in a venv, set BENCH_PYTHON to its python)",
            e.lines().last().unwrap_or_default()
        ),
    }
    println!(
        "  agreement with the reference: {} of {} patients{}",
        reference.len() - disagree,
        reference.len(),
        if disagree == 0 { " (all)" } else { "  <-- DISAGREES" }
    );
    if disagree > 0 || ours.len() != reference.len() {
        std::process::exit(1);
    }
}
