//! The datapath details and result encoding shared with upstream's `aws-cni`, against the
//! real plugin in namespaces: the host veth's IPv6 settings and MAC, routes' protocol,
//! and results either plugin can tear the other's pod down from. Needs root.

use std::net::Ipv4Addr;

use serde_json::{Value, json};
use vpc_cni_netlink::{MAIN_TABLE, RouteProtocol};
use vpc_cni_proto::host_veth_name;
use vpc_cni_tests::netns::TestNs;
use vpc_cni_tests::plugin::{Invocation, World};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn read(ns: &TestNs, path: &str) -> String {
    ns.exec(&["cat", path]).trim().to_string()
}

#[test]
fn host_veth_ipv6_settings_are_upstreams_whatever_the_nodes_defaults() {
    let w = World::new(vec![(ip("10.0.9.1"), 0)]);
    // A node whose defaults differ from the kernel's and from upstream's settings: a new
    // link inherits these unless the plugin writes its own.
    for (k, v) in [
        ("accept_ra", "2"),
        ("accept_redirects", "0"),
        ("forwarding", "1"),
    ] {
        w.node.ns.sysctl(&format!("net.ipv6.conf.default.{k}"), v);
    }
    let pod = TestNs::new("pod");
    let inv = Invocation::new("ADD", "c-sys", &pod.path(), "default", "sys");
    let out = w.run(&inv, &w.conf("1.0.0", &[]));
    assert!(out.success, "{}", out.stdout);
    let veth = host_veth_name("eni", "default", "sys");
    for (k, want) in [
        ("accept_ra", "0"),
        ("accept_redirects", "1"),
        ("forwarding", "0"),
    ] {
        assert_eq!(
            read(&w.node.ns, &format!("/proc/sys/net/ipv6/conf/{veth}/{k}")),
            want,
            "{veth} {k}"
        );
    }
    // A link made without the plugin still inherits the node's defaults (the test is
    // not vacuous).
    w.node.ns.exec(&[
        "ip", "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
    ]);
    assert_eq!(
        read(&w.node.ns, "/proc/sys/net/ipv6/conf/probe0/accept_ra"),
        "2"
    );
    assert!(
        w.run(&inv.with_command("DEL"), &w.conf("1.0.0", &[]))
            .success
    );
}

#[test]
fn host_veth_mac_is_its_own_and_routes_are_proto_boot() {
    let w = World::new(vec![
        (ip("10.0.9.2"), 0),
        (ip("10.0.9.3"), 0),
        (ip("10.0.9.4"), 0),
    ]);
    let pods: Vec<TestNs> = (0..3).map(|_| TestNs::new("pod")).collect();
    let mut invs = vec![];
    for (i, p) in pods.iter().enumerate() {
        let inv = Invocation::new(
            "ADD",
            &format!("c-mac{i}"),
            &p.path(),
            "default",
            &format!("mac{i}"),
        );
        let out = w.run(&inv, &w.conf("1.0.0", &[]));
        assert!(out.success, "{}", out.stdout);
        invs.push(inv);
    }
    block_on(async {
        let node = w.node.ns.netlink();
        let links = node.links().await.unwrap();
        for (i, p) in pods.iter().enumerate() {
            let veth = host_veth_name("eni", "default", &format!("mac{i}"));
            let h = links.iter().find(|l| l.name == veth).expect("host veth");
            assert_eq!(
                h.mac[0] & 0x03,
                0x02,
                "{veth}: locally administered unicast"
            );
            let same: Vec<_> = links
                .iter()
                .filter(|l| l.mac == h.mac)
                .map(|l| &l.name)
                .collect();
            assert_eq!(same, vec![&h.name], "{veth}'s MAC is no other host link's");
            // The pod's gateway neighbour is that MAC.
            let pod = p.netlink();
            let eth0 = pod.link("eth0").await.unwrap().unwrap();
            let n = pod.neighbours(eth0.index).await.unwrap();
            assert!(n.iter().any(|(_, mac, _)| *mac == h.mac), "{n:?}");
            // Routes on both sides are proto boot, as upstream's.
            let host_route = node
                .routes()
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.oif == Some(h.index) && r.dst_len == 32)
                .expect("host route");
            assert_eq!(host_route.protocol, RouteProtocol::Boot);
            let pod_routes: Vec<_> = pod
                .routes()
                .await
                .unwrap()
                .into_iter()
                .filter(|r| {
                    r.table == MAIN_TABLE
                        && r.oif == Some(eth0.index)
                        && r.scope != vpc_cni_netlink::RouteScope::Host
                })
                .collect();
            assert_eq!(pod_routes.len(), 2, "{pod_routes:?}");
            assert!(
                pod_routes.iter().all(|r| r.protocol == RouteProtocol::Boot),
                "{pod_routes:?}"
            );
        }
    });
    // txqueuelen: the kernel's 1000 on both ends, on purpose (README).
    let veth = host_veth_name("eni", "default", "mac0");
    assert_eq!(
        read(&w.node.ns, &format!("/sys/class/net/{veth}/tx_queue_len")),
        "1000"
    );
    assert_eq!(
        pods[0]
            .exec(&["cat", "/sys/class/net/eth0/tx_queue_len"])
            .trim(),
        "1000"
    );
    for inv in &invs {
        assert!(
            w.run(&inv.with_command("DEL"), &w.conf("1.0.0", &[]))
                .success
        );
    }
}

/// The interface of `result` named `name`.
fn iface<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no interface {name} in {result}"))
}

#[test]
fn our_result_carries_what_upstreams_del_reads() {
    let w = World::new(vec![(ip("10.0.9.5"), 2), (ip("10.0.9.6"), 0)]);
    for (cid, pod, device, table) in [("c-up2", "up2", 2, "3"), ("c-up0", "up0", 0, "1")] {
        let ns = TestNs::new("pod");
        let inv = Invocation::new("ADD", cid, &ns.path(), "team", pod);
        let out = w.run(&inv, &w.conf("1.0.0", &[]));
        assert!(out.success, "{}", out.stdout);
        let r = &out.json;
        // Upstream's cni.go: the dummy is named "dummy" + sha1("<ns>.<pod>")[:11], its mac
        // is the VLAN, its sandbox the device number, its socketPath the count; the pod's
        // interface keeps its route table in pciID.
        let dummy = iface(r, &host_veth_name("dummy", "team", pod));
        assert_eq!(dummy["mac"], "0");
        assert_eq!(dummy["sandbox"], device.to_string());
        assert_eq!(dummy["socketPath"], "1");
        let eth0 = iface(r, "eth0");
        assert_eq!(eth0["pciID"], table, "{pod}: route table");
        let at = r["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .position(|i| i["name"] == "eth0");
        let ips: Vec<_> = r["ips"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["interface"].as_u64().map(|x| x as usize) == at)
            .collect();
        assert_eq!(ips.len(), 1, "one address on eth0: {r}");
        assert!(
            w.run(
                &inv.with_command("DEL"),
                &w.conf("1.0.0", &[("prevResult", out.json.clone())])
            )
            .success
        );
    }
    // Not Kubernetes (podman): no dummy, whose "0" is no MAC podman would accept.
    let ns = TestNs::new("pod");
    let mut inv = Invocation::new("ADD", "c-podman", &ns.path(), "", "");
    inv.args = String::new();
    let out = w.run(&inv, &w.conf("1.0.0", &[]));
    assert!(out.success, "{}", out.stdout);
    for i in out.json["interfaces"].as_array().unwrap() {
        assert_eq!(i["mac"].as_str().unwrap().len(), 17, "{i}");
    }
    assert!(
        w.run(&inv.with_command("DEL"), &w.conf("1.0.0", &[]))
            .success
    );
}

/// Upstream's ADD result for `pod` (namespace "team") as its cni.go builds it, written from
/// its source: per attachment the host veth, then the pod's interface (pciID = table), and
/// the dummy last.
fn upstream_result(netns: &str, pod: &str, attachments: &[(&str, &str, &str, u32)]) -> Value {
    let mut interfaces = vec![];
    let mut ips = vec![];
    for (host, cont, addr, table) in attachments {
        interfaces.push(json!({"name": host}));
        interfaces.push(json!({"name": cont, "sandbox": netns, "pciID": table.to_string()}));
        ips.push(
            json!({"interface": interfaces.len() - 1, "address": format!("{addr}/32"),
                        "gateway": "10.0.9.1"}),
        );
    }
    interfaces.push(
        json!({"name": host_veth_name("dummy", "team", pod), "mac": "0",
                           "sandbox": "2", "socketPath": attachments.len().to_string()}),
    );
    json!({"cniVersion": "1.0.0", "interfaces": interfaces, "ips": ips, "dns": {}})
}

#[test]
fn upstreams_result_tears_its_pod_down_with_ipamd_unreachable() {
    let mut w = World::new(vec![(ip("10.0.9.7"), 2)]);
    let pod = TestNs::new("pod");
    let inv = Invocation::new("ADD", "c-roll", &pod.path(), "team", "roll");
    // Attachment 0: the datapath both plugins build (ours builds it here).
    assert!(w.run(&inv, &w.conf("1.0.0", &[])).success);
    // Attachment 1, as upstream builds a second one (multi-NIC): host veth named for
    // "<pod>.1", mNicIf1 in the pod, its route and rules; made here with ip(8).
    let host1 = host_veth_name("eni", "team", "roll.1");
    w.node.ns.exec(&[
        "ip", "link", "add", &host1, "type", "veth", "peer", "name", "mNicIf1", "netns", &pod.name,
    ]);
    pod.exec(&["ip", "addr", "add", "10.0.9.8/32", "dev", "mNicIf1"]);
    pod.exec(&["ip", "link", "set", "mNicIf1", "up"]);
    w.node.ns.exec(&["ip", "link", "set", &host1, "up"]);
    w.node.ns.exec(&[
        "ip",
        "route",
        "add",
        "10.0.9.8/32",
        "dev",
        &host1,
        "scope",
        "link",
    ]);
    w.node.ns.exec(&[
        "ip",
        "rule",
        "add",
        "to",
        "10.0.9.8/32",
        "lookup",
        "main",
        "pref",
        "512",
    ]);
    w.node.ns.exec(&[
        "ip",
        "rule",
        "add",
        "from",
        "10.0.9.8/32",
        "lookup",
        "5",
        "pref",
        "1536",
    ]);
    let prev = upstream_result(
        &pod.path(),
        "roll",
        &[
            (
                &host_veth_name("eni", "team", "roll"),
                "eth0",
                "10.0.9.7",
                3,
            ),
            (&host1, "mNicIf1", "10.0.9.8", 5),
        ],
    );
    w.ipamd.stop();
    let del = w.run(
        &inv.with_command("DEL"),
        &w.conf("1.0.0", &[("prevResult", prev)]),
    );
    assert!(del.success, "DEL with ipamd down: {}", del.stdout);
    let rules = w.node.ns.exec(&["ip", "rule", "show"]);
    assert!(
        !rules.contains("10.0.9.7") && !rules.contains("10.0.9.8"),
        "{rules}"
    );
    let routes = w.node.ns.exec(&["ip", "route", "show"]);
    assert!(!routes.contains("10.0.9."), "{routes}");
    w.assert_node_clean();
    drop(pod);
    w.assert_no_host_veth();
}

#[test]
fn upstreams_result_after_the_netns_went_still_removes_the_rules() {
    // The runtime removed the namespace (taking the veth and its route) before DEL, and
    // ipamd cannot answer: only prevResult names the address whose rules are left.
    let mut w = World::new(vec![(ip("10.0.9.9"), 2)]);
    let pod = TestNs::new("pod");
    let inv = Invocation::new("ADD", "c-gone", &pod.path(), "team", "gone");
    assert!(w.run(&inv, &w.conf("1.0.0", &[])).success);
    let path = pod.path();
    drop(pod);
    w.assert_no_host_veth();
    let rules = w.node.ns.exec(&["ip", "rule", "show"]);
    assert!(
        rules.contains("10.0.9.9"),
        "the rules outlive the veth: {rules}"
    );
    let prev = upstream_result(
        &path,
        "gone",
        &[(
            &host_veth_name("eni", "team", "gone"),
            "eth0",
            "10.0.9.9",
            3,
        )],
    );
    w.ipamd.stop();
    let mut del = inv.with_command("DEL");
    del.netns = String::new();
    assert!(
        w.run(&del, &w.conf("1.0.0", &[("prevResult", prev)]))
            .success
    );
    w.assert_node_clean();
}

#[test]
fn a_malformed_upstream_encoding_is_not_trusted() {
    // A dummy claiming 1,000,000 attachments, and one naming interfaces that are not in
    // the result: DEL still takes down what the node shows and succeeds.
    let mut w = World::new(vec![(ip("10.0.9.10"), 0)]);
    let pod = TestNs::new("pod");
    let inv = Invocation::new("ADD", "c-bad", &pod.path(), "team", "bad");
    let out = w.run(&inv, &w.conf("1.0.0", &[]));
    assert!(out.success, "{}", out.stdout);
    let mut prev = out.json.clone();
    let dummy = host_veth_name("dummy", "team", "bad");
    for i in prev["interfaces"].as_array_mut().unwrap() {
        if i["name"] == dummy.as_str() {
            i["socketPath"] = json!("1000000");
        }
    }
    w.ipamd.stop();
    let del = w.run(
        &inv.with_command("DEL"),
        &w.conf("1.0.0", &[("prevResult", prev)]),
    );
    assert!(del.success, "{}", del.stdout);
    w.assert_node_clean();
}
