//! The library's rollback: after a full `setup`, `undo_setup` leaves nothing of the pod
//! on the node, so a failure at any later step of ADD is cleaned up completely.
//! (Root: it builds a node and a pod namespace with iproute2, removed on drop.)

use std::process::Command;

use aws_cni::datapath::{self, PodSpec};
use vpc_cni_netlink::Netlink;
use vpc_cni_netlink::netns::NetNs;

/// A named network namespace, removed on drop (also when the test fails).
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let ns = Ns(format!("{tag}-{}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        ns
    }
    fn exec(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", &self.0, "ip"];
        full.extend_from_slice(args);
        ip(&full);
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
    fn netlink(&self) -> Netlink {
        let home = NetNs::current().unwrap();
        let ns = NetNs::open(std::path::Path::new(&self.path())).unwrap();
        ns.run_in(&home, Netlink::connect).unwrap().unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn undo_after_a_complete_setup_leaves_nothing() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test builds network namespaces and must run as root"
    );
    let node = Ns::new("undo-node");
    node.exec(&["link", "set", "lo", "up"]);
    let pod = Ns::new("undo-pod");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let host = node.netlink();
        let pod_nl = pod.netlink();
        let pod_ns = NetNs::open(std::path::Path::new(&pod.path())).unwrap();
        let spec = PodSpec {
            host_veth: "enitestundo01".into(),
            if_name: "eth0".into(),
            ip: "10.0.5.5".parse::<std::net::Ipv4Addr>().unwrap(),
            mtu: 1500,
            table: Some(4),
        };
        // The host end must be created from inside the node namespace.
        let old = datapath::occupants(&host, &pod_nl, &spec).await.unwrap();
        let in_pod = |_: &mut dyn FnMut() -> std::io::Result<()>| Ok(());
        let built = datapath::setup(&host, &pod_nl, pod_ns.raw_fd(), &in_pod, &spec, &old, &[])
            .await
            .unwrap();
        assert_eq!(built.pod.mtu, 1500);
        assert!(
            datapath::check(&host, &pod_nl, &spec)
                .await
                .unwrap()
                .is_empty()
        );
        datapath::undo_setup(&host, &spec).await.unwrap();
        assert!(host.link("enitestundo01").await.unwrap().is_none());
        assert!(pod_nl.link("eth0").await.unwrap().is_none());
        let rules = host.rules().await.unwrap();
        assert!(
            !rules
                .iter()
                .any(|r| r.priority == 512 || r.priority == 1536),
            "{rules:?}"
        );
        // Undo is idempotent.
        datapath::undo_setup(&host, &spec).await.unwrap();
    });
}
