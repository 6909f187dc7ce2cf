//! Pod-sandbox-ready latency through containerd on a lab node, with our plugin (pod
//! network: containerd -> aws-cni -> ipamd) and without (hostNetwork sandboxes: no CNI
//! call): the difference is our cost. 50 sandboxes each, one after the other (each is
//! removed before the next, so the pool stays warm), then the node's ipamd RSS.
//!
//! Run as root after `cargo build --workspace --bins`:
//!   cargo run -p vpc-cni-tests --bin bench-e2e

use std::time::{Duration, Instant};

use vpc_cni_tests::cri::{Cri, PodSpec};
use vpc_cni_tests::lab::{Lab, in_fabric};

const N: usize = 50;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// (RunPodSandbox latencies, Stop+Remove latencies) of `n` sandboxes in a row.
async fn series(
    cri: &Cri,
    host_network: bool,
    n: usize,
    tag: &str,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut run, mut del) = (Vec::new(), Vec::new());
    for i in 0..n {
        let mut pod = PodSpec::new("bench", &format!("{tag}{i}"));
        pod.host_network = host_network;
        let t = Instant::now();
        let id = cri.run(&pod).await.expect("RunPodSandbox");
        run.push(t.elapsed());
        let t = Instant::now();
        cri.stop(&id).await.expect("StopPodSandbox");
        cri.remove(&id).await.expect("RemovePodSandbox");
        del.push(t.elapsed());
    }
    (run, del)
}

fn rss_mb(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn main() {
    vpc_cni_tests::require_root();
    in_fabric(async |fabric| {
        let lab = Lab::start(
            &fabric,
            1,
            "m5.large",
            &[("AWS_VPC_K8S_CNI_LOGLEVEL", "INFO")],
        )
        .await;
        let cri = lab.nodes[0].cri().await;
        // Warm-up: the sandbox image's first unpack, the pool's first addresses.
        series(&cri, false, 3, "warm").await;
        series(&cri, true, 3, "hwarm").await;
        let (mut pod_run, mut pod_del) = series(&cri, false, N, "pod").await;
        let (mut host_run, mut host_del) = series(&cri, true, N, "host").await;
        let pid = lab.nodes[0].ipamd_pid().expect("ipamd pid");
        println!(
            "sandbox ready (RunPodSandbox) through containerd 1.6, {N} sandboxes each, one at a time:"
        );
        let (p50, p99) = (pct(&mut pod_run, 0.5), pct(&mut pod_run, 0.99));
        let (h50, h99) = (pct(&mut host_run, 0.5), pct(&mut host_run, 0.99));
        println!(
            "  pod network (aws-cni + ipamd): p50 {}  p99 {}",
            ms(p50),
            ms(p99)
        );
        println!(
            "  host network (no CNI call):    p50 {}  p99 {}",
            ms(h50),
            ms(h99)
        );
        println!(
            "  our cost: p50 {}  p99 {}",
            ms(p50.saturating_sub(h50)),
            ms(p99.saturating_sub(h99))
        );
        let (d50, d99) = (pct(&mut pod_del, 0.5), pct(&mut pod_del, 0.99));
        let (hd50, hd99) = (pct(&mut host_del, 0.5), pct(&mut host_del, 0.99));
        println!(
            "StopPodSandbox + RemovePodSandbox (two DELs): pod network p50 {} p99 {}; host network p50 {} p99 {}",
            ms(d50),
            ms(d99),
            ms(hd50),
            ms(hd99)
        );
        println!(
            "ipamd RSS after {} sandboxes: {:.1} MB",
            2 * N + 6,
            rss_mb(pid)
        );
        lab.shutdown().await;
    });
}
