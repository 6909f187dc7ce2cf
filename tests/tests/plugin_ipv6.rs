//! The real `aws-cni` binary building an IPv6 pod's datapath (an ENABLE_IPv6 node's
//! /128 from ipamd), read back with iproute2 inside the test's namespaces. Needs root.

use vpc_cni_proto::host_veth_name;
use vpc_cni_tests::netns::TestNs;
use vpc_cni_tests::plugin::{Invocation, World};

const POD: &str = "2600:1f14:0:100:1::7";
/// The node's own IPv6 address (on lo of the test's node namespace).
const NODE: &str = "2600:1f14:0:100::10";

fn world() -> World {
    let w = World::new(vec![(POD.parse::<std::net::Ipv6Addr>().unwrap(), 0)]);
    w.node.ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{NODE}/128"),
        "dev",
        "lo",
    ]);
    w.node.ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    w
}

fn host_state(w: &World) -> (String, String) {
    (
        w.node
            .ns
            .exec(&["ip", "-6", "route", "show", "table", "main"]),
        w.node.ns.exec(&["ip", "-6", "rule", "show"]),
    )
}

#[test]
fn an_ipv6_pod_gets_its_128_and_is_reachable_the_moment_add_answers() {
    let w = world();
    let pod = TestNs::new("pod6");
    let inv = Invocation::new("ADD", "c-v6-1", &pod.path(), "default", "web");
    let out = w.run(&inv, &w.conf("1.0.0", &[]));
    assert!(out.success, "ADD failed: {} {}", out.stdout, out.stderr);
    // Nothing waits for duplicate-address detection, and nothing is tentative: the first
    // packet each way gets through.
    assert!(
        w.node
            .ns
            .try_exec(&["ping", "-6", "-c1", "-W2", "-I", NODE, POD]),
        "node -> pod right after ADD"
    );
    assert!(
        pod.try_exec(&["ping", "-6", "-c1", "-W2", NODE]),
        "pod -> node right after ADD"
    );
    let veth = host_veth_name("eni", "default", "web");
    let addrs = pod.exec(&["ip", "-6", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains(&format!("inet6 {POD}/128 scope global")),
        "{addrs}"
    );
    assert!(!addrs.contains("tentative"), "{addrs}");
    let routes = pod.exec(&["ip", "-6", "route", "show"]);
    assert!(routes.contains("fe80::1 dev eth0"), "{routes}");
    assert!(routes.contains("default via fe80::1 dev eth0"), "{routes}");
    let host_mac = w
        .node
        .ns
        .exec(&["cat", &format!("/sys/class/net/{veth}/address")]);
    let neigh = pod.exec(&["ip", "-6", "neigh", "show", "dev", "eth0"]);
    assert!(
        neigh.contains(&format!("fe80::1 lladdr {} PERMANENT", host_mac.trim())),
        "{neigh}"
    );
    let (hroutes, hrules) = host_state(&w);
    assert!(hroutes.contains(&format!("{POD} dev {veth} ")), "{hroutes}");
    assert!(
        hrules.contains(&format!("512:\tfrom all to {POD} lookup main")),
        "{hrules}"
    );
    let hsys = |k: &str| {
        w.node
            .ns
            .exec(&["cat", &format!("/proc/sys/net/ipv6/conf/{veth}/{k}")])
            .trim()
            .to_string()
    };
    assert_eq!(hsys("accept_dad"), "0");
    assert_eq!(hsys("accept_ra"), "0");

    let r = &out.json;
    assert_eq!(r["ips"][0]["address"], format!("{POD}/128"));
    assert_eq!(r["ips"][0]["gateway"], "fe80::1");
    assert_eq!(r["routes"][0]["dst"], "::/0");

    // CHECK from the result passes, and names what someone broke.
    let conf_with = |prev: &serde_json::Value| {
        let mut c: serde_json::Value = serde_json::from_str(&w.conf("1.0.0", &[])).unwrap();
        c["prevResult"] = prev.clone();
        c.to_string()
    };
    let check = w.run(&inv.with_command("CHECK"), &conf_with(r));
    assert!(check.success, "CHECK: {} {}", check.stdout, check.stderr);
    pod.exec(&[
        "ip", "-6", "route", "del", "default", "via", "fe80::1", "dev", "eth0",
    ]);
    let check = w.run(&inv.with_command("CHECK"), &conf_with(r));
    assert!(!check.success);
    assert!(
        check.stdout.contains("default route via fe80::1"),
        "{}",
        check.stdout
    );

    // DEL, twice (containerd does): nothing of the pod is left for anyone.
    for _ in 0..2 {
        let del = w.run(&inv.with_command("DEL"), &conf_with(r));
        assert!(del.success, "DEL: {} {}", del.stdout, del.stderr);
    }
    let (hroutes, hrules) = host_state(&w);
    assert!(!hroutes.contains(POD), "{hroutes}");
    assert!(!hrules.contains("512:"), "{hrules}");
    w.assert_node_clean();
    assert_eq!(w.ipamd.assigned_count(), 0);
    drop(pod);
    w.assert_no_host_veth();
}

#[test]
fn del_without_prev_result_or_namespace_still_removes_an_ipv6_pods_rules() {
    let w = world();
    let pod = TestNs::new("pod6");
    let inv = Invocation::new("ADD", "c-v6-2", &pod.path(), "default", "gone");
    let out = w.run(&inv, &w.conf("1.0.0", &[]));
    assert!(out.success, "ADD failed: {} {}", out.stdout, out.stderr);
    // The namespace is gone first (a runtime that lost it): the veth goes with it, the
    // host's rule stays until DEL, which finds it from ipamd's answer.
    drop(pod);
    w.assert_no_host_veth();
    let del = w.run(&inv.with_command("DEL"), &w.conf("1.0.0", &[]));
    assert!(del.success, "DEL: {} {}", del.stdout, del.stderr);
    let (_, hrules) = host_state(&w);
    assert!(!hrules.contains(POD), "{hrules}");
}

#[test]
fn gc_removes_the_rules_of_ipv6_pods_ipamd_released() {
    let w = world();
    let pod = TestNs::new("pod6");
    let inv = Invocation::new("ADD", "c-v6-3", &pod.path(), "default", "stale");
    assert!(w.run(&inv, &w.conf("1.1.0", &[])).success);
    drop(pod);
    w.assert_no_host_veth();
    let gc = w.run(
        &inv.with_command("GC"),
        &w.conf(
            "1.1.0",
            &[("cni.dev/valid-attachments", serde_json::json!([]))],
        ),
    );
    assert!(gc.success, "GC: {} {}", gc.stdout, gc.stderr);
    let (_, hrules) = host_state(&w);
    assert!(!hrules.contains(POD), "{hrules}");
    assert_eq!(w.ipamd.assigned_count(), 0);
}
