//! ipamd benchmark (not a test), against the emulator process:
//! AddNetwork latency from a warm pool over the socket, Add+Del pairs per second with
//! the checkpoint durable, RSS with 250 assignments, start-up to serving from a
//! checkpoint of 250 assignments, and EC2 calls spent bringing a fresh m5.large to its
//! targets and through a churn of 500 pods.
//!
//! cargo bench -p ipamd --bench ipamd

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use ec2_emulator_sdk_check::Emulator;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// (VmRSS, RssAnon, RssFile) in kB.
fn rss_kb(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

fn main() {
    // ipamd sets up host networking: give it a namespace of its own.
    in_node_ns("ipamd-bench", bench)
}

async fn bench() {
    // /var/run is tmpfs on a node; /dev/shm is the same kind of filesystem here.
    let store_dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let store = store_dir.path().join("ipam.json");
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "c5.18xlarge"]).remove(0);
    let mut d = Ipamd::start(
        &emu,
        &[
            ("AWS_VPC_K8S_CNI_BACKING_STORE", store.to_str().unwrap()),
            ("MINIMUM_IP_TARGET", "300"),
            ("WARM_IP_TARGET", "50"),
            ("AWS_VPC_K8S_CNI_LOGLEVEL", "WARN"),
        ],
    );
    let c = d.client().await;
    let warm = eventually(Duration::from_secs(120), true, async || {
        counts(&emu, &id).await.1 >= 300
    })
    .await;
    assert!(warm, "pool did not warm");

    // 0. The transport alone: a health Check over the same socket.
    let mut base = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        assert!(c.healthy().await);
        base.push(t.elapsed());
    }
    println!(
        "gRPC round trip over the socket (health Check, no datastore): p50 {} us, p99 {} us",
        pct(&mut base, 0.5).as_micros(),
        pct(&mut base, 0.99).as_micros()
    );

    // 1. AddNetwork latency from a warm pool, one at a time (three rounds: the spread is
    // this VM's scheduling noise).
    for round in 0..3 {
        let mut lat = Vec::new();
        for i in 0..1000 {
            let k = format!("lat{round}-{i}");
            let t = Instant::now();
            let r = c.add(&k).await.unwrap();
            lat.push(t.elapsed());
            assert!(r.success);
            c.del(&k).await.unwrap();
        }
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        println!(
            "AddNetwork from a warm pool over the socket, round {}: p50 {} us, p99 {} us (n=1000, sequential)",
            round + 1,
            p50.as_micros(),
            p99.as_micros()
        );
    }

    // 2. Add+Del pairs per second, 16 clients, every change durable (journal + fdatasync).
    let pairs = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (c, pairs) = (c.clone(), pairs.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < until {
                let k = format!("pair{w}-{i}");
                assert!(c.add(&k).await.unwrap().success);
                c.del(&k).await.unwrap();
                pairs.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "Add+Del pairs per second, checkpoint durable, 16 clients: {:.0}",
        pairs.load(Ordering::Relaxed) as f64 / 3.0
    );

    // 3. RSS with 250 assignments.
    for i in 0..250 {
        assert!(c.add(&format!("pod{i}")).await.unwrap().success);
    }
    let pid = d.child.as_ref().unwrap().id();
    let (rss, anon, file) = rss_kb(pid);
    println!(
        "ipamd RSS with 250 assignments: {:.1} MB (heap and stacks {:.1}, binary and libraries {:.1})",
        rss as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );

    // 4. Start-up to serving from a checkpoint of 250 assignments.
    d.terminate();
    let t = Instant::now();
    d.spawn();
    let c2 = connect(&d.socket(), Duration::from_secs(20)).await.unwrap();
    let startup = t.elapsed();
    let r = c2.add("pod7").await.unwrap();
    assert!(r.success);
    println!(
        "start-up to serving from a checkpoint of 250 assignments: {} ms (exec to first healthy answer)",
        startup.as_millis()
    );
    // Its ENI hotplug too: two in one namespace would fight over eth0.
    drop(d);

    // 5. EC2 calls: a fresh m5.large to its targets, then a churn of 500 pods.
    let emu2 = Emulator::start();
    let id2 = emu2.seed(&["--type", "m5.large"]).remove(0);
    // Upstream's pacing: an ENI is freed only when 60 s old, shrinking at most every 30 s.
    let d2 = Ipamd::start(
        &emu2,
        &[
            ("IPAMD_RECONCILE_INTERVAL_MS", "60000"),
            ("IPAMD_SHRINK_INTERVAL_MS", "30000"),
            ("IPAMD_ENI_MIN_AGE_MS", "60000"),
            ("AWS_VPC_K8S_CNI_LOGLEVEL", "WARN"),
        ],
    );
    let c3 = d2.client().await;
    eventually(Duration::from_secs(30), (1, 9), async || {
        counts(&emu2, &id2).await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ipamd's own count (its EC2 budget, over introspection): the emulator's count also
    // has the ENI hotplug's and this benchmark's describes.
    let spent = |b: &serde_json::Value| {
        (
            b["totalCalls"].as_u64().unwrap_or(0),
            b["calls"].to_string(),
        )
    };
    let budget = || ipamd::cli::http_get("127.0.0.1:61679", "/v1/ec2-budget").unwrap();
    let (n, detail) = spent(&budget());
    println!(
        "EC2 calls by ipamd, fresh m5.large to WARM_ENI_TARGET=1 (1 ENI, 9 IPs): {n} {detail}"
    );
    let before = n;
    for round in 0..50 {
        let mut ts = Vec::new();
        for p in 0..10 {
            let c = c3.clone();
            ts.push(tokio::spawn(async move {
                c.add(&format!("churn{round}-{p}")).await.unwrap().success
            }));
        }
        for t in ts {
            assert!(t.await.unwrap());
        }
        for p in 0..10 {
            c3.del(&format!("churn{round}-{p}")).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (n, detail) = spent(&budget());
    println!(
        "EC2 calls by ipamd through a churn of 500 pods (50 x 10 up and down, upstream pacing, no cooldown): {} (totals since start: {detail})",
        n - before
    );
}
