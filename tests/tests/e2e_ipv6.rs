//! IPv6 mode end to end on the emulated VPC lab, seeded dual-stack: containerd calls
//! aws-cni and egress-cni, ipamd (ENABLE_IPv6) hands out /128s of each node's /80, and
//! packets cross the fabric between nodes, to the internet host over IPv6 directly, and
//! to it over IPv4 through the egress path, leaving from the node's primary IPv4.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use vpc_cni_tests::cri::PodSpec;
use vpc_cni_tests::lab::{INTERNET_ADDR, INTERNET6_ADDR, Lab, in_fabric, in_netns, pod_netns};

const V6: [(&str, &str); 3] = [
    ("ENABLE_IPv6", "true"),
    ("ENABLE_IPv4", "false"),
    ("ENABLE_PREFIX_DELEGATION", "true"),
];

/// Where a TCP connection from the namespace `from` to `to` arrives from, as a listener
/// in `listen_ns` sees it.
fn arrives_from(from: &str, listen_ns: &str, to: SocketAddr) -> IpAddr {
    let bind: SocketAddr = if to.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, to.port()).into()
    } else {
        ([0, 0, 0, 0], to.port()).into()
    };
    let l = in_netns(listen_ns, move || TcpListener::bind(bind).unwrap());
    let c = in_netns(from, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5))
    });
    let _c = c.unwrap_or_else(|e| panic!("connect {to}: {e}"));
    let (_, peer) = l.accept().unwrap();
    peer.ip()
}

fn ping6(ns_path: &str, to: Ipv6Addr) -> bool {
    let name = ns_path.trim_start_matches("/var/run/netns/");
    std::process::Command::new("ip")
        .args(["netns", "exec", name, "ping", "-6", "-c", "1", "-W", "2"])
        .arg(to.to_string())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn exec_in(ns_path: &str, args: &[&str]) -> String {
    let name = ns_path.trim_start_matches("/var/run/netns/");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", name])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ipv6_pods_reach_each_other_the_node_and_both_internets_and_double_del_leaves_nothing() {
    vpc_cni_tests::require_root();
    in_fabric(async |fabric| {
        let t0 = std::time::Instant::now();
        let lab = Lab::start_seeded(&fabric, 2, "m5.large", &V6, &["--ipv6"]).await;
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
            let ip: Ipv6Addr = cri.ip(&id).await.unwrap().parse().unwrap();
            let ns = pod_netns(ip).expect("pod netns");
            pods.push((node, id, ip, ns));
            eprintln!("pod {name}: {ip} at {:?}", t0.elapsed());
        }
        // Each pod's address is in its node's /80, one prefix per node.
        let enis = lab.enis().await;
        for (node, _, ip, _) in &pods {
            let e = enis
                .iter()
                .find(|e| e.instance == lab.nodes[*node].instance && e.device == 0)
                .unwrap();
            assert_eq!(e.ipv6_prefixes.len(), 1, "{e:?}");
            let (p, len) = e.ipv6_prefixes[0];
            assert_eq!(len, 80);
            assert_eq!(u128::from(*ip) >> 48, u128::from(p) >> 48, "{ip} in {p}/80");
        }
        let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
        let at = |p: &(usize, String, Ipv6Addr, String), port| SocketAddr::from((p.2, port));
        // Same node and across the fabric: the pod's own address arrives (no NAT).
        assert_eq!(arrives_from(&a.3, &b.3, at(b, 7001)), IpAddr::V6(a.2));
        assert_eq!(arrives_from(&a.3, &c.3, at(c, 7002)), IpAddr::V6(a.2));
        assert_eq!(arrives_from(&c.3, &b.3, at(b, 7003)), IpAddr::V6(c.2));
        // The node reaches its pods.
        assert!(ping6(&lab.nodes[0].ns_path(), a.2));
        assert!(ping6(&lab.nodes[1].ns_path(), c.2));
        // The IPv6 internet directly, from the pod's address; the IPv4 internet through
        // the egress path, from the node's primary IPv4.
        let inet = format!("/var/run/netns/{}", lab.internet);
        let inet6: Ipv6Addr = INTERNET6_ADDR.parse().unwrap();
        assert_eq!(
            arrives_from(&a.3, &inet, (inet6, 8080).into()),
            IpAddr::V6(a.2)
        );
        let inet4: std::net::Ipv4Addr = INTERNET_ADDR.parse().unwrap();
        assert_eq!(
            arrives_from(&a.3, &inet, (inet4, 8081).into()),
            IpAddr::V4(lab.nodes[0].primary_ip)
        );
        assert_eq!(
            arrives_from(&c.3, &inet, (inet4, 8082).into()),
            IpAddr::V4(lab.nodes[1].primary_ip)
        );
        // A pod's egress address is no way in: b cannot connect to a's.
        let egress_a = exec_in(&a.3, &["ip", "-4", "-o", "addr", "show", "dev", "v4if0"]);
        let egress_a: std::net::Ipv4Addr = egress_a
            .split_whitespace()
            .nth(3)
            .and_then(|c| c.split('/').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a's v4if0: {egress_a:?}"));
        let _l = in_netns(&a.3, || TcpListener::bind(("0.0.0.0", 7010)).unwrap());
        let refused = in_netns(&b.3, move || {
            TcpStream::connect_timeout(&(egress_a, 7010).into(), Duration::from_secs(3))
        });
        assert!(
            refused.is_err(),
            "b reached a at its egress address {egress_a}"
        );
        eprintln!("traffic checked at {:?}", t0.elapsed());

        // containerd's two DELs (Stop with the netns, Remove without) leave nothing of
        // either family.
        let cri = lab.nodes[0].cri().await;
        cri.stop(&b.1).await.unwrap();
        cri.remove(&b.1).await.unwrap();
        let node = &lab.nodes[0];
        let pods_left = ipamd::cli::http_get(&node.introspection(), "/v1/pods").unwrap();
        assert!(
            !pods_left.to_string().contains(&b.2.to_string()),
            "ipamd still holds it: {pods_left}"
        );
        let routes = node.exec(&["ip", "-6", "route", "show"]);
        assert!(!routes.contains(&b.2.to_string()), "{routes}");
        let rules = node.exec(&["ip", "-6", "rule", "show"]);
        assert!(!rules.contains(&b.2.to_string()), "{rules}");
        let links = node.exec(&["ip", "-o", "link", "show"]);
        assert_eq!(
            links.lines().filter(|l| l.contains(": eni")).count(),
            1,
            "one pod veth left on node1: {links}"
        );
        assert_eq!(
            links.lines().filter(|l| l.contains(": egv")).count(),
            1,
            "one egress veth left on node1: {links}"
        );
        let nat = node.exec(&["iptables", "-t", "nat", "-S"]);
        assert_eq!(
            nat.lines().filter(|l| l.starts_with("-N CNI-E4-")).count(),
            1,
            "one SNAT chain left on node1: {nat}"
        );
        assert!(
            !std::path::Path::new(&b.3).exists(),
            "the pod netns is gone"
        );
        lab.shutdown().await;
        eprintln!("lab down at {:?}", t0.elapsed());
    });
}
