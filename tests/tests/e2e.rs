//! End to end on the emulated VPC lab: containerd's CRI runs pod sandboxes, containerd
//! calls aws-cni, aws-cni calls ipamd, ipamd calls the EC2 emulator, and packets cross the
//! VPC fabric between nodes and out to the internet host.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;

use vpc_cni_tests::cri::PodSpec;
use vpc_cni_tests::lab::{INTERNET_ADDR, Lab, in_fabric, in_netns, pod_netns};

/// Where a TCP connection from the pod at `from` (a netns path) to `to:port` arrives from,
/// as seen by a listener in the namespace `listen_ns`.
fn arrives_from(from: &str, listen_ns: &str, to: Ipv4Addr, port: u16) -> Ipv4Addr {
    let l = in_netns(listen_ns, move || {
        TcpListener::bind(("0.0.0.0", port)).unwrap()
    });
    let c = in_netns(from, move || {
        TcpStream::connect_timeout(&(to, port).into(), Duration::from_secs(5))
    });
    let _c = c.unwrap_or_else(|e| panic!("connect {to}:{port}: {e}"));
    let (_, peer) = l.accept().unwrap();
    match peer.ip() {
        std::net::IpAddr::V4(a) => a,
        other => panic!("{other}"),
    }
}

fn ping(ns_path: &str, to: Ipv4Addr) -> bool {
    let name = ns_path.trim_start_matches("/var/run/netns/");
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            name,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            &to.to_string(),
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn ipamd_pods(node: &vpc_cni_tests::lab::LabNode) -> serde_json::Value {
    ipamd::cli::http_get(&node.introspection(), "/v1/pods").unwrap()
}

#[test]
fn pods_reach_each_other_across_nodes_and_the_internet_through_snat() {
    vpc_cni_tests::require_root();
    in_fabric(async |fabric| {
        let t0 = std::time::Instant::now();
        let lab = Lab::start(&fabric, 2, "t3.medium", &[]).await;
        let mut pods = Vec::new(); // (node, sandbox id, ip, netns)
        for (node, name) in [(0, "a"), (0, "b"), (1, "c")] {
            let cri = lab.nodes[node].cri().await;
            let id = cri
                .run(&PodSpec::new("default", name))
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "RunPodSandbox {name}: {e}\n{}\n{}",
                        lab.nodes[node].ipamd_log(),
                        lab.nodes[node].containerd.as_ref().unwrap().log()
                    )
                });
            let ip: Ipv4Addr = cri.ip(&id).await.unwrap().parse().unwrap();
            let ns = pod_netns(ip).expect("pod netns");
            let (holder, _) = lab.holder(ip).await.expect("EC2 holds the address");
            assert_eq!(holder, node, "{ip} is on the ENI of the pod's node");
            pods.push((node, id, ip, ns));
            eprintln!("pod {name}: {ip} at {:?}", t0.elapsed());
        }
        // Same node, and across the fabric: the pod's own address arrives (no NAT).
        let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
        assert_eq!(arrives_from(&a.3, &b.3, b.2, 7001), a.2);
        assert_eq!(arrives_from(&a.3, &c.3, c.2, 7002), a.2);
        assert_eq!(arrives_from(&c.3, &b.3, b.2, 7003), c.2);
        assert!(ping(&a.3, c.2) && ping(&c.3, a.2));
        // The node reaches its pods.
        assert!(ping(&lab.nodes[0].ns_path(), a.2));
        assert!(ping(&lab.nodes[1].ns_path(), c.2));
        // The internet host sees the node's primary address (SNAT).
        let inet = format!("/var/run/netns/{}", lab.internet);
        let internet: Ipv4Addr = INTERNET_ADDR.parse().unwrap();
        assert_eq!(
            arrives_from(&a.3, &inet, internet, 8080),
            lab.nodes[0].primary_ip
        );
        assert_eq!(
            arrives_from(&c.3, &inet, internet, 8081),
            lab.nodes[1].primary_ip
        );
        eprintln!("traffic checked at {:?}", t0.elapsed());
        // containerd's two DELs (Stop with the netns, Remove without) leave nothing.
        let cri = lab.nodes[0].cri().await;
        cri.stop(&b.1).await.unwrap();
        cri.remove(&b.1).await.unwrap();
        let node = &lab.nodes[0];
        let pods_left = ipamd_pods(node);
        assert!(
            !pods_left.to_string().contains(&b.2.to_string()),
            "ipamd still holds it: {pods_left}"
        );
        let routes = node.exec(&["ip", "route", "show"]);
        assert!(!routes.contains(&format!("{} ", b.2)), "{routes}");
        let links = node.exec(&["ip", "-o", "link", "show"]);
        assert_eq!(
            links.lines().filter(|l| l.contains(": eni")).count(),
            1,
            "one pod veth left on node1: {links}"
        );
        assert!(
            !std::path::Path::new(&b.3).exists(),
            "the pod netns is gone"
        );
        let log = std::fs::read_to_string(node.dir.join("plugin.log")).unwrap_or_default();
        assert!(!log.contains("\"level\":\"error\""), "{log}");
        eprintln!("double DEL checked at {:?}", t0.elapsed());
        lab.shutdown().await;
        eprintln!("lab down at {:?}", t0.elapsed());
    });
}
