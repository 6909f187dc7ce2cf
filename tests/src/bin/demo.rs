//! The README's main command, as far as the system exists today: a node namespace,
//! four pods given VPC addresses by the real `aws-cni` binary, a reachability check,
//! CHECK, then DEL and proof that nothing is left. ipamd is the in-repo test daemon
//! until the real one lands (issue 4); the pods, veths, routes and rules are real.

use std::net::Ipv4Addr;

use vpc_cni_tests::fake_ipamd::FakeIpamd;
use vpc_cni_tests::netns::{Node, TestNs};
use vpc_cni_tests::plugin::{Invocation, netconf, plugin_bin, run};
use vpc_cni_tests::require_root;

fn step(s: &str) {
    println!("\x1b[1m==> {s}\x1b[0m");
}

fn main() {
    require_root();
    let bin = plugin_bin(std::env::args().any(|a| a == "--release"));
    step("node namespace with eth0 = 192.168.0.10 (the node's primary ENI)");
    let node = Node::tagged("demo-node", "192.168.0.10");
    step("ipamd (test daemon): 2 addresses on the primary ENI, 2 on secondary ENI #1");
    let ipamd = FakeIpamd::start(vec![
        ("10.0.1.21".parse::<Ipv4Addr>().unwrap(), 0),
        ("10.0.2.31".parse().unwrap(), 1),
        ("10.0.1.22".parse().unwrap(), 0),
        ("10.0.2.32".parse().unwrap(), 1),
    ]);
    let log = ipamd.dir.join("plugin.log").display().to_string();
    let conf = netconf("1.0.0", &ipamd.socket_str(), &log, &[]);

    let pods = ["web-0", "web-1", "db-0", "cache-0"];
    let mut rows = Vec::new();
    let mut sandboxes = Vec::new();
    for name in pods {
        let ns = TestNs::new("demo-pod");
        let inv = Invocation::new(
            "ADD",
            &format!("sandbox-{name}"),
            &ns.path(),
            "default",
            name,
        );
        let out = run(&bin, Some(&node.ns.path()), &inv, &conf);
        if !out.success {
            eprintln!("ADD {name} failed: {}", out.stdout);
            std::process::exit(1);
        }
        let r = &out.json;
        let ip = r["ips"][0]["address"].as_str().unwrap_or("?").to_string();
        rows.push((
            name,
            ip,
            r["interfaces"][0]["name"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
            r["interfaces"][1]["mac"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
        ));
        println!("    ADD default/{name}: {}", rows.last().unwrap().1);
        sandboxes.push((ns, inv, out.json.clone()));
    }

    println!();
    println!(
        "    {:<10} {:<16} {:<16} {:<18}",
        "POD", "ADDRESS", "HOST VETH", "POD MAC"
    );
    for (n, ip, veth, mac) in &rows {
        println!("    {n:<10} {ip:<16} {veth:<16} {mac:<18}");
    }
    println!();
    println!("    node rules:");
    for l in node
        .ns
        .exec(&["ip", "rule", "show"])
        .lines()
        .filter(|l| l.starts_with("512:") || l.starts_with("1536:"))
    {
        println!("      {l}");
    }

    step("reachability (ping, no NAT)");
    let addr = |i: usize| rows[i].1.trim_end_matches("/32").to_string();
    let checks = [
        (
            0usize,
            Some(1usize),
            "pod -> pod, primary ENI -> secondary ENI",
        ),
        (2, Some(3), "pod -> pod, primary ENI -> secondary ENI"),
        (1, Some(0), "pod -> pod, secondary ENI -> primary ENI"),
        (3, None, "node -> pod"),
    ];
    let mut ok = true;
    for (from, to, what) in checks {
        let (src_ns, dst) = match to {
            Some(t) => (&sandboxes[from].0, addr(t)),
            None => (&node.ns, addr(from)),
        };
        let reached = src_ns.try_exec(&["ping", "-c", "1", "-W", "2", &dst]);
        ok &= reached;
        println!(
            "    {:<44} {dst:<12} {}",
            what,
            if reached { "ok" } else { "FAILED" }
        );
    }

    step("CHECK, then DEL every pod");
    for (ns, inv, result) in &sandboxes {
        let c = netconf(
            "1.0.0",
            &ipamd.socket_str(),
            &log,
            &[("prevResult", result.clone())],
        );
        let check = run(&bin, Some(&node.ns.path()), &inv.with_command("CHECK"), &c);
        let del = run(&bin, Some(&node.ns.path()), &inv.with_command("DEL"), &c);
        ok &= check.success && del.success;
        println!(
            "    {:<10} CHECK {}  DEL {}",
            inv.args
                .split("K8S_POD_NAME=")
                .nth(1)
                .and_then(|s| s.split(';').next())
                .unwrap_or("?"),
            if check.success { "ok" } else { "FAILED" },
            if del.success { "ok" } else { "FAILED" }
        );
        let _ = ns;
    }
    let links = node.ns.exec(&["ip", "-o", "link", "show"]);
    let rules = node.ns.exec(&["ip", "rule", "show"]);
    let clean = !links.contains(" eni") && !rules.contains("512:") && !rules.contains("1536:");
    println!(
        "    node after DEL: {}",
        if clean {
            "no pod veth, route or rule left"
        } else {
            "LEFTOVERS"
        }
    );
    println!("    plugin log: {log} (removed at exit)");
    if !(ok && clean) {
        std::process::exit(1);
    }
    step("done: namespaces removed");
}
