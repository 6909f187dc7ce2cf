//! Bad input and failures: each gives the right CNI error code and a message naming
//! what was wrong, and loses nothing (no address kept, nothing left in the kernel).

use std::net::Ipv4Addr;

use serde_json::{Value, json};
use vpc_cni_tests::fake_ipamd::{Call, FakeIpamd, Mode};
use vpc_cni_tests::netns::{Node, TestNs};
use vpc_cni_tests::plugin::{Invocation, Output, netconf, plugin_bin, run};
use vpc_cni_tests::require_root;

struct World {
    node: Node,
    ipamd: FakeIpamd,
    log: String,
    bin: std::path::PathBuf,
}

impl World {
    fn new() -> World {
        require_root();
        let ipamd = FakeIpamd::start(vec![("10.0.9.1".parse::<Ipv4Addr>().unwrap(), 1)]);
        let log = ipamd.dir.join("plugin.log").display().to_string();
        World {
            node: Node::new("192.168.0.10"),
            ipamd,
            log,
            bin: plugin_bin(false),
        }
    }

    fn conf(&self, extra: &[(&str, Value)]) -> String {
        netconf("1.0.0", &self.ipamd.socket_str(), &self.log, extra)
    }

    fn run(&self, inv: &Invocation, stdin: &str) -> Output {
        run(&self.bin, Some(&self.node.ns.path()), inv, stdin)
    }

    /// Nothing of a pod exists on the node: no veth but eth0/eth0-peer, no pod rules.
    fn node_is_clean(&self) {
        let links = self.node.ns.exec(&["ip", "-o", "link", "show"]);
        assert!(!links.contains(" eni"), "a host veth was left: {links}");
        let rules = self.node.ns.exec(&["ip", "rule", "show"]);
        assert!(
            !rules.contains("512:") && !rules.contains("1536:"),
            "rules left: {rules}"
        );
    }

    fn adds_and_dels(&self) -> (usize, usize) {
        let calls = self.ipamd.calls();
        (
            calls.iter().filter(|c| matches!(c, Call::Add(_))).count(),
            calls.iter().filter(|c| matches!(c, Call::Del(_))).count(),
        )
    }
}

fn assert_error(out: &Output, code: u64, msg_has: &str) {
    assert!(!out.success, "expected failure, got {}", out.stdout);
    assert_eq!(out.code(), Some(code), "stdout: {}", out.stdout);
    assert!(
        out.msg().contains(msg_has),
        "msg {:?} should mention {msg_has:?}",
        out.msg()
    );
    assert!(
        out.json.get("details").is_some(),
        "error JSON has details: {}",
        out.stdout
    );
    assert!(out.json.get("cniVersion").is_some());
}

#[test]
fn malformed_json_is_a_decode_error() {
    let w = World::new();
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
        "{\"cniVersion\": \"1.0.0\", ",
    );
    assert_error(&out, 6, "not valid JSON");
    assert_eq!(w.adds_and_dels(), (0, 0));
}

#[test]
fn unknown_cni_version_is_incompatible() {
    let w = World::new();
    let pod = TestNs::new("pod");
    let conf = netconf("2.5.0", &w.ipamd.socket_str(), &w.log, &[]);
    let out = w.run(&Invocation::new("ADD", "c1", &pod.path(), "d", "p"), &conf);
    assert_error(&out, 1, "\"2.5.0\"");
    assert!(out.msg().contains("1.0.0"), "lists the supported versions");
}

#[test]
fn add_without_cni_netns_is_an_environment_error() {
    let w = World::new();
    let out = w.run(&Invocation::new("ADD", "c1", "", "d", "p"), &w.conf(&[]));
    assert_error(&out, 4, "CNI_NETNS");
    assert_eq!(w.adds_and_dels(), (0, 0));
}

#[test]
fn netns_path_that_does_not_exist() {
    let w = World::new();
    let out = w.run(
        &Invocation::new("ADD", "c1", "/var/run/netns/no-such-pod-ns", "d", "p"),
        &w.conf(&[]),
    );
    assert_error(&out, 3, "/var/run/netns/no-such-pod-ns");
    assert_eq!(
        w.adds_and_dels(),
        (0, 0),
        "no address taken for a missing namespace"
    );
}

#[test]
fn netns_path_that_is_not_a_namespace() {
    let w = World::new();
    let file = w.ipamd.dir.join("not-a-netns");
    std::fs::write(&file, b"x").unwrap();
    let out = w.run(
        &Invocation::new("ADD", "c1", file.to_str().unwrap(), "d", "p"),
        &w.conf(&[]),
    );
    assert_error(&out, 4, "not a network namespace");
}

#[test]
fn veth_prefix_too_long() {
    let w = World::new();
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
        &w.conf(&[("vethPrefix", json!("abcde"))]),
    );
    assert_error(&out, 7, "vethPrefix \"abcde\"");
}

#[test]
fn mtu_out_of_range() {
    let w = World::new();
    let pod = TestNs::new("pod");
    for bad in [json!(9002), json!("100"), json!("jumbo")] {
        let out = w.run(
            &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
            &w.conf(&[("mtu", bad.clone())]),
        );
        assert_error(&out, 7, "mtu");
    }
}

#[test]
fn ipamd_down_on_add_is_try_again_later() {
    let mut w = World::new();
    w.ipamd.stop();
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
        &w.conf(&[]),
    );
    assert_error(&out, 11, "unreachable");
    assert!(
        out.msg().contains(&w.ipamd.socket_str()),
        "names the socket: {}",
        out.msg()
    );
    w.node_is_clean();
    assert!(!pod.try_exec(&["ip", "link", "show", "eth0"]));
}

#[test]
fn ipamd_without_a_free_address_is_try_again_later() {
    let w = World::new();
    w.ipamd.set_mode(Mode::NoAddress);
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "team-a", "web"),
        &w.conf(&[]),
    );
    assert_error(&out, 11, "team-a/web");
    w.node_is_clean();
}

#[test]
fn a_bad_address_from_ipamd_is_handed_back() {
    let w = World::new();
    w.ipamd.set_mode(Mode::BadAddress("10.0.0.300".into()));
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
        &w.conf(&[]),
    );
    assert_error(&out, 101, "10.0.0.300");
    assert_eq!(w.adds_and_dels(), (1, 1), "the address was released");
    assert_eq!(w.ipamd.assigned_count(), 0);
    w.node_is_clean();
}

#[test]
fn datapath_failure_cleans_up_and_hands_the_address_back() {
    let w = World::new();
    let pod = TestNs::new("pod");
    // The kernel refuses to replace the pod's loopback: setup fails after ipamd answered.
    let mut inv = Invocation::new("ADD", "c1", &pod.path(), "d", "p");
    inv.if_name = "lo".into();
    let out = w.run(&inv, &w.conf(&[]));
    assert_error(&out, 100, "10.0.9.1");
    assert_eq!(w.adds_and_dels(), (1, 1), "the address was released");
    assert_eq!(w.ipamd.assigned_count(), 0);
    w.node_is_clean();
    // The address is usable again at once by the next pod.
    let ok = w.run(
        &Invocation::new("ADD", "c2", &pod.path(), "d", "p2"),
        &w.conf(&[]),
    );
    assert!(ok.success, "{}", ok.stdout);
    assert_eq!(ok.json["ips"][0]["address"], "10.0.9.1/32");
    assert!(
        w.run(
            &Invocation::new("DEL", "c2", &pod.path(), "d", "p2"),
            &w.conf(&[])
        )
        .success
    );
    w.node_is_clean();
}

#[test]
fn bad_environment() {
    let w = World::new();
    let pod = TestNs::new("pod");
    let mut inv = Invocation::new("ADD", "c1", &pod.path(), "d", "p");
    inv.args = "K8S_POD_NAME=p;Surprise=1".into();
    assert_error(&w.run(&inv, &w.conf(&[])), 4, "Surprise");
    let mut inv = Invocation::new("ADD", "c1", &pod.path(), "d", "p");
    inv.if_name = "this-name-is-too-long".into();
    assert_error(&w.run(&inv, &w.conf(&[])), 4, "CNI_IFNAME");
    let inv = Invocation::new("ADD", "", &pod.path(), "d", "p");
    assert_error(&w.run(&inv, &w.conf(&[])), 4, "CNI_CONTAINERID");
    let inv = Invocation::new("FROB", "c1", &pod.path(), "d", "p");
    assert_error(&w.run(&inv, &w.conf(&[])), 4, "FROB");
    assert_eq!(w.adds_and_dels(), (0, 0));
}

#[test]
fn version_answers_without_ipamd() {
    let w = World::new();
    let inv = Invocation::new("VERSION", "", "", "", "");
    let out = w.run(&inv, r#"{"cniVersion":"1.0.0"}"#);
    assert!(out.success);
    assert_eq!(out.json["cniVersion"], "1.0.0");
    let vs: Vec<&str> = out.json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(vs.contains(&v), "{v} in {vs:?}");
    }
    // Podman calls VERSION with an empty stdin too.
    assert!(w.run(&inv, "").success);
}
