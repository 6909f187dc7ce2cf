//! Plugin benchmark (not a test): prints the stripped binary size, the cold start of
//! `aws-cni` (exec of VERSION), and ADD / DEL latency p50 / p99 with 1 and 16 pods in
//! flight against a daemon that answers at once, for IPv4 pods and then IPv6 pods (an
//! ENABLE_IPv6 node's /128s). Real namespaces, real veths.
//!
//! cargo build --release -p aws-cni && cargo run --release -p vpc-cni-tests --bin bench-plugin

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vpc_cni_tests::fake_ipamd::FakeIpamd;
use vpc_cni_tests::netns::{Node, TestNs, sh};
use vpc_cni_tests::plugin::{Invocation, netconf, plugin_bin, run};
use vpc_cni_tests::require_root;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn exec_times(bin: &str, n: usize, args: &[(&str, &str)]) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut cmd = std::process::Command::new(bin);
        cmd.env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        for (k, val) in args {
            cmd.env(k, val);
        }
        let t = Instant::now();
        let st = cmd.status().expect("exec");
        v.push(t.elapsed());
        assert!(st.success());
    }
    v.sort();
    v
}

fn main() {
    require_root();
    let bin = plugin_bin(true);
    let size = std::fs::metadata(&bin).unwrap().len();
    println!(
        "aws-cni release binary (stripped): {:.2} MB",
        size as f64 / 1e6
    );

    let bin_s = bin.display().to_string();
    let _ = exec_times(&bin_s, 20, &[("CNI_COMMAND", "VERSION")]);
    let v = exec_times(&bin_s, 500, &[("CNI_COMMAND", "VERSION")]);
    let t = exec_times("/bin/true", 500, &[]);
    println!(
        "VERSION exec (cold start): median {}, p99 {} (n=500); /bin/true median {}",
        ms(pct(&v, 0.5)),
        ms(pct(&v, 0.99)),
        ms(pct(&t, 0.5))
    );

    let node = Node::new("192.168.0.10");
    let pool: Vec<(IpAddr, i32)> = (0..4000u32)
        .map(|i| {
            (
                Ipv4Addr::from(0x0a00_0000 + 0x0100 + i).into(),
                (i % 3) as i32,
            )
        })
        .collect();
    rounds(&bin, &node, "IPv4", pool);
    let base = u128::from("2600:1f14:0:100:1::".parse::<Ipv6Addr>().unwrap());
    let pool6: Vec<(IpAddr, i32)> = (1..4000u128)
        .map(|i| (Ipv6Addr::from(base + i).into(), 0))
        .collect();
    rounds(&bin, &node, "IPv6", pool6);
}

/// ADD then DEL of 100 pods one at a time and 160 pods 16 at a time, from `pool`.
fn rounds(bin: &PathBuf, node: &Node, family: &str, pool: Vec<(IpAddr, i32)>) {
    println!("{family} pods:");
    let ipamd = FakeIpamd::start(pool);
    ipamd.state.lock().unwrap().record = false;
    let log = ipamd.dir.join("plugin.log").display().to_string();
    // Info, as a production node would log; Debug adds one line per invocation.
    let conf = netconf(
        "1.0.0",
        &ipamd.socket_str(),
        &log,
        &[("pluginLogLevel", "Info".into())],
    );

    for (concurrency, pods) in [(1usize, 100usize), (16, 160)] {
        let netns: Vec<TestNs> = (0..pods).map(|_| TestNs::new("bpod")).collect();
        let invs: Vec<Invocation> = netns
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                Invocation::new(
                    "ADD",
                    &format!("bench-{concurrency}-{i}"),
                    &ns.path(),
                    "bench",
                    &format!("pod-{concurrency}-{i}"),
                )
            })
            .collect();
        let mut report = Vec::new();
        for verb in ["ADD", "DEL"] {
            let next = AtomicUsize::new(0);
            let lat = Mutex::new(Vec::with_capacity(pods));
            let failures = AtomicUsize::new(0);
            let wall = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..concurrency {
                    s.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= pods {
                                break;
                            }
                            let inv = invs[i].with_command(verb);
                            let t = Instant::now();
                            let out = run(bin, Some(&node.ns.path()), &inv, &conf);
                            let d = t.elapsed();
                            if !out.success {
                                failures.fetch_add(1, Ordering::Relaxed);
                                eprintln!("{verb} failed: {}", out.stdout);
                            }
                            lat.lock().unwrap().push(d);
                        }
                    });
                }
            });
            let wall = wall.elapsed();
            let mut l = lat.into_inner().unwrap();
            l.sort();
            report.push(format!(
                "{verb} {concurrency:>2} in flight: p50 {}, p99 {} (n={pods}, {:.0}/s, {} failed)",
                ms(pct(&l, 0.5)),
                ms(pct(&l, 0.99)),
                pods as f64 / wall.as_secs_f64(),
                failures.load(Ordering::Relaxed)
            ));
        }
        let links = || {
            sh(&[
                "ip",
                "netns",
                "exec",
                &node.ns.name,
                "ip",
                "-o",
                "link",
                "show",
            ])
        };
        let up = links()
            .lines()
            .filter(|l| l.contains(": eni") && l.contains(",UP"))
            .count();
        assert_eq!(up, 0, "DEL left host veths up");
        // DEL leaves each pair, down, to the removal of the pod's namespace (as a
        // runtime removes it right after DEL): what that removal costs, and how long
        // until the kernel's clean-up has taken every pair.
        let t = Instant::now();
        drop(netns);
        let removed = t.elapsed();
        while links().contains(": eni") {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "veths outlived their netns"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        report.push(format!(
            "   then `ip netns del` of the {pods} namespaces: {:.1} ms each; every veth pair gone {:.0} ms after the first",
            removed.as_secs_f64() * 1e3 / pods as f64,
            t.elapsed().as_secs_f64() * 1e3
        ));
        for r in report {
            println!("{r}");
        }
        // The kernel's clean-up of the namespaces goes on in the background for a while
        // after their veths are gone: let it finish before the next round's figures.
        std::thread::sleep(Duration::from_secs(3));
    }
}
