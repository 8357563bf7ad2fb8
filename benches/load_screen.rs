//! Load on `trialgate serve` from a second process on 127.0.0.1: starts the release binary,
//! posts a 100-resource patient Bundle (fixture patient 01 padded with Observations) against
//! all five trials at a fixed rate, then as fast as it answers, and prints throughput, p50/p99
//! latency, errors and the server's memory before and after. Printed, never asserted.
//!
//!     cargo bench --bench load_screen                 # 200 requests/s for 10 s, then 5 s flat out
//!     LOAD_RATE=400 LOAD_SECONDS=600 cargo bench --bench load_screen

use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn body() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("fixtures/bundles/01-meilin-zhou.json")).expect("the fixture");
    let mut b: Value = serde_json::from_str(&text).expect("the fixture is JSON");
    let entries = b["entry"].as_array_mut().expect("a Bundle");
    let mut n = 0;
    while entries.len() < 100 {
        entries.push(
            json!({"resource": {"resourceType": "Observation", "id": format!("pad-{n}"), "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": "Patient/meilin-zhou"}, "effectiveDateTime": "2026-05-01T08:00:00Z",
            "valueQuantity": {"value": 12.5, "unit": "g/dL"}}}),
        );
        n += 1;
    }
    b.to_string()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn phase(name: &str, url: &str, body: &str, rate: Option<u32>, seconds: u64, pid: u32) {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    let workers = 16;
    match rate {
        Some(rate) => {
            let every = Duration::from_secs_f64(1.0 / f64::from(rate));
            while Instant::now() < deadline {
                let due = started + every.mul_f64(sent as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
                let (http, url, body) = (http.clone(), url.to_string(), body.to_string());
                tasks.spawn(async move { one(&http, &url, body).await });
                sent += 1;
            }
        }
        None => {
            for _ in 0..workers {
                let (http, url, body) = (http.clone(), url.to_string(), body.to_string());
                tasks.spawn(async move {
                    let mut all = Vec::new();
                    while Instant::now() < deadline {
                        all.extend(one(&http, &url, body.clone()).await);
                    }
                    all
                });
            }
        }
    }
    let mut lat = Vec::new();
    let mut errors = 0u64;
    while let Some(r) = tasks.join_next().await {
        let Ok(r) = r else { continue };
        for (ok, ms) in r {
            if ok {
                lat.push(ms);
            } else {
                errors += 1;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    println!(
        "  {name:<22} {:7.0} req/s  p50 {:6.2} ms  p99 {:6.2} ms  {} ok, {errors} errors  server RSS {} MB",
        lat.len() as f64 / secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len(),
        rss_kb(pid) / 1024
    );
}

async fn one(http: &reqwest::Client, url: &str, body: String) -> Vec<(bool, f64)> {
    let t = Instant::now();
    let ok = match http.post(url).bearer_auth("load").body(body).send().await {
        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
        Err(_) => false,
    };
    vec![(ok, t.elapsed().as_secs_f64() * 1000.0)]
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("load_screen: run it with `cargo bench --bench load_screen`");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_trialgate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TRIALGATE_API_TOKENS", "load")
        .env_remove("RUST_LOG")
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("trialgate serve starts");
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if reqwest::get(format!("{base}/health")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("{base}/screen?as_of=2026-06-01");
    let body = body();
    let (rate, seconds): (u32, u64) = (env_or("LOAD_RATE", 200), env_or("LOAD_SECONDS", 10));
    println!(
        "POST /screen, a 100-resource Bundle against all five trials; server RSS at start {} MB",
        rss_kb(server.id()) / 1024
    );
    phase("warm-up", &url, &body, Some(50), 1, server.id()).await;
    phase(
        &format!("{rate} req/s for {seconds} s"),
        &url,
        &body,
        Some(rate),
        seconds,
        server.id(),
    )
    .await;
    phase("flat out, 16 clients", &url, &body, None, 5, server.id()).await;
    let _ = server.kill();
    let _ = server.wait();
}
