//! ipamd's host networking for real, inside namespaces this test creates: the full
//! iptables state (nat and mangle) for each knob combination on both iptables back ends,
//! convergence from tampered states, the node-wide and per-ENI routes and rules, and
//! traffic between a pod, the VPC and an internet host.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use ipamd::host::{Backend, LinuxHost};
use ipamd_core::config;
use ipamd_core::hostnet::{EniNet, HostNetwork, NodeNet};
use ipamd_core::net::parse_cidr;

const MAC0: &str = "02:aa:00:00:00:01";
const MAC1: &str = "02:aa:00:00:00:02";

fn node_net(knobs: &[(&str, &str)]) -> NodeNet {
    let cfg = config::from_env(|k| {
        knobs
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    NodeNet::new(
        &cfg,
        MAC0,
        "10.0.0.10".parse().unwrap(),
        &[parse_cidr("10.0.0.0/16").unwrap()],
    )
}

fn eni1() -> EniNet {
    EniNet {
        id: "eni-1".into(),
        mac: MAC1.into(),
        device_number: 1,
        primary_ip: "10.0.1.10".parse().unwrap(),
        subnet_cidr: parse_cidr("10.0.1.0/24").unwrap(),
        mtu: 9001,
    }
}

/// `iptables-save` of one table as {chain: rules in order}; counters and comments dropped.
fn saved(backend: Backend, table: &str) -> BTreeMap<String, Vec<String>> {
    let cmd = format!("{}-save", ipt_bin(backend));
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in sh(&[&cmd, "-t", table]).lines() {
        if let Some(decl) = l.strip_prefix(':') {
            out.entry(decl.split(' ').next().unwrap().to_string())
                .or_default();
        } else if let Some(rule) = l.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap();
            out.entry(chain.to_string())
                .or_default()
                .push(spec.to_string());
        }
    }
    out
}

fn expect(chains: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    chains
        .iter()
        .map(|(c, r)| (c.to_string(), r.iter().map(|s| s.to_string()).collect()))
        .collect()
}

/// kube-proxy's rules, which must never be touched.
const KUBE_NAT: &[(&str, &str)] = &[
    (
        "PREROUTING",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "POSTROUTING",
        "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    ),
];

fn ipt_bin(backend: Backend) -> &'static str {
    match backend {
        Backend::Legacy => "iptables-legacy",
        _ => "iptables-nft",
    }
}

fn add_kube_proxy(backend: Backend) {
    let ipt = ipt_bin(backend);
    for c in ["KUBE-SERVICES", "KUBE-POSTROUTING"] {
        sh(&[ipt, "-t", "nat", "-N", c]);
    }
    sh(&[ipt, "-t", "nat", "-A", "KUBE-POSTROUTING", "-j", "RETURN"]);
    for (chain, rule) in KUBE_NAT {
        let mut args = vec![ipt, "-t", "nat", "-A", chain];
        args.extend(rule.split('"').enumerate().flat_map(|(i, part)| {
            if i % 2 == 1 {
                vec![part]
            } else {
                part.split_whitespace().collect()
            }
        }));
        sh(&args);
    }
}

fn ipt_cmd(backend: Backend, args: &[&str]) {
    let mut full = vec![ipt_bin(backend)];
    full.extend_from_slice(args);
    sh(&full);
}

const DEFAULT_NAT: &[(&str, &[&str])] = &[
    (
        "PREROUTING",
        &[
            "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0",
            "-m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80",
        ],
    ),
    ("INPUT", &[]),
    ("OUTPUT", &[]),
    (
        "POSTROUTING",
        &[
            "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            "-m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0",
        ],
    ),
    ("KUBE-SERVICES", &[]),
    ("KUBE-POSTROUTING", &["-j RETURN"]),
    (
        "AWS-SNAT-CHAIN-0",
        &[
            "-d 10.0.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
            "! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.0.10 --random-fully",
        ],
    ),
    (
        "AWS-CONNMARK-CHAIN-0",
        &[
            "-d 10.0.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN, VPC CIDR\" -j RETURN",
            "-m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark 0x80/0x80",
        ],
    ),
];

const DEFAULT_MANGLE: &[(&str, &[&str])] = &[
    (
        "PREROUTING",
        &[
            "-i eth0 -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80",
            "-i eni+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80",
        ],
    ),
    ("INPUT", &[]),
    ("FORWARD", &[]),
    ("OUTPUT", &[]),
    ("POSTROUTING", &[]),
];

/// Every knob away from its default at once.
const KNOBS: &[(&str, &str)] = &[
    ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "hashrandom"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "172.16.0.0/12"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "0x40"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "veth"),
    ("AWS_VPC_CNI_NODE_PORT_SUPPORT", "false"),
    (
        "AWS_EXTERNAL_SERVICE_CIDRS",
        "100.64.0.0/16,198.51.100.0/24",
    ),
];

const KNOBS_NAT: &[(&str, &[&str])] = &[
    (
        "PREROUTING",
        &[
            "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-i veth+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0",
            "-m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask 0x40 --ctmask 0x40",
        ],
    ),
    ("INPUT", &[]),
    ("OUTPUT", &[]),
    (
        "POSTROUTING",
        &[
            "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            "-m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0",
        ],
    ),
    ("KUBE-SERVICES", &[]),
    ("KUBE-POSTROUTING", &["-j RETURN"]),
    (
        "AWS-SNAT-CHAIN-0",
        &[
            "-d 10.0.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
            "-d 172.16.0.0/12 -m comment --comment \"AWS SNAT CHAIN EXCLUSION\" -j RETURN",
            "! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.0.10 --random",
        ],
    ),
    (
        "AWS-CONNMARK-CHAIN-0",
        &[
            "-d 10.0.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN, VPC CIDR\" -j RETURN",
            "-d 172.16.0.0/12 -m comment --comment \"AWS CONNMARK CHAIN, EXCLUDED CIDR\" -j RETURN",
            "-m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark 0x40/0x40",
        ],
    ),
];

const EMPTY_MANGLE: &[(&str, &[&str])] = &[
    ("PREROUTING", &[]),
    ("INPUT", &[]),
    ("FORWARD", &[]),
    ("OUTPUT", &[]),
    ("POSTROUTING", &[]),
];

/// With external SNAT: kube-proxy's rules and nothing of ours.
const EXTERNAL_NAT: &[(&str, &[&str])] = &[
    (
        "PREROUTING",
        &["-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"],
    ),
    ("INPUT", &[]),
    ("OUTPUT", &[]),
    (
        "POSTROUTING",
        &["-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"],
    ),
    ("KUBE-SERVICES", &[]),
    ("KUBE-POSTROUTING", &["-j RETURN"]),
];

/// `ip rule` lines at the priorities ipamd manages.
fn our_rules() -> Vec<String> {
    sh(&["ip", "rule", "show"])
        .lines()
        .filter(|l| {
            ["1024:", "1535:", "32765:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn primary_link() {
    // The primary ENI: a veth whose peer stays here unused.
    sh(&[
        "ip", "link", "add", "eth0", "address", MAC0, "type", "veth", "peer", "name", "eth0p",
    ]);
    sh(&["ip", "addr", "add", "10.0.0.10/24", "dev", "eth0"]);
    sh(&["ip", "link", "set", "eth0", "up"]);
}

fn iptables_converges(backend: Backend) {
    in_node_ns("hostnet-ipt", async || {
        primary_link();
        add_kube_proxy(backend);
        let host = LinuxHost::new(backend, "eni").unwrap();
        let check = |nat: &[(&str, &[&str])], mangle: &[(&str, &[&str])], what: &str| {
            assert_eq!(saved(backend, "nat"), expect(nat), "nat after {what}");
            assert_eq!(
                saved(backend, "mangle"),
                expect(mangle),
                "mangle after {what}"
            );
        };

        // Defaults, twice: the second run changes nothing.
        let defaults = node_net(&[]);
        host.setup_node(&defaults).await.unwrap();
        check(DEFAULT_NAT, DEFAULT_MANGLE, "defaults");
        host.setup_node(&defaults).await.unwrap();
        check(DEFAULT_NAT, DEFAULT_MANGLE, "defaults again");
        assert_eq!(our_rules(), ["1024: from all fwmark 0x80/0x80 lookup main"]);
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/rp_filter")
                .unwrap()
                .trim(),
            "2"
        );
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap()
                .trim(),
            "1"
        );

        // Tampered: a rule deleted, one of ours duplicated, an old layout's chain left
        // behind and jumped to, the fwmark rule gone.
        ipt_cmd(backend, &["-t", "nat", "-D", "AWS-SNAT-CHAIN-0", "2"]);
        ipt_cmd(
            backend,
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-m",
                "comment",
                "--comment",
                "AWS SNAT CHAIN",
                "-j",
                "AWS-SNAT-CHAIN-0",
            ],
        );
        ipt_cmd(backend, &["-t", "nat", "-N", "AWS-SNAT-CHAIN-1"]);
        ipt_cmd(
            backend,
            &[
                "-t",
                "nat",
                "-A",
                "AWS-SNAT-CHAIN-0",
                "-j",
                "AWS-SNAT-CHAIN-1",
            ],
        );
        ipt_cmd(backend, &["-t", "mangle", "-D", "PREROUTING", "1"]);
        sh(&["ip", "rule", "del", "pref", "1024"]);
        host.setup_node(&defaults).await.unwrap();
        check(DEFAULT_NAT, DEFAULT_MANGLE, "tampering");
        assert_eq!(our_rules(), ["1024: from all fwmark 0x80/0x80 lookup main"]);

        // Every knob changed: the old rules go, the new ones come, kube-proxy's stay.
        let knobs = node_net(KNOBS);
        host.setup_node(&knobs).await.unwrap();
        check(KNOBS_NAT, EMPTY_MANGLE, "knob change");
        assert_eq!(
            our_rules(),
            [
                "1024: from all fwmark 0x40/0x40 lookup main",
                "1535: from all to 100.64.0.0/16 lookup main",
                "1535: from all to 198.51.100.0/24 lookup main",
            ]
        );

        // RANDOMIZESNAT=none: no randomisation flag.
        host.setup_node(&node_net(&[("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "none")]))
            .await
            .unwrap();
        let nat = saved(backend, "nat");
        assert_eq!(
            nat["AWS-SNAT-CHAIN-0"][1],
            "! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.0.10"
        );

        // External SNAT without NodePort support: our chains are removed, and the fwmark rule.
        host.setup_node(&node_net(&[
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "true"),
            ("AWS_VPC_CNI_NODE_PORT_SUPPORT", "false"),
        ]))
        .await
        .unwrap();
        check(EXTERNAL_NAT, EMPTY_MANGLE, "external SNAT");
        assert!(our_rules().is_empty(), "{:?}", our_rules());

        // A VPC CIDR added: one more RETURN in each chain.
        let mut grown = node_net(&[]);
        grown.vpc_cidrs.push(parse_cidr("100.64.0.0/16").unwrap());
        host.setup_node(&grown).await.unwrap();
        let nat = saved(backend, "nat");
        assert_eq!(
            nat["AWS-SNAT-CHAIN-0"][1],
            "-d 100.64.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN"
        );
        assert_eq!(nat["AWS-CONNMARK-CHAIN-0"].len(), 3);
    });
}

#[test]
fn iptables_for_each_knob_and_from_tampered_states_nft() {
    iptables_converges(Backend::Nft);
}

#[test]
fn iptables_for_each_knob_and_from_tampered_states_legacy() {
    iptables_converges(Backend::Legacy);
}

#[test]
fn secondary_eni_link_table_and_rule_converge_and_are_undone() {
    in_node_ns("hostnet-eni", async || {
        primary_link();
        sh(&[
            "ip", "link", "add", "eth1", "address", MAC1, "type", "veth", "peer", "name", "eth1p",
        ]);
        sh(&["ip", "link", "set", "eth1p", "up"]);
        let host = LinuxHost::new(Backend::Nft, "eni").unwrap();
        let e = eni1();
        // proto boot, as upstream's: iproute2 prints no proto for it.
        let expected_table = [
            "default via 10.0.1.1 dev eth1",
            "10.0.1.1 dev eth1 scope link",
        ];
        let table = || {
            table_routes(2)
                .lines()
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
        };
        let addrs = || {
            let v: serde_json::Value =
                serde_json::from_str(&sh(&["ip", "-j", "addr", "show", "eth1"])).unwrap();
            let a: Vec<String> = v[0]["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["family"] == "inet")
                .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
                .collect();
            (
                a,
                v[0]["mtu"].clone(),
                v[0]["flags"].to_string().contains("UP"),
            )
        };
        // A link that appears late is waited for.
        host.setup_eni(&e, Duration::ZERO).await.unwrap();
        assert_eq!(table(), expected_table);
        assert_eq!(
            addrs(),
            (vec!["10.0.1.10/24".to_string()], 9001.into(), true)
        );
        assert_eq!(
            sh(&["ip", "route", "show", "table", "main", "dev", "eth1"]),
            ""
        );
        assert_eq!(our_rules(), ["32765: from 10.0.1.10 lookup 2"]);

        // Tampered: default route gone, a stray route and address, MTU changed, link down,
        // the kernel's subnet route back in main, a stale rule for this table.
        sh(&["ip", "route", "del", "default", "table", "2"]);
        sh(&[
            "ip",
            "route",
            "add",
            "192.0.2.0/24",
            "dev",
            "eth1",
            "table",
            "2",
        ]);
        sh(&["ip", "addr", "add", "10.0.1.99/24", "dev", "eth1"]);
        sh(&["ip", "link", "set", "eth1", "mtu", "1500", "down"]);
        sh(&[
            "ip",
            "rule",
            "add",
            "from",
            "10.0.1.77",
            "lookup",
            "2",
            "pref",
            "32765",
        ]);
        host.setup_eni(&e, Duration::ZERO).await.unwrap();
        assert_eq!(table(), expected_table);
        assert_eq!(
            addrs(),
            (vec!["10.0.1.10/24".to_string()], 9001.into(), true)
        );
        assert_eq!(
            sh(&["ip", "route", "show", "table", "main", "dev", "eth1"]),
            ""
        );
        assert_eq!(our_rules(), ["32765: from 10.0.1.10 lookup 2"]);

        // Freed: everything undone, twice without error.
        host.teardown_eni(&e).await.unwrap();
        host.teardown_eni(&e).await.unwrap();
        assert!(table().is_empty());
        assert!(our_rules().is_empty());
        assert!(addrs().0.is_empty());

        // No link with that MAC: a clear error after the wait, nothing half-done.
        let mut ghost = eni1();
        ghost.mac = "02:aa:00:00:00:99".into();
        let err = host
            .setup_eni(&ghost, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("02:aa:00:00:00:99"), "{err}");
        assert!(table().is_empty());
    });
}

// --- Traffic: a pod, the node, the "VPC" and an "internet" host -------------------------

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("{tag}-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }
    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        sh(&full)
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

fn enter(path: &str) {
    let f = std::fs::File::open(path).unwrap();
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// Sends a datagram from a thread in `from` to `to` where a thread in `at` listens;
/// returns the source address the listener saw and whether the echo came back.
fn udp_probe(from: &str, at: &str, to: SocketAddr) -> (Option<Ipv4Addr>, bool) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let at = at.to_string();
    let listener = std::thread::spawn(move || {
        enter(&at);
        let s = UdpSocket::bind(("0.0.0.0", to.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        let (n, peer) = s.recv_from(&mut buf).ok()?;
        let _ = s.send_to(&buf[..n], peer);
        match peer.ip() {
            std::net::IpAddr::V4(v4) => Some(v4),
            _ => None,
        }
    });
    ready_rx.recv().unwrap();
    let from = from.to_string();
    let sender = std::thread::spawn(move || {
        enter(&from);
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"hello", to).unwrap();
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf).is_ok()
    });
    let echoed = sender.join().unwrap();
    (listener.join().unwrap(), echoed)
}

fn tx_packets(dev: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&sh(&["ip", "-s", "-j", "link", "show", dev])).unwrap();
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
}

#[test]
fn pods_reach_the_vpc_unchanged_and_the_internet_through_snat() {
    let vpc = Netns::new("hn-vpc");
    let inet = Netns::new("hn-inet");
    let pod_a = Netns::new("hn-poda");
    let pod_b = Netns::new("hn-podb");
    let (vpc_path, inet_path) = (vpc.path(), inet.path());
    let (a_path, b_path) = (pod_a.path(), pod_b.path());
    let pod_names = (pod_a.0.clone(), pod_b.0.clone());
    in_node_ns("hostnet-traffic", async move || {
        // Node: eth0 (primary ENI, 10.0.0.10) and eth1 (secondary ENI, device 1) are
        // veths into the VPC namespace, which routes each pod address to its ENI.
        sh(&[
            "ip", "link", "add", "eth0", "address", MAC0, "type", "veth", "peer", "name", "v0",
            "netns", &vpc.0,
        ]);
        sh(&[
            "ip", "link", "add", "eth1", "address", MAC1, "type", "veth", "peer", "name", "v1",
            "netns", &vpc.0,
        ]);
        sh(&["ip", "addr", "add", "10.0.0.10/24", "dev", "eth0"]);
        sh(&["ip", "link", "set", "eth0", "up"]);
        sh(&[
            "ip", "route", "add", "default", "via", "10.0.0.1", "dev", "eth0",
        ]);
        sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        vpc.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "v0"]);
        vpc.exec(&["ip", "addr", "add", "10.0.1.1/24", "dev", "v1"]);
        vpc.exec(&["ip", "link", "set", "v0", "up"]);
        vpc.exec(&["ip", "link", "set", "v1", "up"]);
        vpc.exec(&[
            "ip",
            "route",
            "add",
            "10.0.0.20/32",
            "via",
            "10.0.0.10",
            "dev",
            "v0",
        ]);
        vpc.exec(&[
            "ip",
            "route",
            "add",
            "10.0.1.20/32",
            "via",
            "10.0.1.10",
            "dev",
            "v1",
        ]);
        vpc.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // The internet host, outside the VPC CIDR, behind the VPC's gateway.
        vpc.exec(&[
            "ip", "link", "add", "vi", "type", "veth", "peer", "name", "eth0", "netns", &inet.0,
        ]);
        vpc.exec(&["ip", "addr", "add", "203.0.113.1/24", "dev", "vi"]);
        vpc.exec(&["ip", "link", "set", "vi", "up"]);
        inet.exec(&["ip", "addr", "add", "203.0.113.10/24", "dev", "eth0"]);
        inet.exec(&["ip", "link", "set", "eth0", "up"]);
        inet.exec(&["ip", "route", "add", "default", "via", "203.0.113.1"]);

        // ipamd's side, then two pods with the plugin's datapath (compat.md section 4,
        // built here with iproute2): A on the primary ENI, B on the secondary one (table 2).
        let host = LinuxHost::new(Backend::System, "eni").unwrap();
        host.setup_node(&node_net(&[])).await.unwrap();
        host.setup_eni(&eni1(), Duration::ZERO).await.unwrap();
        for (pod, ip, table, veth) in [
            (&pod_names.0, "10.0.0.20", None, "enipoda"),
            (&pod_names.1, "10.0.1.20", Some("2"), "enipodb"),
        ] {
            let in_pod = |args: &[&str]| {
                let mut full = vec!["ip", "netns", "exec", pod.as_str()];
                full.extend_from_slice(args);
                sh(&full)
            };
            sh(&[
                "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod,
            ]);
            // (Not /sys/class/net: sysfs is the machine's, this thread is in the node's netns.)
            let link: serde_json::Value =
                serde_json::from_str(&sh(&["ip", "-j", "link", "show", veth])).unwrap();
            let mac = link[0]["address"].as_str().unwrap().to_string();
            let addr = format!("{ip}/32");
            in_pod(&["ip", "link", "set", "eth0", "up"]);
            in_pod(&["ip", "addr", "add", &addr, "dev", "eth0"]);
            in_pod(&[
                "ip",
                "route",
                "add",
                "169.254.1.1/32",
                "dev",
                "eth0",
                "scope",
                "link",
            ]);
            in_pod(&[
                "ip",
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ]);
            in_pod(&[
                "ip",
                "neigh",
                "add",
                "169.254.1.1",
                "lladdr",
                mac.trim(),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            sh(&["ip", "link", "set", veth, "up"]);
            sh(&["ip", "route", "add", &addr, "dev", veth, "scope", "link"]);
            sh(&[
                "ip", "rule", "add", "to", &addr, "lookup", "main", "pref", "512",
            ]);
            if let Some(t) = table {
                sh(&[
                    "ip", "rule", "add", "from", &addr, "lookup", t, "pref", "1536",
                ]);
            }
        }
        let vpc_host: SocketAddr = "10.0.0.1:7001".parse().unwrap();
        let internet: SocketAddr = "203.0.113.10:7002".parse().unwrap();

        // Pod A -> a VPC address: its own address, no NAT; the reply comes back.
        assert_eq!(
            udp_probe(&a_path, &vpc_path, vpc_host),
            (Some("10.0.0.20".parse().unwrap()), true)
        );
        // Pod A -> the internet: from the node's primary address; the reply comes back.
        assert_eq!(
            udp_probe(&a_path, &inet_path, internet),
            (Some("10.0.0.10".parse().unwrap()), true)
        );
        // Pod B (secondary ENI) -> a VPC address: unchanged, and out through eth1.
        let (eth0, eth1) = (tx_packets("eth0"), tx_packets("eth1"));
        assert_eq!(
            udp_probe(&b_path, &vpc_path, vpc_host),
            (Some("10.0.1.20".parse().unwrap()), true)
        );
        assert!(tx_packets("eth1") > eth1, "pod B's packet left by eth1");
        assert_eq!(tx_packets("eth0"), eth0, "nothing of it by eth0");
        // Pod B -> the internet: marked, routed by the primary ENI, SNATed to its address.
        let eth0 = tx_packets("eth0");
        assert_eq!(
            udp_probe(&b_path, &inet_path, internet),
            (Some("10.0.0.10".parse().unwrap()), true)
        );
        assert!(
            tx_packets("eth0") > eth0,
            "pod B's internet packet left by eth0"
        );

        // AWS_VPC_K8S_CNI_EXTERNALSNAT=true: the pod's own address reaches the internet
        // host (something outside the node translates it, in a real VPC).
        host.setup_node(&node_net(&[("AWS_VPC_K8S_CNI_EXTERNALSNAT", "true")]))
            .await
            .unwrap();
        assert_eq!(
            udp_probe(&a_path, &inet_path, internet),
            (Some("10.0.0.20".parse().unwrap()), true)
        );
        drop((vpc, inet));
    });
    drop((pod_a, pod_b));
}

fn ipv6_node_converges(backend: Backend) {
    in_node_ns("hostnet6", || async move {
        let ipt = ipt_bin(backend);
        // What a node moving from upstream has: kube's FORWARD rules, and upstream's copy of
        // the egress block rule once per aws-node start.
        sh(&[ipt, "-N", "KUBE-FORWARD"]);
        sh(&[ipt, "-A", "FORWARD", "-j", "KUBE-FORWARD"]);
        for _ in 0..2 {
            sh(&[
                ipt,
                "-I",
                "FORWARD",
                "1",
                "-d",
                "169.254.172.0/22",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-m",
                "comment",
                "--comment",
                "Block Node Local Pod access via IPv4",
                "-j",
                "REJECT",
            ]);
        }
        let changed = ipamd::host::converge_ipv6_node(backend).unwrap();
        assert!(!changed.is_empty());
        let forward = saved(backend, "filter")["FORWARD"].clone();
        assert_eq!(
            forward,
            vec![
                ipamd::host::EGRESS_BLOCK_RULE.to_string(),
                "-j KUBE-FORWARD".to_string()
            ]
        );
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding")
                .unwrap()
                .trim(),
            "1"
        );
        // Converged: a second pass changes nothing; someone moving the rule is repaired.
        assert_eq!(
            ipamd::host::converge_ipv6_node(backend).unwrap(),
            Vec::<String>::new()
        );
        sh(&[ipt, "-D", "FORWARD", "-j", "KUBE-FORWARD"]);
        sh(&[ipt, "-I", "FORWARD", "1", "-j", "KUBE-FORWARD"]);
        assert!(!ipamd::host::converge_ipv6_node(backend).unwrap().is_empty());
        assert_eq!(
            saved(backend, "filter")["FORWARD"][0],
            ipamd::host::EGRESS_BLOCK_RULE
        );
    });
}

#[test]
fn ipv6_node_blocks_new_connections_to_egress_addresses_first_in_forward_nft() {
    ipv6_node_converges(Backend::Nft);
}

#[test]
fn ipv6_node_blocks_new_connections_to_egress_addresses_first_in_forward_legacy() {
    ipv6_node_converges(Backend::Legacy);
}
