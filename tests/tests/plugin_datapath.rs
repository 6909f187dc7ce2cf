//! The real `aws-cni` binary, run as containerd runs it, against a node netns and pod
//! netns; what it built is read back with netlink. Needs root.

use std::net::Ipv4Addr;

use netlink_state::*;
use serde_json::json;
use vpc_cni_netlink::{MAIN_TABLE, Netlink, format_mac};
use vpc_cni_proto::host_veth_name;
use vpc_cni_tests::fake_ipamd::Call;
use vpc_cni_tests::netns::TestNs;
use vpc_cni_tests::plugin::{Invocation, World};

/// The pod's gateway (compat.md section 4).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

mod netlink_state {
    use super::*;
    use vpc_cni_netlink::NeighbourState;

    /// What the kernel holds for one pod, read with netlink.
    #[derive(Debug)]
    pub struct PodState {
        pub pod_if_mac: Option<String>,
        pub pod_addrs: Vec<(Ipv4Addr, u8)>,
        pub pod_gw_route: bool,
        pub pod_default_route: bool,
        pub pod_neigh: Option<(String, bool)>,
        pub host_veth_mac: Option<String>,
        pub host_veth_up: bool,
        pub host_route: bool,
        pub rule_to: bool,
        pub rule_from_table: Option<u32>,
    }

    pub async fn read(node: &Netlink, pod: Option<&Netlink>, veth: &str, ip: Ipv4Addr) -> PodState {
        let mut s = PodState {
            pod_if_mac: None,
            pod_addrs: vec![],
            pod_gw_route: false,
            pod_default_route: false,
            pod_neigh: None,
            host_veth_mac: None,
            host_veth_up: false,
            host_route: false,
            rule_to: false,
            rule_from_table: None,
        };
        let host_link = node.link(veth).await.unwrap();
        s.host_veth_mac = host_link.as_ref().map(|l| l.mac_string());
        s.host_veth_up = host_link.as_ref().is_some_and(|l| l.up);
        if let Some(hl) = &host_link {
            s.host_route = node.routes().await.unwrap().iter().any(|r| {
                r.table == MAIN_TABLE && r.dst == ip && r.dst_len == 32 && r.oif == Some(hl.index)
            });
        }
        for r in node.rules().await.unwrap() {
            if r.priority == 512 && r.to == Some((ip, 32)) && r.table == MAIN_TABLE {
                s.rule_to = true;
            }
            if r.priority == 1536 && r.from == Some((ip, 32)) {
                s.rule_from_table = Some(r.table);
            }
        }
        if let Some(pod) = pod
            && let Some(pl) = pod.link("eth0").await.unwrap()
        {
            s.pod_if_mac = Some(pl.mac_string());
            s.pod_addrs = pod.ipv4_addresses(pl.index).await.unwrap();
            let routes = pod.routes().await.unwrap();
            s.pod_gw_route = routes.iter().any(|r| {
                r.table == MAIN_TABLE
                    && r.dst == GATEWAY
                    && r.dst_len == 32
                    && r.gateway.is_none()
                    && r.oif == Some(pl.index)
            });
            s.pod_default_route = routes.iter().any(|r| {
                r.table == MAIN_TABLE
                    && r.dst_len == 0
                    && r.gateway == Some(GATEWAY)
                    && r.oif == Some(pl.index)
            });
            s.pod_neigh = pod
                .neighbours(pl.index)
                .await
                .unwrap()
                .into_iter()
                .find(|(n, _, _)| *n == GATEWAY)
                .map(|(_, mac, st)| (format_mac(&mac), st == NeighbourState::Permanent));
        }
        s
    }

    impl PodState {
        /// What DEL leaves while the pod's namespace exists: its veth pair, the host end
        /// down, with no route and no rule: nothing any pod can use.
        pub fn torn_down(&self) -> bool {
            !self.host_veth_up
                && !self.host_route
                && !self.rule_to
                && self.rule_from_table.is_none()
        }

        pub fn nothing_left(&self) -> bool {
            self.pod_if_mac.is_none()
                && self.host_veth_mac.is_none()
                && !self.host_route
                && !self.rule_to
                && self.rule_from_table.is_none()
        }
    }
}

/// What the kernel holds for one pod, read with netlink inside the test's namespaces.
fn state(w: &World, pod: Option<&TestNs>, veth: &str, ip: Ipv4Addr) -> PodState {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let node = w.node.ns.netlink();
        let pod_nl = pod.map(|p| p.netlink());
        read(&node, pod_nl.as_ref(), veth, ip).await
    })
}

/// DEL left the pod's datapath torn down; once the runtime removes the pod's namespace,
/// nothing of it is left (the kernel's clean-up of a namespace runs a moment later).
fn torn_down_then_gone(w: &World, pod: TestNs, veth: &str, ip: Ipv4Addr) {
    let s = state(w, Some(&pod), veth, ip);
    assert!(s.torn_down(), "after DEL: {s:?}");
    drop(pod);
    let t = std::time::Instant::now();
    loop {
        let s = state(w, None, veth, ip);
        if s.nothing_left() {
            return;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "5 s after the namespace went: {s:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn add_builds_the_datapath_and_del_removes_it() {
    let w = World::new(vec![(ip("10.0.1.10"), 0)]);
    let pod = TestNs::new("pod");
    let inv = Invocation::new("ADD", "c-add-1", &pod.path(), "default", "nginx");
    let out = w.run(&inv, &w.conf("1.0.0", &[]));
    assert!(out.success, "ADD failed: {} {}", out.stdout, out.stderr);

    let veth = host_veth_name("eni", "default", "nginx");
    let s = state(&w, Some(&pod), &veth, ip("10.0.1.10"));
    assert_eq!(s.pod_addrs, vec![(ip("10.0.1.10"), 32)]);
    assert!(s.pod_gw_route, "169.254.1.1/32 scope link route: {s:?}");
    assert!(s.pod_default_route, "default via 169.254.1.1: {s:?}");
    let host_mac = s.host_veth_mac.clone().expect("host veth exists");
    assert_eq!(
        s.pod_neigh,
        Some((host_mac.clone(), true)),
        "PERMANENT neighbour -> host veth MAC"
    );
    assert!(s.host_route, "host IP/32 route: {s:?}");
    assert!(s.rule_to, "rule to IP lookup main pref 512: {s:?}");
    assert_eq!(
        s.rule_from_table, None,
        "primary-ENI address has no from-rule"
    );

    // The 1.0.0 result: MACs on every interface, the address on the sandbox interface.
    let r = &out.json;
    assert_eq!(r["cniVersion"], "1.0.0");
    assert_eq!(r["interfaces"][0]["name"], veth.as_str());
    assert_eq!(r["interfaces"][0]["mac"], host_mac.as_str());
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    assert_eq!(
        r["interfaces"][1]["mac"],
        s.pod_if_mac.clone().unwrap().as_str()
    );
    assert_eq!(r["interfaces"][1]["sandbox"], pod.path().as_str());
    assert_eq!(r["ips"][0]["address"], "10.0.1.10/32");
    assert_eq!(r["ips"][0]["interface"], 1);
    assert!(r["ips"][0].get("version").is_none());

    // ipamd saw the pod's identity from CNI_ARGS.
    let calls = w.ipamd.calls();
    let Call::Add(req) = &calls[0] else {
        panic!("{calls:?}")
    };
    assert_eq!(
        (req.k8s_pod_namespace.as_str(), req.k8s_pod_name.as_str()),
        ("default", "nginx")
    );
    assert_eq!(req.container_id, "c-add-1");
    assert_eq!(req.network_name, "aws-cni");
    assert_eq!(req.netns, pod.path());

    // CHECK with the result passes.
    let check = w.run(
        &inv.with_command("CHECK"),
        &w.conf("1.0.0", &[("prevResult", out.json.clone())]),
    );
    assert!(check.success, "CHECK: {}", check.stdout);

    // DEL (first, from StopPodSandbox: netns and prevResult).
    let del = w.run(
        &inv.with_command("DEL"),
        &w.conf("1.0.0", &[("prevResult", out.json.clone())]),
    );
    assert!(del.success, "DEL: {}", del.stdout);
    assert!(del.stdout.is_empty(), "DEL prints nothing: {}", del.stdout);
    let s = state(&w, Some(&pod), &veth, ip("10.0.1.10"));
    assert!(s.torn_down(), "left usable: {s:?}");
    assert_eq!(w.ipamd.assigned_count(), 0);

    // Repeated DEL, then containerd's second DEL: empty CNI_NETNS, no prevResult.
    assert!(
        w.run(&inv.with_command("DEL"), &w.conf("1.0.0", &[]))
            .success
    );
    let mut second = inv.with_command("DEL");
    second.netns = String::new();
    let out = w.run(&second, &w.conf("1.0.0", &[]));
    assert!(out.success, "second DEL: {}", out.stdout);
    torn_down_then_gone(&w, pod, &veth, ip("10.0.1.10"));
}

#[test]
fn secondary_eni_address_gets_its_from_rule() {
    let mut w = World::new(vec![(ip("10.0.2.20"), 2)]);
    let pod = TestNs::new("pod");
    let inv = Invocation::new("ADD", "c-sec-1", &pod.path(), "kube-system", "coredns-1");
    let out = w.run(&inv, &w.conf("1.0.0", &[]));
    assert!(out.success, "{}", out.stdout);
    let veth = host_veth_name("eni", "kube-system", "coredns-1");
    let s = state(&w, Some(&pod), &veth, ip("10.0.2.20"));
    assert_eq!(
        s.rule_from_table,
        Some(3),
        "from IP lookup <device number + 1> pref 1536"
    );
    assert!(s.rule_to);
    // ipamd unreachable: DEL tears down from prevResult and still succeeds.
    w.ipamd.stop();
    let del = w.run(
        &inv.with_command("DEL"),
        &w.conf("1.0.0", &[("prevResult", out.json.clone())]),
    );
    assert!(del.success, "DEL with ipamd down: {}", del.stdout);
    torn_down_then_gone(&w, pod, &veth, ip("10.0.2.20"));
}

#[test]
fn del_with_ipamd_down_and_no_prev_result_uses_the_netns() {
    let mut w = World::new(vec![(ip("10.0.2.21"), 1)]);
    let pod = TestNs::new("pod");
    let inv = Invocation::new("ADD", "c-nop-1", &pod.path(), "default", "nop");
    assert!(w.run(&inv, &w.conf("0.4.0", &[])).success);
    w.ipamd.stop();
    let del = w.run(&inv.with_command("DEL"), &w.conf("0.4.0", &[]));
    assert!(del.success, "{}", del.stdout);
    let veth = host_veth_name("eni", "default", "nop");
    torn_down_then_gone(&w, pod, &veth, ip("10.0.2.21"));
}

#[test]
fn two_pods_reach_each_other_and_the_node() {
    let w = World::new(vec![(ip("10.0.1.11"), 0), (ip("10.0.3.12"), 1)]);
    let a = TestNs::new("pod");
    let b = TestNs::new("pod");
    let ia = Invocation::new("ADD", "c-ping-a", &a.path(), "default", "ping-a");
    let ib = Invocation::new("ADD", "c-ping-b", &b.path(), "default", "ping-b");
    assert!(w.run(&ia, &w.conf("1.0.0", &[])).success);
    assert!(w.run(&ib, &w.conf("1.0.0", &[])).success);
    let ping = |ns: &TestNs, dst: &str| ns.try_exec(&["ping", "-c", "1", "-W", "2", dst]);
    assert!(ping(&a, "10.0.3.12"), "pod a -> pod b");
    assert!(ping(&b, "10.0.1.11"), "pod b (secondary ENI) -> pod a");
    assert!(ping(&w.node.ns, "10.0.1.11"), "node -> pod a");
    assert!(ping(&w.node.ns, "10.0.3.12"), "node -> pod b");
    assert!(ping(&a, &w.node.primary_ip), "pod a -> node primary IP");
    for (inv, ns) in [(&ia, &a), (&ib, &b)] {
        assert!(
            w.run(&inv.with_command("DEL"), &w.conf("1.0.0", &[]))
                .success
        );
        assert!(
            !ns.try_exec(&["ping", "-c", "1", "-W", "1", &w.node.primary_ip]),
            "a deleted pod reaches nothing"
        );
    }
    assert!(!ping(&w.node.ns, "10.0.1.11"), "no route to a deleted pod");
    torn_down_then_gone(
        &w,
        a,
        &host_veth_name("eni", "default", "ping-a"),
        ip("10.0.1.11"),
    );
    torn_down_then_gone(
        &w,
        b,
        &host_veth_name("eni", "default", "ping-b"),
        ip("10.0.3.12"),
    );
}

#[test]
fn old_versions_get_their_result_shape() {
    let w = World::new(vec![(ip("10.0.1.30"), 0), (ip("10.0.1.31"), 0)]);
    for (v, cid) in [("0.3.1", "c-v031"), ("0.4.0", "c-v040")] {
        let pod = TestNs::new("pod");
        let inv = Invocation::new("ADD", cid, &pod.path(), "default", cid);
        let out = w.run(&inv, &w.conf(v, &[]));
        assert!(out.success, "{v}: {}", out.stdout);
        assert_eq!(out.json["cniVersion"], v);
        assert_eq!(out.json["ips"][0]["version"], "4", "{v} has ips[].version");
        assert!(out.json["interfaces"][0]["mac"].as_str().unwrap().len() == 17);
        assert!(
            w.run(
                &inv.with_command("DEL"),
                &w.conf(v, &[("prevResult", out.json.clone())])
            )
            .success
        );
    }
    // CHECK does not exist before 0.4.0.
    let pod = TestNs::new("pod");
    let inv = Invocation::new("CHECK", "c-x", &pod.path(), "default", "x");
    let out = w.run(&inv, &w.conf("0.3.1", &[("prevResult", json!({}))]));
    assert_eq!(out.code(), Some(1), "{}", out.stdout);
}

#[test]
fn add_appends_to_a_prev_result_in_a_chain() {
    let w = World::new(vec![(ip("10.0.1.40"), 0)]);
    let pod = TestNs::new("pod");
    let prev = json!({"cniVersion":"1.0.0","interfaces":[{"name":"lo","sandbox":pod.path()}],
                      "ips":[],"dns":{"nameservers":["10.0.0.2"]}});
    let inv = Invocation::new("ADD", "c-chain", &pod.path(), "default", "chain");
    let out = w.run(&inv, &w.conf("1.0.0", &[("prevResult", prev)]));
    assert!(out.success, "{}", out.stdout);
    // lo, then ours: host veth, eth0, upstream's dummy.
    assert_eq!(out.json["interfaces"].as_array().unwrap().len(), 4);
    assert_eq!(out.json["interfaces"][0]["name"], "lo");
    assert_eq!(out.json["ips"][0]["interface"], 2);
    assert_eq!(out.json["dns"]["nameservers"][0], "10.0.0.2");
    assert!(
        w.run(&inv.with_command("DEL"), &w.conf("1.0.0", &[]))
            .success
    );
}

#[test]
fn check_reports_a_tampered_datapath() {
    let w = World::new(vec![(ip("10.0.1.50"), 0)]);
    let pod = TestNs::new("pod");
    let inv = Invocation::new("ADD", "c-chk", &pod.path(), "default", "chk");
    let out = w.run(&inv, &w.conf("1.0.0", &[]));
    assert!(out.success);
    let conf = w.conf("1.0.0", &[("prevResult", out.json.clone())]);
    assert!(w.run(&inv.with_command("CHECK"), &conf).success);
    pod.exec(&["ip", "neigh", "del", "169.254.1.1", "dev", "eth0"]);
    let bad = w.run(&inv.with_command("CHECK"), &conf);
    assert_eq!(bad.code(), Some(102), "{}", bad.stdout);
    assert!(
        bad.json["details"]
            .as_str()
            .unwrap()
            .contains("PERMANENT neighbour"),
        "{}",
        bad.stdout
    );
    let no_prev = w.run(&inv.with_command("CHECK"), &w.conf("1.0.0", &[]));
    assert_eq!(no_prev.code(), Some(7));
    assert!(w.run(&inv.with_command("DEL"), &conf).success);
}

#[test]
fn repeated_add_for_one_sandbox_is_idempotent() {
    let w = World::new(vec![(ip("10.0.1.60"), 1), (ip("10.0.1.61"), 1)]);
    let pod = TestNs::new("pod");
    let inv = Invocation::new("ADD", "c-twice", &pod.path(), "default", "twice");
    let first = w.run(&inv, &w.conf("1.0.0", &[]));
    let second = w.run(&inv, &w.conf("1.0.0", &[]));
    assert!(
        first.success && second.success,
        "{} / {}",
        first.stdout,
        second.stdout
    );
    assert_eq!(first.json["ips"], second.json["ips"]);
    assert!(pod.try_exec(&["ping", "-c", "1", "-W", "2", "192.168.0.10"]));
    assert!(
        w.run(&inv.with_command("DEL"), &w.conf("1.0.0", &[]))
            .success
    );
    let veth = host_veth_name("eni", "default", "twice");
    torn_down_then_gone(&w, pod, &veth, ip("10.0.1.60"));
}

#[test]
fn status_reflects_ipamd_health() {
    use vpc_cni_proto::health::health_check_response::ServingStatus;
    let mut w = World::new(Vec::<(Ipv4Addr, i32)>::new());
    let inv = Invocation::new("STATUS", "", "", "", "");
    let ok = w.run(&inv, &w.conf("1.1.0", &[]));
    assert!(ok.success, "{}", ok.stdout);
    w.ipamd.set_health(ServingStatus::NotServing);
    let busy = w.run(&inv, &w.conf("1.1.0", &[]));
    assert_eq!(busy.code(), Some(50), "{}", busy.stdout);
    w.ipamd.stop();
    let down = w.run(&inv, &w.conf("1.1.0", &[]));
    assert_eq!(down.code(), Some(50), "{}", down.stdout);
    assert!(down.msg().contains("unreachable"), "{}", down.msg());
}

#[test]
fn gc_releases_what_the_runtime_no_longer_knows() {
    let w = World::new(vec![(ip("10.0.1.70"), 1), (ip("10.0.1.71"), 1)]);
    let keep = TestNs::new("pod");
    let gone = TestNs::new("pod");
    let ik = Invocation::new("ADD", "c-keep", &keep.path(), "default", "keep");
    let ig = Invocation::new("ADD", "c-gone", &gone.path(), "default", "gone");
    assert!(w.run(&ik, &w.conf("1.1.0", &[])).success);
    assert!(w.run(&ig, &w.conf("1.1.0", &[])).success);
    drop(gone); // the sandbox vanished without a DEL
    let gc = Invocation::new("GC", "", "", "", "");
    let out = w.run(
        &gc,
        &w.conf(
            "1.1.0",
            &[(
                "cni.dev/valid-attachments",
                json!([{"containerID":"c-keep","ifname":"eth0"}]),
            )],
        ),
    );
    assert!(out.success, "{}", out.stdout);
    assert_eq!(w.ipamd.assigned_count(), 1);
    let veth = host_veth_name("eni", "default", "gone");
    let s = state(&w, None, &veth, ip("10.0.1.71"));
    assert!(
        !s.rule_to && s.rule_from_table.is_none(),
        "stale rules removed: {s:?}"
    );
    let kept = state(
        &w,
        Some(&keep),
        &host_veth_name("eni", "default", "keep"),
        ip("10.0.1.70"),
    );
    assert!(
        kept.rule_to && kept.host_route,
        "live pod untouched: {kept:?}"
    );
    assert!(
        w.run(&ik.with_command("DEL"), &w.conf("1.1.0", &[]))
            .success
    );
}

#[test]
fn an_address_reused_while_the_old_namespace_lives_is_the_new_pods() {
    // DEL leaves pod a's pair (down) until its namespace goes; ipamd hands the address to
    // pod b at once. b must own it: reachable from the node, its rules intact after a's
    // DEL is repeated (a's interface still shows the address).
    let w = World::new(vec![(ip("10.0.2.30"), 2)]);
    let a = TestNs::new("pod");
    let b = TestNs::new("pod");
    let ia = Invocation::new("ADD", "c-reuse-a", &a.path(), "default", "reuse-a");
    let ib = Invocation::new("ADD", "c-reuse-b", &b.path(), "default", "reuse-b");
    assert!(w.run(&ia, &w.conf("1.0.0", &[])).success);
    assert!(
        w.run(&ia.with_command("DEL"), &w.conf("1.0.0", &[]))
            .success
    );
    let out = w.run(&ib, &w.conf("1.0.0", &[]));
    assert!(out.success, "{}", out.stdout);
    assert_eq!(out.json["ips"][0]["address"], "10.0.2.30/32");
    assert!(
        a.exec(&["ip", "-o", "addr", "show", "eth0"])
            .contains("10.0.2.30/32")
    );
    for _ in 0..2 {
        assert!(
            w.run(&ia.with_command("DEL"), &w.conf("1.0.0", &[]))
                .success
        );
    }
    let vb = host_veth_name("eni", "default", "reuse-b");
    let s = state(&w, Some(&b), &vb, ip("10.0.2.30"));
    assert!(
        s.host_veth_up && s.host_route && s.rule_to && s.rule_from_table == Some(3),
        "pod b's datapath after pod a's repeated DEL: {s:?}"
    );
    assert!(
        w.node
            .ns
            .try_exec(&["ping", "-c", "1", "-W", "2", "10.0.2.30"]),
        "node -> pod b"
    );
    assert!(
        b.try_exec(&["ping", "-c", "1", "-W", "2", &w.node.primary_ip]),
        "pod b -> node"
    );
    assert!(
        !a.try_exec(&["ping", "-c", "1", "-W", "1", &w.node.primary_ip]),
        "pod a reaches nothing"
    );
    assert!(
        w.run(&ib.with_command("DEL"), &w.conf("1.0.0", &[]))
            .success
    );
    torn_down_then_gone(
        &w,
        a,
        &host_veth_name("eni", "default", "reuse-a"),
        ip("10.0.2.30"),
    );
    torn_down_then_gone(&w, b, &vb, ip("10.0.2.30"));
}
