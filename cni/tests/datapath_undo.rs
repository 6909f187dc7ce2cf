//! The library's rollback: after a full `setup`, `undo_setup` leaves nothing of the pod
//! on the node, so a failure at any later step of ADD is cleaned up completely.

use aws_cni::datapath::{self, PodSpec};
use aws_cni::netns::NetNs;
use vpc_cni_tests::netns::{Node, TestNs};
use vpc_cni_tests::require_root;

#[test]
fn undo_after_a_complete_setup_leaves_nothing() {
    require_root();
    let node = Node::new("192.168.0.10");
    let pod = TestNs::new("pod");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let host = node.ns.netlink();
        let pod_nl = pod.netlink();
        let pod_ns = NetNs::open(std::path::Path::new(&pod.path())).unwrap();
        let spec = PodSpec {
            host_veth: "enitestundo01".into(),
            if_name: "eth0".into(),
            ip: "10.0.5.5".parse().unwrap(),
            mtu: 1500,
            table: Some(4),
        };
        // The host end must be created from inside the node namespace.
        let built = datapath::setup(&host, &pod_nl, pod_ns.raw_fd(), &spec)
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
