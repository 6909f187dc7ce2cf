//! Bad input and failures: each gives the right CNI error code and a message naming
//! what was wrong, and loses nothing (no address kept, nothing left in the kernel).

use std::net::Ipv4Addr;

use serde_json::{Value, json};
use vpc_cni_tests::fake_ipamd::{Call, Mode};
use vpc_cni_tests::netns::TestNs;
use vpc_cni_tests::plugin::{Invocation, Output, World, netconf};

fn world() -> World {
    World::new(vec![("10.0.9.1".parse::<Ipv4Addr>().unwrap(), 1)])
}

fn conf(w: &World, extra: &[(&str, Value)]) -> String {
    w.conf("1.0.0", extra)
}

fn adds_and_dels(w: &World) -> (usize, usize) {
    let calls = w.ipamd.calls();
    (
        calls.iter().filter(|c| matches!(c, Call::Add(_))).count(),
        calls.iter().filter(|c| matches!(c, Call::Del(_))).count(),
    )
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
    let w = world();
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
        "{\"cniVersion\": \"1.0.0\", ",
    );
    assert_error(&out, 6, "not valid JSON");
    assert_eq!(adds_and_dels(&w), (0, 0));
}

#[test]
fn unknown_cni_version_is_incompatible() {
    let w = world();
    let pod = TestNs::new("pod");
    let conf = netconf("2.5.0", &w.ipamd.socket_str(), &w.log, &[]);
    let out = w.run(&Invocation::new("ADD", "c1", &pod.path(), "d", "p"), &conf);
    assert_error(&out, 1, "\"2.5.0\"");
    assert!(out.msg().contains("1.0.0"), "lists the supported versions");
}

#[test]
fn add_without_cni_netns_is_an_environment_error() {
    let w = world();
    let out = w.run(&Invocation::new("ADD", "c1", "", "d", "p"), &conf(&w, &[]));
    assert_error(&out, 4, "CNI_NETNS");
    assert_eq!(adds_and_dels(&w), (0, 0));
}

#[test]
fn netns_path_that_does_not_exist() {
    let w = world();
    let out = w.run(
        &Invocation::new("ADD", "c1", "/var/run/netns/no-such-pod-ns", "d", "p"),
        &conf(&w, &[]),
    );
    assert_error(&out, 3, "/var/run/netns/no-such-pod-ns");
    assert_eq!(
        adds_and_dels(&w),
        (0, 0),
        "no address taken for a missing namespace"
    );
}

#[test]
fn netns_path_that_is_not_a_namespace() {
    let w = world();
    let file = w.ipamd.dir.join("not-a-netns");
    std::fs::write(&file, b"x").unwrap();
    let out = w.run(
        &Invocation::new("ADD", "c1", file.to_str().unwrap(), "d", "p"),
        &conf(&w, &[]),
    );
    assert_error(&out, 4, "not a network namespace");
}

#[test]
fn veth_prefix_too_long() {
    let w = world();
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
        &conf(&w, &[("vethPrefix", json!("abcde"))]),
    );
    assert_error(&out, 7, "vethPrefix \"abcde\"");
}

#[test]
fn mtu_out_of_range() {
    let w = world();
    let pod = TestNs::new("pod");
    for bad in [json!(9002), json!("100"), json!("jumbo")] {
        let out = w.run(
            &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
            &conf(&w, &[("mtu", bad.clone())]),
        );
        assert_error(&out, 7, "mtu");
    }
}

#[test]
fn ipamd_down_on_add_is_try_again_later() {
    let mut w = world();
    w.ipamd.stop();
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
        &conf(&w, &[]),
    );
    assert_error(&out, 11, "unreachable");
    assert!(
        out.msg().contains(&w.ipamd.socket_str()),
        "names the socket: {}",
        out.msg()
    );
    w.assert_node_clean();
    w.assert_no_host_veth();
    assert!(!pod.try_exec(&["ip", "link", "show", "eth0"]));
}

#[test]
fn ipamd_without_a_free_address_is_try_again_later() {
    let w = world();
    w.ipamd.set_mode(Mode::NoAddress);
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "team-a", "web"),
        &conf(&w, &[]),
    );
    assert_error(&out, 11, "team-a/web");
    w.assert_node_clean();
    w.assert_no_host_veth();
}

#[test]
fn a_bad_address_from_ipamd_is_handed_back() {
    let w = world();
    w.ipamd.set_mode(Mode::BadAddress("10.0.0.300".into()));
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
        &conf(&w, &[]),
    );
    assert_error(&out, 101, "10.0.0.300");
    assert_eq!(adds_and_dels(&w), (1, 1), "the address was released");
    assert_eq!(w.ipamd.assigned_count(), 0);
    w.assert_node_clean();
    w.assert_no_host_veth();
}

#[test]
fn a_foreign_interface_on_the_name_is_refused_before_an_address_is_taken() {
    let w = world();
    let pod = TestNs::new("pod");
    // The pod's loopback holds the name: never deleted, no address taken.
    let mut inv = Invocation::new("ADD", "c1", &pod.path(), "d", "p");
    inv.if_name = "lo".into();
    let out = w.run(&inv, &conf(&w, &[]));
    assert_error(&out, 100, "not this plugin's veth");
    assert_eq!(adds_and_dels(&w), (0, 0), "no address taken");
    assert!(
        pod.try_exec(&["ip", "link", "show", "lo"]),
        "lo is still there"
    );
    w.assert_node_clean();
    w.assert_no_host_veth();
    // The address is usable by the next pod.
    let ok = w.run(
        &Invocation::new("ADD", "c2", &pod.path(), "d", "p2"),
        &conf(&w, &[]),
    );
    assert!(ok.success, "{}", ok.stdout);
    assert_eq!(ok.json["ips"][0]["address"], "10.0.9.1/32");
    assert!(
        w.run(
            &Invocation::new("DEL", "c2", &pod.path(), "d", "p2"),
            &conf(&w, &[])
        )
        .success
    );
    w.assert_node_clean();
    drop(pod);
    w.assert_no_host_veth();
}

#[test]
fn bad_environment() {
    let w = world();
    let pod = TestNs::new("pod");
    let mut inv = Invocation::new("ADD", "c1", &pod.path(), "d", "p");
    inv.args = "K8S_POD_NAME=p;Surprise=1".into();
    assert_error(&w.run(&inv, &conf(&w, &[])), 4, "Surprise");
    let mut inv = Invocation::new("ADD", "c1", &pod.path(), "d", "p");
    inv.if_name = "this-name-is-too-long".into();
    assert_error(&w.run(&inv, &conf(&w, &[])), 4, "CNI_IFNAME");
    let inv = Invocation::new("ADD", "", &pod.path(), "d", "p");
    assert_error(&w.run(&inv, &conf(&w, &[])), 4, "CNI_CONTAINERID");
    let inv = Invocation::new("FROB", "c1", &pod.path(), "d", "p");
    assert_error(&w.run(&inv, &conf(&w, &[])), 4, "FROB");
    assert_eq!(adds_and_dels(&w), (0, 0));
}

#[test]
fn version_answers_without_ipamd() {
    let w = world();
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
