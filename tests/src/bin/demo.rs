//! The README's main command: the emulated VPC lab with two nodes. Each node runs the
//! real entrypoint (ipamd, then the conflist once ipamd is healthy) and containerd with its
//! CRI plugin; 10 pods are started through the CRI as kubelet would, get VPC addresses
//! from their node's ENIs, ping each other across the fabric and reach an internet host
//! through SNAT. Shows each node's pool, then removes everything (also on Ctrl-C).

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use vpc_cni_tests::cri::PodSpec;
use vpc_cni_tests::lab::{INTERNET_ADDR, Lab, in_fabric, in_netns, pod_netns};

fn step(s: &str) {
    println!("\x1b[1m==> {s}\x1b[0m");
}

struct Pod {
    name: String,
    node: usize,
    id: String,
    ip: Ipv4Addr,
    netns: String,
    eni: String,
    took: Duration,
}

fn arrives_from(from: &str, listen_ns: &str, to: Ipv4Addr, port: u16) -> Result<Ipv4Addr, String> {
    let l = in_netns(listen_ns, move || TcpListener::bind(("0.0.0.0", port)))
        .map_err(|e| e.to_string())?;
    l.set_nonblocking(false).map_err(|e| e.to_string())?;
    let _c = in_netns(from, move || {
        TcpStream::connect_timeout(&(to, port).into(), Duration::from_secs(5))
    })
    .map_err(|e| format!("connect {to}:{port}: {e}"))?;
    let (_, peer) = l.accept().map_err(|e| e.to_string())?;
    match peer.ip() {
        std::net::IpAddr::V4(a) => Ok(a),
        other => Err(format!("{other}")),
    }
}

fn ping(ns: &str, to: Ipv4Addr) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.trim_start_matches("/var/run/netns/")])
        .args(["ping", "-c", "3", "-i", "0.2", "-W", "2", &to.to_string()])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with("rtt"))
            .map(|l| format!("ok ({})", l.trim()))
            .unwrap_or_else(|| "ok".into()),
        Ok(o) => format!("FAILED: {}", String::from_utf8_lossy(&o.stdout).trim()),
        Err(e) => format!("FAILED: {e}"),
    }
}

async fn run(fabric: String) -> bool {
    step(
        "starting the lab: the EC2 + IMDS emulator, a VPC fabric, 2 m5.large nodes, an internet host",
    );
    println!(
        "    each node: aws-vpc-cni (installs aws-cni, starts ipamd, writes 10-aws.conflist once"
    );
    println!(
        "    ipamd is healthy) and containerd 1.6 with its CRI plugin, in the node's namespace"
    );
    let lab = Lab::start(
        &fabric,
        2,
        "m5.large",
        &[("AWS_VPC_K8S_CNI_LOGLEVEL", "INFO")],
    )
    .await;
    for n in &lab.nodes {
        println!(
            "    node{}: {} primary IP {} (namespace {})",
            n.index, n.instance, n.primary_ip, n.ns
        );
    }
    let mut ok = true;
    step("starting 10 pods through containerd's CRI (RunPodSandbox), 5 per node");
    let mut pods = Vec::new();
    for i in 0..10 {
        let node = i % 2;
        let name = format!("web-{}", i + 1);
        let cri = lab.nodes[node].cri().await;
        let t = Instant::now();
        let id = match cri.run(&PodSpec::new("default", &name)).await {
            Ok(id) => id,
            Err(e) => {
                println!("    {name}: RunPodSandbox FAILED: {}", e.message());
                ok = false;
                continue;
            }
        };
        let took = t.elapsed();
        let ip: Ipv4Addr = cri
            .ip(&id)
            .await
            .unwrap_or_default()
            .parse()
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let netns = pod_netns(ip).unwrap_or_default();
        let eni = lab
            .holder(ip)
            .await
            .map(|h| h.1)
            .unwrap_or_else(|| "?".into());
        println!("    {name} on node{}: {ip} in {took:.0?}", node + 1);
        pods.push(Pod {
            name,
            node,
            id,
            ip,
            netns,
            eni,
            took,
        });
    }
    step("the pods");
    let rows: Vec<Vec<String>> = pods
        .iter()
        .map(|p| {
            vec![
                format!("default/{}", p.name),
                format!("node{}", p.node + 1),
                p.ip.to_string(),
                p.eni.clone(),
                format!("{:.0?}", p.took),
            ]
        })
        .collect();
    print!(
        "{}",
        indent(&ipamd::cli::table(
            &["POD", "NODE", "VPC ADDRESS", "ENI (EC2)", "READY IN"],
            &rows
        ))
    );
    if pods.len() >= 2 {
        let (a, b) = (&pods[0], &pods[1]);
        step(&format!(
            "cross-node: {} (node1, {}) -> {} (node2, {})",
            a.name, a.ip, b.name, b.ip
        ));
        println!("    ping: {}", ping(&a.netns, b.ip));
        match arrives_from(&a.netns, &b.netns, b.ip, 7000) {
            Ok(src) => println!(
                "    a TCP connection arrives from {src}: {}",
                if src == a.ip {
                    "the pod's own address, no NAT"
                } else {
                    "NAT'd (unexpected)"
                }
            ),
            Err(e) => {
                println!("    TCP FAILED: {e}");
                ok = false;
            }
        }
        step(&format!(
            "internet: {} -> the internet host {INTERNET_ADDR}:8080",
            a.name
        ));
        let inet = format!("/var/run/netns/{}", lab.internet);
        match arrives_from(&a.netns, &inet, INTERNET_ADDR.parse().unwrap(), 8080) {
            Ok(src) => println!(
                "    arrives from {src}: {}",
                if src == lab.nodes[a.node].primary_ip {
                    "node1's primary IP (SNAT by AWS-SNAT-CHAIN-0)"
                } else {
                    "not the node's primary IP (unexpected)"
                }
            ),
            Err(e) => {
                println!("    FAILED: {e}");
                ok = false;
            }
        }
    }
    for n in &lab.nodes {
        step(&format!("node{}: ipamd status", n.index));
        match ipamd::cli::status(&n.introspection()) {
            Ok(t) => print!("{}", indent(&t)),
            Err(e) => println!("    {e}"),
        }
        if let Ok(b) = ipamd::cli::http_get(&n.introspection(), "/v1/ec2-budget") {
            println!(
                "    EC2 calls by this ipamd: {} {}",
                b["totalCalls"], b["calls"]
            );
        }
    }
    step("deleting the pods (StopPodSandbox, RemovePodSandbox: containerd's two DELs)");
    for p in &pods {
        let cri = lab.nodes[p.node].cri().await;
        let r = async {
            cri.stop(&p.id).await?;
            cri.remove(&p.id).await
        }
        .await;
        if let Err(e) = r {
            println!("    {}: {}", p.name, e.message());
            ok = false;
        }
    }
    for n in &lab.nodes {
        let left = ipamd::cli::http_get(&n.introspection(), "/v1/pods")
            .map(|p| p.as_array().map(Vec::len).unwrap_or(0))
            .unwrap_or(usize::MAX);
        let veths = n
            .exec(&["ip", "-o", "link", "show"])
            .lines()
            .filter(|l| l.contains(": eni"))
            .count();
        println!(
            "    node{}: {left} assignments left in ipamd, {veths} pod veths left",
            n.index
        );
        ok &= left == 0 && veths == 0;
    }
    step("stopping containerd, ipamd, the emulator; removing the namespaces");
    lab.shutdown().await;
    ok
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn main() {
    vpc_cni_tests::require_root();
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = ok.clone();
    in_fabric(async move |fabric| {
        tokio::select! {
            r = run(fabric) => done.store(r, std::sync::atomic::Ordering::Relaxed),
            _ = tokio::signal::ctrl_c() => {
                println!("\ninterrupted: removing everything the demo made");
            }
        }
    });
    if ok.load(std::sync::atomic::Ordering::Relaxed) {
        step("done: nothing left behind");
    } else {
        std::process::exit(1);
    }
}
