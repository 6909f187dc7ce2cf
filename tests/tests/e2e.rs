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

#[test]
fn a_burst_of_60_sandboxes_on_a_fresh_node_all_get_addresses() {
    vpc_cni_tests::require_root();
    in_fabric(async |fabric| {
        // m5.4xlarge: 29 pod addresses per ENI, one ENI's worth warm at most when the
        // burst starts (it starts as soon as the conflist exists, before the pool is warm).
        let lab = Lab::start(&fabric, 1, "m5.4xlarge", &[]).await;
        let node = &lab.nodes[0];
        let cri = node.cri().await;
        let t0 = std::time::Instant::now();
        let runs = (0..60).map(|i| {
            let cri = cri.clone();
            async move {
                let id = cri.run(&PodSpec::new("burst", &format!("p{i}"))).await?;
                let ip = cri.ip(&id).await?;
                Ok::<_, tonic::Status>((id, ip))
            }
        });
        let results = futures::future::join_all(runs).await;
        let took = t0.elapsed();
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.message().to_string()))
            .collect();
        assert!(
            failed.is_empty(),
            "{} pods failed: {failed:?}\n{}",
            failed.len(),
            node.ipamd_log()
        );
        let ips: std::collections::BTreeSet<Ipv4Addr> = results
            .iter()
            .map(|r| r.as_ref().unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(ips.len(), 60, "every pod its own address");
        for ip in &ips {
            assert_eq!(
                lab.holder(*ip).await.map(|h| h.0),
                Some(0),
                "{ip} is on the node's ENIs"
            );
        }
        let budget = ipamd::cli::http_get(&node.introspection(), "/v1/ec2-budget").unwrap();
        let enis = lab.enis().await.len();
        println!(
            "burst: 60 sandboxes ready in {took:?}, none failed; {enis} ENIs; EC2 calls by ipamd: {} {}",
            budget["totalCalls"], budget["calls"]
        );
        assert!(enis >= 3, "60 pods need a third ENI");
        lab.shutdown().await;
    });
}

/// Packets sent and received by a finished `ping`.
fn ping_counts(out: &str) -> (u32, u32) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default();
    let n: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (
        n.first().copied().unwrap_or(0),
        n.get(1).copied().unwrap_or(0),
    )
}

#[test]
fn ipamd_killed_during_pod_churn_loses_nothing_and_the_pool_recovers() {
    vpc_cni_tests::require_root();
    in_fabric(async |fabric| {
        let mut lab = Lab::start(&fabric, 2, "m5.large", &[]).await;
        let (c1, c2) = (lab.nodes[0].cri().await, lab.nodes[1].cri().await);
        let a = c1.run(&PodSpec::new("default", "pinger")).await.unwrap();
        let b = c2.run(&PodSpec::new("default", "target")).await.unwrap();
        let a_ip: Ipv4Addr = c1.ip(&a).await.unwrap().parse().unwrap();
        let b_ip: Ipv4Addr = c2.ip(&b).await.unwrap().parse().unwrap();
        let a_ns = pod_netns(a_ip).unwrap();
        // A long-running ping between two pods on different nodes, through the churn.
        let interval = 0.05;
        let ping = std::process::Command::new("ip")
            .args(["netns", "exec", a_ns.trim_start_matches("/var/run/netns/")])
            .args(["ping", "-i", "0.05", "-w", "14", &b_ip.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Churn on node1: create and delete pods (retrying as kubelet does), while ipamd
        // is SIGKILLed twice and restarted.
        let churn = {
            let c1 = c1.clone();
            tokio::spawn(async move {
                let mut live: std::collections::VecDeque<(String, Ipv4Addr)> = Default::default();
                let mut created = 0;
                let mut retries = 0;
                let t0 = std::time::Instant::now();
                while t0.elapsed() < Duration::from_secs(11) {
                    match c1.run(&PodSpec::new("churn", &format!("c{created}"))).await {
                        Ok(id) => {
                            let ip: Ipv4Addr = c1.ip(&id).await.unwrap().parse().unwrap();
                            assert!(!live.iter().any(|(_, x)| *x == ip), "{ip} given twice");
                            live.push_back((id, ip));
                            created += 1;
                        }
                        Err(_) => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    if live.len() > 6 {
                        let (id, _) = live.pop_front().unwrap();
                        // kubelet retries a failed stop or remove, too.
                        while c1.stop(&id).await.is_err() {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        while c1.remove(&id).await.is_err() {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                (live, created, retries)
            })
        };
        let mut down = Duration::ZERO;
        for pause in [2, 3] {
            tokio::time::sleep(Duration::from_secs(pause)).await;
            let t = std::time::Instant::now();
            lab.kill_ipamd(0);
            tokio::time::sleep(Duration::from_millis(500)).await;
            lab.start_node(0);
            let sock = lab.nodes[0].ipamd_socket();
            while !ipamd_serving(&sock).await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            down += t.elapsed();
        }
        let (live, created, retries) = churn.await.unwrap();
        let out = ping.wait_with_output().unwrap();
        let (sent, received) = ping_counts(&String::from_utf8_lossy(&out.stdout));
        let lost = sent.saturating_sub(received);
        println!(
            "churn: {created} pods created ({retries} RunPodSandbox retries), ipamd down {down:?} in total; ping {sent} sent, {lost} lost"
        );
        assert!(sent > 100, "the ping ran: {sent}");
        assert!(
            f64::from(lost) * interval <= down.as_secs_f64(),
            "lost {lost} x {interval}s > the restart window {down:?}"
        );
        assert!(created >= 10, "churn made progress: {created}");
        // Every pod alive has a distinct address that ipamd (restarted) still holds for
        // it; an address whose DEL came while ipamd was down is reclaimed from the host's
        // state (no pod interface) within IPAMD_RECLAIM_AFTER_MS + a reconcile.
        let want = live.len() + 1;
        let t0 = std::time::Instant::now();
        let held = loop {
            let held = ipamd_pods(&lab.nodes[0]);
            if held.as_array().unwrap().len() == want || t0.elapsed() > Duration::from_secs(15) {
                break held;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let held_ips: Vec<String> = held
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["ip"].as_str().unwrap().to_string())
            .collect();
        let uniq: std::collections::BTreeSet<&String> = held_ips.iter().collect();
        assert_eq!(uniq.len(), held_ips.len(), "no address held twice: {held}");
        for (_, ip) in &live {
            assert!(
                held_ips.contains(&ip.to_string()),
                "{ip} lost by ipamd: {held}"
            );
        }
        assert!(held_ips.contains(&a_ip.to_string()));
        let stale: Vec<&serde_json::Value> = held
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                let ip = p["ip"].as_str().unwrap();
                ip != a_ip.to_string() && !live.iter().any(|(_, l)| l.to_string() == ip)
            })
            .collect();
        if !stale.is_empty() {
            let node = &lab.nodes[0];
            let id = stale[0]["containerID"].as_str().unwrap().to_string();
            let name = format!("churn/{}", stale[0]["name"].as_str().unwrap());
            let ctr = node.containerd.as_ref().unwrap().log();
            let plugin = std::fs::read_to_string(node.dir.join("plugin.log")).unwrap_or_default();
            let pick = |t: &str| -> String {
                t.lines()
                    .filter(|l| l.contains(&id[..12]) || l.contains(&name))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "nothing stale: {stale:?}\nlive: {live:?}\nipamd:\n{}\ncontainerd:\n{}\nplugin:\n{}",
                pick(&node.ipamd_log()),
                pick(&ctr),
                pick(&plugin)
            );
        }
        // Deterministically, the case the churn hits by chance: a pod deleted while ipamd
        // is down. DEL succeeds from local state; the restarted ipamd reclaims the address
        // once it sees no pod interface for it on the host.
        let x = c1
            .run(&PodSpec::new("default", "deleted-while-down"))
            .await
            .unwrap();
        let x_ip = c1.ip(&x).await.unwrap();
        lab.kill_ipamd(0);
        c1.stop(&x).await.expect("DEL with ipamd down succeeds");
        c1.remove(&x).await.unwrap();
        lab.start_node(0);
        let t0 = std::time::Instant::now();
        let holds_x = || {
            ipamd::cli::http_get(&lab.nodes[0].introspection(), "/v1/pods")
                .map(|p| p.to_string().contains(&format!("\"{x_ip}\"")))
                .unwrap_or(true)
        };
        while holds_x() {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{x_ip} never reclaimed\n{}",
                lab.nodes[0].ipamd_log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            lab.nodes[0]
                .ipamd_log()
                .contains(&format!("released {x_ip} of default/deleted-while-down"))
        );
        // Delete the churn pods: the pool returns to its targets with nothing leaked.
        for (id, _) in &live {
            c1.stop(id).await.unwrap();
            c1.remove(id).await.unwrap();
        }
        let node = &lab.nodes[0];
        let steady = |p: &serde_json::Value| {
            p["next"] == "steady" && p["shortfall"] == 0 && p["surplus"] == 0
        };
        let t0 = std::time::Instant::now();
        let pool = loop {
            let p = ipamd::cli::http_get(&node.introspection(), "/v1/pool").unwrap();
            if steady(&p) || t0.elapsed() > Duration::from_secs(30) {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(steady(&pool), "pool back at its targets: {pool:#}");
        let ours = ipamd::cli::http_get(&node.introspection(), "/v1/enis").unwrap();
        let mut in_ipamd: Vec<(String, Vec<String>)> = ours["ENIs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(id, e)| {
                let mut ips: Vec<String> = e["AvailableIPv4Cidrs"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(|k| k.trim_end_matches("/32").to_string())
                    .collect();
                ips.sort();
                (id.clone(), ips)
            })
            .collect();
        in_ipamd.sort();
        let mut in_ec2: Vec<(String, Vec<String>)> = lab
            .enis()
            .await
            .into_iter()
            .filter(|e| e.instance == node.instance)
            .map(|e| {
                let mut ips: Vec<String> = e.addresses.iter().map(|a| a.to_string()).collect();
                ips.sort();
                (e.id, ips)
            })
            .collect();
        in_ec2.sort();
        assert_eq!(in_ipamd, in_ec2, "no leaked ENI or IP: ipamd and EC2 agree");
        let unattached = lab
            .ec2
            .describe_network_interfaces()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("status")
                    .values("available")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        assert!(
            unattached.network_interfaces().is_empty(),
            "no ENI left unattached: {:?}",
            unattached.network_interfaces()
        );
        lab.shutdown().await;
    });
}

async fn ipamd_serving(socket: &std::path::Path) -> bool {
    let addr = vpc_cni_proto::address::IpamdAddress::Unix(socket.display().to_string());
    ipamd::cli::serving(&addr).await.is_ok()
}
