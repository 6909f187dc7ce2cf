//! `egress-cni` chained after `aws-cni` on an IPv6 pod, as the conflist of an ENABLE_IPv6
//! node runs them: the pod reaches an IPv4 host through `v4if0`, arriving from the node's
//! primary IPv4; DEL (twice, as containerd does) leaves nothing. Real namespaces, veths
//! and iptables, all inside the test's namespaces. Needs root.

use serde_json::{Value, json};
use vpc_cni_tests::netns::{TestNs, sh};
use vpc_cni_tests::plugin::{Invocation, World, egress_bin, run};

const POD6: &str = "2600:1f14:0:100:1::9";
const NODE_IP: &str = "192.168.0.10";
const INET: &str = "192.168.0.1";

struct Egress {
    w: World,
    inet: TestNs,
    data_dir: String,
}

fn setup() -> Egress {
    let w = World::new(vec![(POD6.parse::<std::net::Ipv6Addr>().unwrap(), 0)]);
    // An IPv4 "internet" host behind the node's eth0, which knows only the node's subnet.
    let inet = TestNs::new("inet4");
    sh(&[
        "ip",
        "-n",
        &w.node.ns.name,
        "link",
        "set",
        "eth0-peer",
        "netns",
        &inet.name,
    ]);
    inet.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{INET}/24"),
        "dev",
        "eth0-peer",
    ]);
    inet.exec(&["ip", "link", "set", "eth0-peer", "up"]);
    w.node
        .ns
        .exec(&["ip", "route", "add", "default", "via", INET]);
    // Count what arrives from the node's address.
    inet.exec(&[
        "iptables", "-A", "INPUT", "-s", NODE_IP, "-p", "icmp", "-j", "ACCEPT",
    ]);
    let data_dir = format!("{}/egress-ipam", w.ipamd.dir.display());
    Egress { w, inet, data_dir }
}

impl Egress {
    fn egress_conf(&self, prev: &Value) -> String {
        json!({
            "cniVersion": "1.0.0",
            "name": "aws-cni",
            "type": "egress-cni",
            "enabled": "true",
            "nodeIP": NODE_IP,
            "randomizeSNAT": "prng",
            "mtu": "9001",
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "169.254.172.0/22"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.data_dir,
            },
            "pluginLogFile": self.w.log,
            "pluginLogLevel": "Debug",
            "prevResult": prev,
        })
        .to_string()
    }

    fn egress(&self, inv: &Invocation, prev: &Value) -> vpc_cni_tests::plugin::Output {
        run(
            &egress_bin(),
            Some(&self.w.node.ns.path()),
            inv,
            &self.egress_conf(prev),
        )
    }

    fn arrived_from_node(&self) -> u64 {
        let out = self
            .inet
            .exec(&["iptables", "-L", "INPUT", "-v", "-n", "-x"]);
        out.lines()
            .find(|l| l.contains(NODE_IP))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    fn nat(&self) -> String {
        self.w.node.ns.exec(&["iptables", "-t", "nat", "-S"])
    }
}

#[test]
fn an_ipv6_pod_reaches_ipv4_hosts_from_the_nodes_address_and_del_leaves_nothing() {
    let e = setup();
    let pod = TestNs::new("pod6e");
    let inv = Invocation::new("ADD", "c-egress-1", &pod.path(), "default", "web");
    let first = e.w.run(&inv, &e.w.conf("1.0.0", &[]));
    assert!(first.success, "aws-cni ADD: {}", first.stdout);
    let out = e.egress(&inv, &first.json);
    assert!(out.success, "egress-cni ADD: {} {}", out.stdout, out.stderr);
    // The pod's IPs are aws-cni's alone; egress-cni adds its two interfaces.
    assert_eq!(out.json["ips"], first.json["ips"]);
    let ifs = out.json["interfaces"].as_array().unwrap();
    assert_eq!(
        ifs.len(),
        first.json["interfaces"].as_array().unwrap().len() + 2
    );
    assert_eq!(ifs.last().unwrap()["name"], "v4if0");

    let addr = pod.exec(&["ip", "-4", "-o", "addr", "show", "dev", "v4if0"]);
    assert!(addr.contains("inet 169.254.172."), "{addr}");
    let routes = pod.exec(&["ip", "-4", "route", "show"]);
    assert!(
        routes.contains("default via 169.254.172.1 dev v4if0"),
        "{routes}"
    );
    assert!(e.nat().contains("-j CNI-E4-"), "{}", e.nat());

    let before = e.arrived_from_node();
    assert!(
        pod.try_exec(&["ping", "-4", "-c2", "-W2", INET]),
        "pod -> IPv4 host through the egress path\n{}",
        e.nat()
    );
    assert!(
        e.arrived_from_node() >= before + 2,
        "the packets did not arrive from {NODE_IP}"
    );
    // The pod's IPv6 stays on eth0, untouched.
    let v6 = pod.exec(&["ip", "-6", "addr", "show", "dev", "eth0"]);
    assert!(v6.contains(POD6), "{v6}");

    // CHECK passes on what ADD built.
    let check = e.egress(&inv.with_command("CHECK"), &out.json);
    assert!(check.success, "CHECK: {}", check.stdout);

    // DEL in libcni's order (the chain reversed), twice.
    for _ in 0..2 {
        let d = e.egress(&inv.with_command("DEL"), &out.json);
        assert!(d.success, "egress-cni DEL: {}", d.stdout);
        let mut conf: Value = serde_json::from_str(&e.w.conf("1.0.0", &[])).unwrap();
        conf["prevResult"] = out.json.clone();
        let d = e.w.run(&inv.with_command("DEL"), &conf.to_string());
        assert!(d.success, "aws-cni DEL: {}", d.stdout);
    }
    assert!(!e.nat().contains("CNI-E4-"), "{}", e.nat());
    let links = e.w.node.ns.exec(&["ip", "-o", "link", "show"]);
    assert!(!links.contains(": egv"), "{links}");
    let held: Vec<_> = std::fs::read_dir(format!("{}/aws-cni", e.data_dir))
        .unwrap()
        .filter_map(|d| d.ok())
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("169.254."))
        .collect();
    assert!(held.is_empty(), "{held:?}");
    e.w.assert_node_clean();
}

#[test]
fn a_second_add_of_one_sandbox_keeps_its_address_and_one_snat_jump() {
    let e = setup();
    let pod = TestNs::new("pod6e");
    let inv = Invocation::new("ADD", "c-egress-2", &pod.path(), "default", "again");
    let first = e.w.run(&inv, &e.w.conf("1.0.0", &[]));
    assert!(first.success);
    let a = e.egress(&inv, &first.json);
    assert!(a.success, "{}", a.stdout);
    let addr1 = pod.exec(&["ip", "-4", "-o", "addr", "show", "dev", "v4if0"]);
    // The runtime retries ADD (the same sandbox): our pair is rebuilt, nothing doubles.
    let b = e.egress(&inv, &first.json);
    assert!(b.success, "{}", b.stdout);
    let addr2 = pod.exec(&["ip", "-4", "-o", "addr", "show", "dev", "v4if0"]);
    let ip = |s: &str| s.split_whitespace().nth(3).unwrap_or_default().to_string();
    assert_eq!(ip(&addr1), ip(&addr2));
    let jumps = e
        .nat()
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING") && l.contains("CNI-E4-"))
        .count();
    assert_eq!(jumps, 1, "{}", e.nat());
    assert!(pod.try_exec(&["ping", "-4", "-c1", "-W2", INET]));
}

#[test]
fn disabled_passes_the_result_through_and_a_missing_prev_result_is_refused() {
    let e = setup();
    let pod = TestNs::new("pod6e");
    let inv = Invocation::new("ADD", "c-egress-3", &pod.path(), "default", "off");
    let first = e.w.run(&inv, &e.w.conf("1.0.0", &[]));
    let mut conf: Value = serde_json::from_str(&e.egress_conf(&first.json)).unwrap();
    conf["enabled"] = "false".into();
    let off = run(
        &egress_bin(),
        Some(&e.w.node.ns.path()),
        &inv,
        &conf.to_string(),
    );
    assert!(off.success, "{}", off.stdout);
    assert_eq!(off.json["interfaces"], first.json["interfaces"]);
    assert!(!pod.try_exec(&["ip", "link", "show", "v4if0"]));
    conf["enabled"] = "true".into();
    conf.as_object_mut().unwrap().remove("prevResult");
    let bad = run(
        &egress_bin(),
        Some(&e.w.node.ns.path()),
        &inv,
        &conf.to_string(),
    );
    assert!(!bad.success);
    assert!(bad.stdout.contains("prevResult"), "{}", bad.stdout);
}
