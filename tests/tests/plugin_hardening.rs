//! Odd input from a runtime (issue 13), against the real `aws-cni` binary in a node
//! namespace: a CNI_NETNS that is no network namespace, the node's own, a FIFO or already
//! gone; interfaces the plugin did not make holding its names; a second attachment in
//! one pod; GC without its list; verbs of a CNI version that has none; the log file.
//! Each leaves nothing of a pod behind and touches nothing that is not the plugin's.

use std::net::Ipv4Addr;

use serde_json::{Value, json};
use vpc_cni_tests::fake_ipamd::Call;
use vpc_cni_tests::netns::TestNs;
use vpc_cni_tests::plugin::{Invocation, Output, World};

fn world() -> World {
    World::new(vec![
        ("10.0.9.1".parse::<Ipv4Addr>().unwrap(), 0),
        ("10.0.9.2".parse::<Ipv4Addr>().unwrap(), 1),
        ("10.0.9.3".parse::<Ipv4Addr>().unwrap(), 0),
    ])
}

fn conf(w: &World, extra: &[(&str, Value)]) -> String {
    w.conf("1.0.0", extra)
}

fn counts(w: &World) -> (usize, usize, usize) {
    let calls = w.ipamd.calls();
    (
        calls.iter().filter(|c| matches!(c, Call::Add(_))).count(),
        calls.iter().filter(|c| matches!(c, Call::Del(_))).count(),
        calls.iter().filter(|c| matches!(c, Call::Gc(_))).count(),
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
}

/// The node's own interface and default route, as the test node was built.
fn node_intact(w: &World) {
    let eth0 = w.node.ns.exec(&["ip", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        eth0.contains(&w.node.primary_ip),
        "the node's eth0 was changed: {eth0}"
    );
}

fn add(w: &World, c: &str, netns: &str, pod: &str) -> Output {
    w.run(&Invocation::new("ADD", c, netns, "d", pod), &conf(w, &[]))
}

fn del(w: &World, c: &str, netns: &str, pod: &str) -> Output {
    w.run(&Invocation::new("DEL", c, netns, "d", pod), &conf(w, &[]))
}

#[test]
fn del_with_a_netns_that_is_not_one_tears_down_then_releases() {
    let w = world();
    let dir = w.ipamd.dir.join("odd");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    for (i, odd) in [
        file.display().to_string(),
        dir.display().to_string(),
        "/proc/self/ns/mnt".to_string(),
    ]
    .iter()
    .enumerate()
    {
        let pod = TestNs::new("pod");
        let c = format!("c{i}");
        let p = format!("p{i}");
        assert!(add(&w, &c, &pod.path(), &p).success);
        // The runtime sends DEL with a path that is not a network namespace.
        let out = del(&w, &c, odd, &p);
        assert!(out.success, "DEL with CNI_NETNS={odd}: {}", out.stdout);
        w.assert_node_clean();
        // No namespace to take the pair along: deleted.
        w.assert_no_host_veth();
        assert_eq!(w.ipamd.assigned_count(), 0, "released");
        // And again: still fine, nothing to do.
        assert!(del(&w, &c, odd, &p).success);
    }
    node_intact(&w);
}

#[test]
fn the_nodes_own_namespace_is_never_a_pods() {
    let w = world();
    let own = "/proc/self/ns/net";
    let out = add(&w, "c1", own, "p");
    assert_error(&out, 4, "this node's own network namespace");
    assert_eq!(counts(&w), (0, 0, 0), "no address taken");
    node_intact(&w);
    // DEL neither enters it nor removes its eth0.
    assert!(del(&w, "c1", own, "p").success);
    node_intact(&w);
    let mut check = Invocation::new("CHECK", "c1", own, "d", "p");
    check.if_name = "eth0".into();
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": own}],
        "ips": [{"address": "10.0.9.1/32", "interface": 0}],
    });
    let out = w.run(&check, &conf(&w, &[("prevResult", prev)]));
    assert_error(&out, 4, "this node's own network namespace");
    node_intact(&w);
}

#[test]
fn interfaces_the_plugin_did_not_make_are_left_alone() {
    let w = world();
    let pod = TestNs::new("pod");
    // A veth pair inside the pod holding eth0: someone else's.
    pod.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ]);
    let out = add(&w, "c1", &pod.path(), "p");
    assert_error(&out, 100, "not this plugin's veth");
    assert!(pod.try_exec(&["ip", "link", "show", "eth0"]));
    assert_eq!(counts(&w), (0, 0, 0));
    // The host veth's name held by a bridge on the node.
    let pod2 = TestNs::new("pod");
    let name = vpc_cni_proto::host_veth_name("eni", "d", "p2");
    w.node
        .ns
        .exec(&["ip", "link", "add", &name, "type", "bridge"]);
    let out = add(&w, "c2", &pod2.path(), "p2");
    assert_error(&out, 100, "not a veth");
    assert!(
        w.node.ns.try_exec(&["ip", "link", "show", &name]),
        "the bridge stays"
    );
    // DEL does not delete it either.
    assert!(del(&w, "c2", &pod2.path(), "p2").success);
    assert!(
        w.node.ns.try_exec(&["ip", "link", "show", &name]),
        "the bridge stays"
    );
    w.node.ns.exec(&["ip", "link", "del", &name]);
    assert_eq!(counts(&w).0, 0, "no address taken");
}

#[test]
fn a_fifo_never_hangs_the_plugin() {
    let w = world();
    let fifo = w.ipamd.dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let f = fifo.to_str().unwrap();
    // As CNI_NETNS: ADD refuses it at once, DEL succeeds.
    assert_error(&add(&w, "c1", f, "p"), 4, "not a network namespace");
    assert!(del(&w, "c1", f, "p").success);
    // As pluginLogFile: the plugin works, without a log.
    let pod = TestNs::new("pod");
    let out = w.run(
        &Invocation::new("ADD", "c2", &pod.path(), "d", "p2"),
        &conf(&w, &[("pluginLogFile", json!(f))]),
    );
    assert!(out.success, "{}", out.stdout);
    assert!(
        w.run(
            &Invocation::new("DEL", "c2", &pod.path(), "d", "p2"),
            &conf(&w, &[("pluginLogFile", json!(f))]),
        )
        .success
    );
    w.assert_node_clean();
    drop(pod);
    w.assert_no_host_veth();
}

#[test]
fn del_after_the_netns_is_gone_leaves_no_host_route() {
    let w = world();
    let pod = TestNs::new("pod");
    assert!(add(&w, "c1", &pod.path(), "p").success);
    // The runtime removed the namespace's path, but the namespace lives on a moment
    // (something still holds it): its veth, and the host /32 route to it, are still there.
    let mut holder = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.name, "sleep", "30"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let path = pod.path();
    std::process::Command::new("ip")
        .args(["netns", "del", &pod.name])
        .output()
        .unwrap();
    assert!(!std::path::Path::new(&path).exists());
    assert!(del(&w, "c1", &path, "p").success);
    w.assert_node_clean();
    w.assert_no_host_veth();
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn a_second_attachment_in_one_pod_leaves_the_first_alone() {
    let w = world();
    let pod = TestNs::new("pod");
    let first = add(&w, "c1", &pod.path(), "p");
    assert!(first.success);
    let mut net1 = Invocation::new("ADD", "c1", &pod.path(), "d", "p");
    net1.if_name = "net1".into();
    let second = w.run(&net1, &conf(&w, &[]));
    assert!(second.success, "{}", second.stdout);
    let ip1 = first.json["ips"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    let ip2 = second.json["ips"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(ip1, ip2);
    let eth0_veth = vpc_cni_proto::host_veth_name("eni", "d", "p");
    let net1_veth = vpc_cni_proto::pod_veth_name("eni", "d", "p", "net1");
    assert_ne!(eth0_veth, net1_veth);
    for v in [&eth0_veth, &net1_veth] {
        assert!(w.node.ns.try_exec(&["ip", "link", "show", v]), "{v} exists");
    }
    // eth0 keeps the pod's default route; both addresses are routed to their own veth.
    let routes = pod.exec(&["ip", "route", "show"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    let host = w.node.ns.exec(&["ip", "route", "show"]);
    let ip1 = ip1.trim_end_matches("/32");
    let ip2 = ip2.trim_end_matches("/32");
    assert!(host.contains(&format!("{ip1} dev {eth0_veth}")), "{host}");
    assert!(host.contains(&format!("{ip2} dev {net1_veth}")), "{host}");
    // Removing net1 leaves eth0 as it was.
    let mut del1 = net1.clone();
    del1.command = "DEL".into();
    assert!(w.run(&del1, &conf(&w, &[])).success);
    assert!(w.node.ns.try_exec(&["ip", "link", "show", &eth0_veth]));
    assert!(
        pod.exec(&["ip", "route", "show"])
            .contains("default via 169.254.1.1 dev eth0")
    );
    assert!(del(&w, "c1", &pod.path(), "p").success);
    w.assert_node_clean();
}

#[test]
fn gc_without_its_list_and_verbs_of_older_versions_are_refused() {
    let w = world();
    let pod = TestNs::new("pod");
    assert!(add(&w, "c1", &pod.path(), "p").success);
    // cnitool sends GC without cni.dev/valid-attachments: that is not "release all".
    let gc = Invocation::new("GC", "", "", "", "");
    let out = w.run(&gc, &w.conf("1.1.0", &[]));
    assert_error(&out, 7, "cni.dev/valid-attachments");
    assert_eq!(counts(&w).2, 0, "nothing asked of ipamd");
    assert_eq!(w.ipamd.assigned_count(), 1, "nothing released");
    // STATUS and GC do not exist before 1.1.0.
    for (verb, v) in [("STATUS", "1.0.0"), ("GC", "0.4.0")] {
        let out = w.run(
            &Invocation::new(verb, "", "", "", ""),
            &w.conf(v, &[("cni.dev/valid-attachments", json!([]))]),
        );
        assert_error(&out, 1, "1.1.0");
    }
    assert_eq!(w.ipamd.assigned_count(), 1);
    assert!(del(&w, "c1", &pod.path(), "p").success);
}

#[test]
fn the_log_file_is_private_and_its_path_absolute() {
    use std::os::unix::fs::PermissionsExt;
    let w = world();
    let pod = TestNs::new("pod");
    let log = w.ipamd.dir.join("private.log");
    let out = w.run(
        &Invocation::new("ADD", "c1", &pod.path(), "d", "p"),
        &conf(&w, &[("pluginLogFile", json!(log))]),
    );
    assert!(out.success, "{}", out.stdout);
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "log file mode {mode:o}");
    let out = w.run(
        &Invocation::new("DEL", "c1", &pod.path(), "d", "p"),
        &conf(&w, &[("pluginLogFile", json!("logs/plugin.log"))]),
    );
    assert_error(&out, 7, "absolute");
    assert!(del(&w, "c1", &pod.path(), "p").success);
}
