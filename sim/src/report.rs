//! A run's report: pod created -> address served, EC2 calls per action and node,
//! throttles, the buckets over time, and a picture of it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::model::{Call, FAMILIES};
use crate::scenario::Scenario;
use crate::{Impl, PodLog, Run};

/// Samples per run for the picture and the bucket depletion.
const SAMPLES: usize = 240;

/// One sample: (ms, tokens per family as a fraction of its burst).
pub type Sample = (u64, Vec<f64>);

pub async fn sample(run: Arc<Run>, sc: Arc<Scenario>, end: Instant) -> Vec<Sample> {
    let step = sc.secs(sc.duration_s) / SAMPLES as u32;
    let step = step.max(Duration::from_millis(1));
    let mut out = Vec::new();
    loop {
        let now = Instant::now();
        let toks = run.account.lock().unwrap().tokens();
        out.push((
            now.saturating_duration_since(run.start).as_millis() as u64,
            toks.iter().map(|(_, t, b)| t / b).collect(),
        ));
        if now + step > end {
            return out;
        }
        tokio::time::sleep(step).await;
    }
}

pub struct Outcome {
    pub which: Impl,
    pub nodes: u32,
    pub duration_ms: u64,
    pub add_wait_ms: u64,
    pub pods: PodLog,
    pub log: Vec<Call>,
    pub samples: Vec<Sample>,
    pub enis_left: usize,
    pub addresses_left: usize,
    pub wall: Duration,
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

impl Outcome {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        which: Impl,
        sc: &Scenario,
        mut pods: PodLog,
        log: Vec<Call>,
        samples: Vec<Sample>,
        enis_left: usize,
        addresses_left: usize,
        wall: Duration,
    ) -> Outcome {
        pods.served_ms.sort_unstable();
        let add_wait_ms = sc
            .knobs
            .get("ADD_NETWORK_WAIT_MS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000u64);
        Outcome {
            which,
            nodes: sc.nodes,
            duration_ms: sc.secs(sc.duration_s).as_millis() as u64,
            add_wait_ms: (add_wait_ms as f64 * sc.time_scale) as u64,
            pods,
            log,
            samples,
            enis_left,
            addresses_left,
            wall,
        }
    }

    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        crate::counts(&self.log)
    }

    pub fn throttled(&self) -> u64 {
        self.log
            .iter()
            .filter(|c| c.status == "RequestLimitExceeded")
            .count() as u64
    }

    pub fn waited_long(&self) -> u64 {
        self.pods
            .served_ms
            .iter()
            .filter(|m| **m > self.add_wait_ms)
            .count() as u64
            + self.pods.unserved
    }

    /// Lowest tokens of each family over the run, as a fraction of its burst.
    pub fn lowest_tokens(&self) -> Vec<(&'static str, f64)> {
        FAMILIES
            .iter()
            .enumerate()
            .map(|(i, f)| {
                (
                    *f,
                    self.samples
                        .iter()
                        .map(|(_, t)| t[i])
                        .fold(1.0f64, f64::min),
                )
            })
            .collect()
    }

    pub fn json(&self) -> Value {
        let s = &self.pods.served_ms;
        json!({
            "implementation": self.which.name(),
            "nodes": self.nodes,
            "pods": {
                "served": s.len(),
                "unserved": self.pods.unserved,
                "p50Ms": pct(s, 0.5),
                "p99Ms": pct(s, 0.99),
                "maxMs": s.last().copied().unwrap_or(0),
                "waitedLongerThanAddNetworkWait": self.waited_long(),
                "failedAddNetwork": self.pods.failed_adds,
                "nodesNotLaunched": self.pods.nodes_not_launched,
            },
            "ec2": {
                "calls": self.calls(),
                "total": self.log.len(),
                "perNode": self.log.len() as f64 / self.nodes as f64,
                "throttled": self.throttled(),
                "lowestTokens": self.lowest_tokens().into_iter().collect::<BTreeMap<_, _>>(),
            },
            "left": {"enis": self.enis_left, "addresses": self.addresses_left},
            "wallSeconds": self.wall.as_secs_f64(),
        })
    }

    pub fn text(&self) -> String {
        let s = &self.pods.served_ms;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{}: pods served {} (unserved {}), created -> served p50 {} ms, p99 {} ms, max {} ms; waited > {} ms: {}; failed AddNetwork {}",
            self.which.name(),
            s.len(),
            self.pods.unserved,
            pct(s, 0.5),
            pct(s, 0.99),
            s.last().copied().unwrap_or(0),
            self.add_wait_ms,
            self.waited_long(),
            self.pods.failed_adds,
        );
        if self.pods.nodes_not_launched > 0 {
            let _ = writeln!(
                o,
                "  nodes that could not launch (their subnet full): {}",
                self.pods.nodes_not_launched
            );
        }
        let _ = writeln!(
            o,
            "  EC2 calls {} ({:.2} per node), throttled {}; lowest tokens {}",
            self.log.len(),
            self.log.len() as f64 / self.nodes as f64,
            self.throttled(),
            self.lowest_tokens()
                .iter()
                .map(|(f, t)| format!("{f} {:.0} %", t * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            o,
            "  per action: {}",
            self.calls()
                .iter()
                .map(|(a, n)| format!("{a} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(o, "  simulator wall time {:.1} s", self.wall.as_secs_f64());
        o
    }

    /// Per sample interval: (calls, throttled, pods waiting at its end).
    fn series(&self) -> Vec<(f64, f64, f64)> {
        let n = SAMPLES;
        let bin = (self.duration_ms as f64 / n as f64).max(1.0);
        let mut calls = vec![0.0; n];
        let mut thr = vec![0.0; n];
        for c in &self.log {
            let i = ((c.at_ms as f64 / bin) as usize).min(n - 1);
            calls[i] += 1.0;
            if c.status == "RequestLimitExceeded" {
                thr[i] += 1.0;
            }
        }
        let mut waiting = vec![0.0; n];
        let mut w = 0i64;
        let mut it = self.pods.waiting.iter().peekable();
        let mut ev: Vec<(u64, i32)> = self.pods.waiting.clone();
        ev.sort();
        let _ = it.peek();
        let mut j = 0;
        for (i, slot) in waiting.iter_mut().enumerate() {
            let t = ((i + 1) as f64 * bin) as u64;
            while j < ev.len() && ev[j].0 <= t {
                w += ev[j].1 as i64;
                j += 1;
            }
            *slot = w as f64;
        }
        (0..n).map(|i| (calls[i], thr[i], waiting[i])).collect()
    }
}

/// Calls, throttles and waiting pods over time, one panel per implementation.
pub fn svg(title: &str, runs: &[&Outcome]) -> String {
    let (w, ph) = (900.0, 220.0);
    let h = 40.0 + ph * runs.len() as f64 + 30.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="10" y="20" font-size="14">{}</text>"#,
        esc(title)
    );
    let series: Vec<Vec<(f64, f64, f64)>> = runs.iter().map(|r| r.series()).collect();
    let max_calls = series.iter().flatten().map(|s| s.0).fold(1.0f64, f64::max);
    let max_wait = series.iter().flatten().map(|s| s.2).fold(1.0f64, f64::max);
    for (k, (r, s)) in runs.iter().zip(&series).enumerate() {
        let top = 40.0 + ph * k as f64;
        let (x0, x1, y0, y1) = (60.0, w - 60.0, top + 20.0, top + ph - 30.0);
        let _ = writeln!(
            o,
            r#"<text x="{x0}" y="{}">{} ({} EC2 calls, {} throttled, pods waiting > {} ms: {})</text>"#,
            top + 12.0,
            esc(r.which.name()),
            r.log.len(),
            r.throttled(),
            r.add_wait_ms,
            r.waited_long()
        );
        let _ = writeln!(
            o,
            r##"<rect x="{x0}" y="{y0}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
            x1 - x0,
            y1 - y0
        );
        let n = s.len() as f64;
        let pts = |f: &dyn Fn(&(f64, f64, f64)) -> f64, max: f64| -> String {
            s.iter()
                .enumerate()
                .map(|(i, v)| {
                    format!(
                        "{:.1},{:.1}",
                        x0 + (x1 - x0) * (i as f64 + 0.5) / n,
                        y1 - (y1 - y0) * f(v) / max
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            o,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
            pts(&|v| v.0, max_calls)
        );
        let _ = writeln!(
            o,
            r##"<polyline fill="none" stroke="#d62728" stroke-width="1.5" points="{}"/>"##,
            pts(&|v| v.1, max_calls)
        );
        let _ = writeln!(
            o,
            r##"<polyline fill="none" stroke="#2ca02c" stroke-width="1.5" stroke-dasharray="4 2" points="{}"/>"##,
            pts(&|v| v.2, max_wait)
        );
        let _ = writeln!(
            o,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#1f77b4">{:.0}</text><text x="{}" y="{}" fill="#2ca02c">{:.0}</text>"##,
            x0 - 4.0,
            y0 + 10.0,
            max_calls,
            x1 + 4.0,
            y0 + 10.0,
            max_wait
        );
        let _ = writeln!(
            o,
            r#"<text x="{x0}" y="{}">0</text><text x="{x1}" y="{}" text-anchor="end">{:.0} s</text>"#,
            y1 + 14.0,
            y1 + 14.0,
            r.duration_ms as f64 / 1000.0
        );
    }
    let ly = h - 12.0;
    let _ = writeln!(
        o,
        r##"<text x="60" y="{ly}"><tspan fill="#1f77b4">EC2 calls per interval</tspan>  <tspan fill="#d62728">throttled calls per interval</tspan>  <tspan fill="#2ca02c">pods waiting for an address (right scale)</tspan></text>"##
    );
    o.push_str("</svg>\n");
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
