//! aws-node as users run it (issue 15): a real Kubernetes cluster on the emulated VPC
//! (two m5.large nodes, each a kubelet, a kube-proxy and containerd in its own
//! namespaces), deploy/aws-node.yaml applied as written from the image deploy/build-image
//! made, CoreDNS. One cluster, its checks in order: nodes Ready only once the conflist is
//! written; a Deployment across the nodes on primary and secondary ENIs; pod, node and
//! internet traffic; ClusterIP and NodePort Services; DNS; kube-proxy's rules beside ours;
//! a node filled to max pods; a rolling update of aws-node under traffic; cordon and drain;
//! custom networking switched on (ENIConfigs, pods on 100.64.0.0/16).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use vpc_cni_tests::cluster::{AWS_NODE_IMAGE, Cluster, zone_of_node};
use vpc_cni_tests::lab::{INTERNET_ADDR, in_fabric, in_netns};

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: 24
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: web}
      containers:
        - name: web
          image: lab.local/pause:1
          imagePullPolicy: Never
          command: ["/bin/sh", "-c"]
          # busybox httpd; /cgi-bin/ip answers the caller's address as the pod saw it.
          args:
            - |
              mkdir -p /www/cgi-bin
              printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho "$REMOTE_ADDR %s"\n' "$HOSTNAME" > /www/cgi-bin/ip
              chmod +x /www/cgi-bin/ip
              exec /bin/busybox httpd -f -p 8080 -h /www
          readinessProbe:
            tcpSocket: {port: 8080}
            periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector: {app: web}
  ports:
    - {port: 80, targetPort: 8080}
"#;

/// A client pod on `node`, sleeping, to exec from.
fn client(name: &str, node: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: lab.local/pause:1
      imagePullPolicy: Never
      command: ["/bin/sleep", "3600"]
"#
    )
}

fn apply(c: &Cluster, yaml: &str) {
    let path = c.dir.join(format!("apply-{}.yaml", rand_suffix()));
    std::fs::write(&path, yaml).unwrap();
    c.kubectl_ok(&["apply", "-f", &path.display().to_string()]);
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// GET /cgi-bin/ip from inside a pod: (the address the server saw, the server pod).
fn ask_from_pod(c: &Cluster, pod: &str, host: &str, port: u16) -> Option<(String, String)> {
    let (ok, out) = c.exec(
        "default",
        pod,
        &format!("printf 'GET /cgi-bin/ip HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}"),
    );
    if !ok {
        return None;
    }
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())?
        .trim()
        .to_string();
    parse_answer(&line)
}

/// "<REMOTE_ADDR> <pod>" as the CGI answers (busybox httpd listens on v6 and writes an
/// IPv4 peer as `[::ffff:a.b.c.d]`): the plain address and the pod.
fn parse_answer(line: &str) -> Option<(String, String)> {
    let (seen, server) = line.split_once(' ')?;
    let seen = seen.trim_start_matches('[').trim_end_matches(']');
    let seen = seen.strip_prefix("::ffff:").unwrap_or(seen);
    Some((seen.to_string(), server.trim().to_string()))
}

/// The same from a thread in the network namespace `ns` (a node, the fabric).
fn ask_from_ns(ns: &str, to: SocketAddr) -> Option<(String, String)> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(b"GET /cgi-bin/ip HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        let line = body
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())?
            .trim()
            .to_string();
        parse_answer(&line)
    })
}

/// Pod name -> (node, address), for pods with `selector`.
fn pods(c: &Cluster, selector: &str) -> BTreeMap<String, (String, Ipv4Addr)> {
    let v = c.get_json(&["pods", "-n", "default", "-l", selector]);
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                (
                    p["spec"]["nodeName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    p["status"]["podIP"].as_str().unwrap().parse().unwrap(),
                ),
            )
        })
        .collect()
}

/// iptables-save of a node's nat and mangle tables.
fn iptables_save(c: &Cluster, i: usize) -> String {
    let ns = c.lab.nodes[i].ns_path();
    in_netns(&ns, || {
        let out = std::process::Command::new("iptables-save")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// Our rules (AWS chains and the rules jumping to them or commented AWS), as a set.
fn aws_rules(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter(|l| l.starts_with("-A") && l.contains("AWS"))
        .map(str::to_string)
        .collect()
}

/// kube-proxy's chains (KUBE-*), as declared by iptables-save, per table.
fn kube_chains(save: &str) -> BTreeSet<String> {
    let mut table = "";
    let mut out = BTreeSet::new();
    for l in save.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t;
        } else if let Some(chain) = l.strip_prefix(':').and_then(|c| c.split(' ').next())
            && chain.starts_with("KUBE-")
        {
            out.insert(format!("{table}/{chain}"));
        }
    }
    out
}

/// How many host reconciles (iptables checked or converged) ipamd on node `i` has logged.
fn host_converges(c: &Cluster, i: usize) -> usize {
    let v = c.get_json(&[
        "pods",
        "-n",
        "kube-system",
        "-l",
        "k8s-app=aws-node",
        "--field-selector",
        &format!("spec.nodeName={}", node_of(c, i)),
    ]);
    let Some(pod) = v["items"][0]["metadata"]["name"].as_str() else {
        return 0;
    };
    let (_, logs) = c.kubectl(&["logs", "-n", "kube-system", pod, "-c", "aws-node"]);
    logs.lines()
        .filter(|l| l.contains("iptables already as expected") || l.contains("iptables converged"))
        .count()
}

fn node_of(c: &Cluster, i: usize) -> String {
    c.nodes[i].name.clone()
}

#[test]
fn a_real_cluster_runs_aws_node_as_users_do() {
    vpc_cni_tests::require_root();
    in_fabric(async |fabric| {
        let mut c = Cluster::start(&fabric, 2, "m5.large").await;
        eprintln!("cluster up from cold in {:?}", c.started.elapsed());
        nodes_became_ready_only_with_the_conflist(&c);
        let before_rules: Vec<BTreeSet<String>> =
            (0..2).map(|i| aws_rules(&iptables_save(&c, i))).collect();
        let web = a_deployment_spreads_over_both_nodes_and_their_enis(&c).await;
        traffic_without_nat_and_to_the_internet(&c, &web);
        services_reach_backends_everywhere(&c, &web).await;
        dns_resolves_services(&c);
        // Our rules and kube-proxy's: kube-proxy has synced the Services above; after that,
        // one more of ipamd's host reconciles (every 60 s; its log says each) on both
        // nodes, and neither side's rules have moved.
        let kube_before: Vec<BTreeSet<String>> =
            (0..2).map(|i| kube_chains(&iptables_save(&c, i))).collect();
        let converges_before: Vec<usize> = (0..2).map(|i| host_converges(&c, i)).collect();
        let t0 = Instant::now();
        while (0..2).any(|i| host_converges(&c, i) <= converges_before[i]) {
            assert!(
                t0.elapsed() < Duration::from_secs(100),
                "no host reconcile of ipamd in 100 s"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        for (i, before) in before_rules.iter().enumerate() {
            let after = iptables_save(&c, i);
            assert_eq!(
                &aws_rules(&after),
                before,
                "our rules changed on node{}",
                i + 1
            );
            assert_eq!(
                kube_chains(&after),
                kube_before[i],
                "kube-proxy's chains changed on node{}",
                i + 1
            );
            assert!(
                after.contains("-A KUBE-SERVICES") && after.contains("KUBE-SVC-"),
                "kube-proxy's rules are there"
            );
            assert!(after.contains(":AWS-SNAT-CHAIN-0") && after.contains(":AWS-CONNMARK-CHAIN-0"));
        }
        a_full_node_keeps_aws_node_ready(&c).await;
        a_rolling_update_of_aws_node_loses_nothing(&c, &web).await;
        cordon_and_drain_hold_enis(&mut c).await;
        custom_networking_puts_pods_on_the_pod_subnets(&c).await;
        eprintln!("cluster checks done in {:?}", c.started.elapsed());
    });
}

fn nodes_became_ready_only_with_the_conflist(c: &Cluster) {
    let nodes = c.get_json(&["nodes"]);
    for n in nodes["items"].as_array().unwrap() {
        let name = n["metadata"]["name"].as_str().unwrap();
        let i: usize = name.trim_start_matches("node").parse().unwrap();
        let conflist = c.nodes[i - 1].dir.join("cni/net.d/10-aws.conflist");
        let written = std::fs::metadata(&conflist)
            .unwrap_or_else(|_| panic!("{name}: no conflist"))
            .modified()
            .unwrap();
        let ready = n["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        let since = ready["lastTransitionTime"].as_str().unwrap();
        let since = time_of(since);
        // (The condition's time has a second's resolution.)
        assert!(
            since + Duration::from_secs(1) >= written,
            "{name} was Ready at {since:?}, before aws-node wrote the conflist at {written:?}"
        );
        // And before, it was not Ready for want of the network.
        let seen = c.not_ready_seen.get(name).cloned().unwrap_or_default();
        assert!(
            seen.iter()
                .any(|m| m.contains("network not ready") && m.contains("NetworkPluginNotReady")),
            "{name}: never seen waiting for the network: {seen:?}"
        );
    }
    let ds = c.get_json(&["daemonset", "-n", "kube-system", "aws-node"]);
    assert_eq!(
        ds["status"]["numberReady"], 2,
        "aws-node Ready on both nodes: {}",
        ds["status"]
    );
}

fn time_of(rfc3339: &str) -> std::time::SystemTime {
    let out = std::process::Command::new("date")
        .args(["-d", rfc3339, "+%s"])
        .output()
        .unwrap();
    let secs: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    std::time::UNIX_EPOCH + Duration::from_secs(secs)
}

/// The web Deployment Running, every pod's address held by its node's ENI in EC2.
async fn a_deployment_spreads_over_both_nodes_and_their_enis(
    c: &Cluster,
) -> BTreeMap<String, (String, Ipv4Addr, i32)> {
    apply(c, WEB);
    c.wait_rollout("default", "deployment/web", Duration::from_secs(180));
    let running = pods(c, "app=web");
    assert_eq!(running.len(), 24, "{running:?}");
    let enis = c.lab.enis().await;
    let mut out = BTreeMap::new();
    for (pod, (node, ip)) in &running {
        let i: usize = node.trim_start_matches("node").parse().unwrap();
        let instance = &c.lab.nodes[i - 1].instance;
        let eni = enis
            .iter()
            .find(|e| e.addresses.contains(ip))
            .unwrap_or_else(|| panic!("{pod}: {ip} is on no ENI in EC2"));
        assert_eq!(
            &eni.instance, instance,
            "{pod}: {ip} is on another instance's ENI"
        );
        out.insert(pod.clone(), (node.clone(), *ip, eni.device));
    }
    let nodes: BTreeSet<&String> = out.values().map(|(n, _, _)| n).collect();
    let secondary = out.values().filter(|(_, _, d)| *d > 0).count();
    eprintln!(
        "web: 24 pods on {} nodes, {secondary} on secondary ENIs",
        nodes.len()
    );
    assert_eq!(nodes.len(), 2);
    assert!(secondary > 0, "some pods on secondary ENIs");
    out
}

fn traffic_without_nat_and_to_the_internet(
    c: &Cluster,
    web: &BTreeMap<String, (String, Ipv4Addr, i32)>,
) {
    apply(c, &client("client1", &node_of(c, 0)));
    apply(c, &client("client2", &node_of(c, 1)));
    c.wait_pods_ready("default", &["client1", "client2"], Duration::from_secs(60));
    let (_, c1) = c.pod_ip("default", "client1");
    // Pod to pod across nodes: the server sees the client pod's own address.
    let far = web
        .iter()
        .find(|(_, (n, _, _))| *n == node_of(c, 1))
        .unwrap();
    let (seen, server) =
        ask_from_pod(c, "client1", &far.1.1.to_string(), 8080).expect("pod to pod");
    assert_eq!(
        (seen.as_str(), server.as_str()),
        (c1.to_string().as_str(), far.0.as_str()),
        "no NAT between pods"
    );
    // Node to pod: the node's own address arrives.
    let near = web
        .iter()
        .find(|(_, (n, _, _))| *n == node_of(c, 0))
        .unwrap();
    let (seen, _) = ask_from_ns(
        &c.lab.nodes[0].ns_path(),
        SocketAddr::new(near.1.1.into(), 8080),
    )
    .expect("node to pod");
    assert_eq!(seen, c.lab.nodes[0].primary_ip.to_string());
    // Pod to the internet host: from the node's primary address (SNAT).
    assert_eq!(
        internet_sees(c, "client1", 7000),
        c.lab.nodes[0].primary_ip.to_string(),
        "SNAT to the node's address"
    );
}

async fn services_reach_backends_everywhere(
    c: &Cluster,
    web: &BTreeMap<String, (String, Ipv4Addr, i32)>,
) {
    // ClusterIP: backends answer on both nodes and on primary and secondary ENIs.
    let svc = c.get_json(&["service", "-n", "default", "web"]);
    let vip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let mut answered = BTreeSet::new();
    // The nodes the answering backends are on, and whether they are on secondary ENIs.
    let spread = |answered: &BTreeSet<String>| {
        let on: Vec<&(String, Ipv4Addr, i32)> =
            answered.iter().filter_map(|p| web.get(p)).collect();
        let nodes: BTreeSet<String> = on.iter().map(|(n, _, _)| n.clone()).collect();
        let secondary: BTreeSet<bool> = on.iter().map(|(_, _, d)| *d > 0).collect();
        (nodes, secondary)
    };
    for _ in 0..120 {
        if let Some((_, server)) = ask_from_pod(c, "client1", &vip, 80) {
            answered.insert(server);
        }
        let (nodes, devices) = spread(&answered);
        if nodes.len() == 2 && devices.len() == 2 {
            break;
        }
    }
    let (nodes, devices) = spread(&answered);
    eprintln!("ClusterIP {vip}: {} backends answered", answered.len());
    assert_eq!(nodes.len(), 2, "backends on both nodes: {answered:?}");
    assert_eq!(
        devices.len(),
        2,
        "backends on primary and secondary ENIs: {answered:?}"
    );
    // NodePort from a VPC host outside the cluster (the VPC's router, the fabric), to a
    // node whose backend is on a secondary ENI: the reply must leave as it came (CONNMARK).
    let (pod, (node, _, dev)) = web.iter().find(|(_, (_, _, d))| *d > 0).unwrap();
    assert!(*dev > 0);
    c.kubectl_ok(&[
        "label",
        "pod",
        "-n",
        "default",
        pod,
        "tier=secondary-eni",
        "--overwrite",
    ]);
    apply(
        c,
        r#"
apiVersion: v1
kind: Service
metadata:
  name: web-secondary
  namespace: default
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {tier: secondary-eni}
  ports:
    - {port: 80, targetPort: 8080, nodePort: 30080}
"#,
    );
    let i: usize = node.trim_start_matches("node").parse().unwrap();
    let node_ip = c.lab.nodes[i - 1].primary_ip;
    let fabric = format!("/var/run/netns/{}", c.lab.fabric);
    let t0 = Instant::now();
    let answer = loop {
        if let Some(a) = ask_from_ns(&fabric, SocketAddr::new(node_ip.into(), 30080)) {
            break a;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "NodePort {node_ip}:30080 did not answer"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        &answer.1, pod,
        "the backend on the secondary ENI answered the NodePort"
    );
}

fn dns_resolves_services(c: &Cluster) {
    // By name through CoreDNS (the pod's resolv.conf, dnsPolicy ClusterFirst), then connect.
    let svc = c.get_json(&["service", "-n", "default", "web"]);
    let vip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let (ok, out) = c.exec(
        "default",
        "client1",
        "nslookup web.default.svc.cluster.local",
    );
    assert!(ok && out.contains(&vip), "nslookup: {out}");
    let (_, server) = ask_from_pod(c, "client1", "web", 80).expect("connect to web by name");
    assert!(server.starts_with("web-"), "{server}");
    // A CoreDNS pod on the other node, asked directly.
    let dns = c.get_json(&["pods", "-n", "kube-system", "-l", "k8s-app=kube-dns"]);
    let far = dns["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["spec"]["nodeName"] != node_of(c, 0).as_str())
        .expect("a CoreDNS pod on node2");
    let ip = far["status"]["podIP"].as_str().unwrap();
    let (ok, out) = c.exec(
        "default",
        "client1",
        &format!("nslookup web.default.svc.cluster.local {ip}"),
    );
    assert!(ok && out.contains(&vip), "CoreDNS on the other node: {out}");
}

async fn a_full_node_keeps_aws_node_ready(c: &Cluster) {
    let node = node_of(c, 0);
    let fill = format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: fill
  namespace: default
spec:
  replicas: {n}
  selector:
    matchLabels: {{app: fill}}
  template:
    metadata:
      labels: {{app: fill}}
    spec:
      nodeName: {node}
      terminationGracePeriodSeconds: 1
      containers:
        - name: c
          image: lab.local/pause:1
          imagePullPolicy: Never
          command: ["/bin/sleep", "3600"]
"#,
        n = c.max_pods
    );
    apply(c, &fill);
    // More pods than the node has addresses: the rest fail to get one, clearly.
    let t0 = Instant::now();
    let events = loop {
        let (_, ev) = c.kubectl(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            "reason=FailedCreatePodSandBox",
        ]);
        if ev.contains("no free address") || t0.elapsed() > Duration::from_secs(120) {
            break ev;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(
        events.contains("no free address"),
        "a clear event for pods without an address: {events}"
    );
    // aws-node on the full node: Running, Ready, never restarted.
    let ds = c.get_json(&[
        "pods",
        "-n",
        "kube-system",
        "-l",
        "k8s-app=aws-node",
        "--field-selector",
        &format!("spec.nodeName={node}"),
    ]);
    let p = &ds["items"][0];
    let ready = p["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    assert!(ready, "aws-node Ready on the full node: {}", p["status"]);
    assert_eq!(
        p["status"]["containerStatuses"][0]["restartCount"], 0,
        "aws-node restarted on a full node"
    );
    assert_eq!(
        c.nodes_ready().get(&node),
        Some(&true),
        "the node stays Ready"
    );
    // Existing pods keep working.
    assert!(ask_from_pod(c, "client2", "web", 80).is_some());
    c.kubectl_ok(&[
        "delete",
        "deployment",
        "-n",
        "default",
        "fill",
        "--wait=true",
        "--timeout=120s",
    ]);
    // (The Deployment goes first; its pods after: the node is full until they are gone.)
    c.kubectl_ok(&[
        "wait",
        "-n",
        "default",
        "--for=delete",
        "pod",
        "-l",
        "app=fill",
        "--timeout=120s",
    ]);
}

async fn a_rolling_update_of_aws_node_loses_nothing(
    c: &Cluster,
    web: &BTreeMap<String, (String, Ipv4Addr, i32)>,
) {
    // A long ping between pods on different nodes.
    let far = web
        .iter()
        .find(|(_, (n, _, _))| *n == node_of(c, 1))
        .unwrap()
        .1
        .1;
    apply(
        c,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: pinger
  namespace: default
spec:
  nodeName: {}
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: lab.local/pause:1
      imagePullPolicy: Never
      command: ["/bin/ping", "-i", "0.2", "{far}"]
"#,
            node_of(c, 0)
        ),
    );
    c.wait_pods_ready("default", &["pinger"], Duration::from_secs(60));
    let before = pods(c, "app=web");
    let image = format!("{AWS_NODE_IMAGE}:{}-b", env!("CARGO_PKG_VERSION"));
    let archive = format!(
        "{}/../.build/image/aws-node-{}-b.tar",
        env!("CARGO_MANIFEST_DIR"),
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        std::path::Path::new(&archive).exists(),
        "{archive} is missing: deploy/build-image --tag {}-b (scripts/test makes it)",
        env!("CARGO_PKG_VERSION")
    );
    let t0 = Instant::now();
    c.kubectl_ok(&[
        "set",
        "image",
        "-n",
        "kube-system",
        "daemonset/aws-node",
        &format!("aws-node={image}"),
        &format!("aws-vpc-cni-init={image}"),
    ]);
    c.wait_rollout(
        "kube-system",
        "daemonset/aws-node",
        Duration::from_secs(300),
    );
    eprintln!("aws-node rolled to {image} in {:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = pods(c, "app=web");
    assert_eq!(before, after, "every web pod kept its address");
    let log = c.kubectl_ok(&["logs", "-n", "default", "pinger"]);
    let seqs: Vec<u64> = log
        .lines()
        .filter_map(|l| {
            l.split("seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let sent = seqs.iter().max().copied().unwrap_or(0) + 1;
    let lost = sent - seqs.len() as u64;
    eprintln!(
        "ping across the rolling update: {} replies of {sent} sent, {lost} lost",
        seqs.len()
    );
    assert_eq!(
        lost, 0,
        "ping lost {lost} of {sent} during the rolling update"
    );
    // The new ipamd came back from the checkpoint.
    for p in c.get_json(&["pods", "-n", "kube-system", "-l", "k8s-app=aws-node"])["items"]
        .as_array()
        .unwrap()
    {
        let name = p["metadata"]["name"].as_str().unwrap();
        assert_eq!(p["spec"]["containers"][0]["image"], image.as_str());
        let logs = c.kubectl_ok(&["logs", "-n", "kube-system", name, "-c", "aws-node"]);
        assert!(
            logs.contains("restored checkpoint"),
            "{name} did not restore its checkpoint:\n{logs}"
        );
    }
    c.kubectl_ok(&["delete", "pod", "-n", "default", "pinger", "--wait=false"]);
}

/// ipamd's /v1/pool on node `i` (introspection on the node's loopback).
async fn cordon_and_drain_hold_enis(c: &mut Cluster) {
    let node = node_of(c, 1);
    let instance = c.lab.nodes[1].instance.clone();
    let enis_before = c
        .lab
        .enis()
        .await
        .iter()
        .filter(|e| e.instance == instance)
        .count();
    c.kubectl_ok(&["cordon", &node]);
    let t0 = Instant::now();
    while c.pool(1)["node"]["eniHold"].is_null() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "ipamd did not see the cordon: {}",
            c.pool(1)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "ipamd on {node} holds ENIs: {}",
        c.pool(1)["node"]["eniHold"]
    );
    // The node controller adds the taint too.
    let t0 = Instant::now();
    loop {
        let n = c.get_json(&["node", &node]);
        if n["spec"]["taints"].as_array().is_some_and(|t| {
            t.iter()
                .any(|t| t["key"] == "node.kubernetes.io/unschedulable")
        }) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no unschedulable taint: {}",
            n["spec"]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.kubectl_ok(&[
        "drain",
        &node,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
        "--timeout=180s",
    ]);
    // Its pods are gone: the policy now wants an ENI freed (the warm target is exceeded),
    // and the cordon holds it: no ENI freed or attached while cordoned.
    let t0 = Instant::now();
    loop {
        let p = c.pool(1);
        if p["next"] == "free an ENI" && !p["node"]["eniHold"].is_null() {
            eprintln!(
                "drained {node}: the policy says {}, held: {}",
                p["next"], p["node"]["eniHold"]
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "a drained node's pool never wanted an ENI freed while held: {p}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let enis_during = c
        .lab
        .enis()
        .await
        .iter()
        .filter(|e| e.instance == instance)
        .count();
    assert_eq!(enis_during, enis_before, "ENIs changed on a cordoned node");
    c.kubectl_ok(&["uncordon", &node]);
    let t0 = Instant::now();
    while !c.pool(1)["node"]["eniHold"].is_null() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "ipamd did not see the uncordon"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the internet host sees as the source of a connection from `pod` to its `port`.
fn internet_sees(c: &Cluster, pod: &str, port: u16) -> String {
    let inet = format!("/var/run/netns/{}", c.lab.internet);
    let listener = std::thread::spawn(move || {
        in_netns(&inet, move || {
            let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
            let (_, peer) = l.accept().unwrap();
            peer.ip().to_string()
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    let _ = c.exec(
        "default",
        pod,
        &format!("echo hi | nc -w 3 {INTERNET_ADDR} {port}"),
    );
    listener.join().unwrap()
}

/// The EC2 id of what the emulator's seed named `name` (a subnet, or the pods group).
async fn seeded_id(c: &Cluster, subnet_name: Option<&str>) -> String {
    let f = |k: &str, v: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name(k)
            .values(v)
            .build()
    };
    match subnet_name {
        Some(n) => {
            let r = c
                .lab
                .ec2
                .describe_subnets()
                .filters(f("tag:Name", n))
                .send()
                .await
                .unwrap();
            r.subnets()[0].subnet_id().unwrap().to_string()
        }
        None => {
            let r = c
                .lab
                .ec2
                .describe_security_groups()
                .filters(f("group-name", "pods"))
                .send()
                .await
                .unwrap();
            r.security_groups()[0].group_id().unwrap().to_string()
        }
    }
}

fn in_cidr(ip: Ipv4Addr, net: Ipv4Addr, len: u32) -> bool {
    let mask = u32::MAX << (32 - len);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Custom networking switched on as users do (issue 17): the ENIConfig and CNINode CRDs
/// and the knob's RBAC applied, an ENIConfig per AZ named as the AZ (its pod subnet in the
/// VPC's 100.64.0.0/16 block), the nodes labelled with their zone (what a cloud provider
/// sets), `kubectl set env` on the DaemonSet with ENI_CONFIG_LABEL_DEF. The nodes' pod ENIs in 10.0 drain; new pods get
/// 100.64 addresses of their node's ENIConfig, reach each other without NAT, are reached
/// from their node, reach the internet host as their node's primary IP; the SNAT chain
/// excludes both VPC blocks.
async fn custom_networking_puts_pods_on_the_pod_subnets(c: &Cluster) {
    let t0 = Instant::now();
    // What the earlier checks left running on pod addresses goes first (their ENIs then
    // drain; CoreDNS stays on its 10.0 address).
    c.kubectl_ok(&[
        "delete",
        "deployment",
        "web",
        "--wait=true",
        "--timeout=120s",
    ]);
    c.kubectl_ok(&[
        "delete",
        "pod",
        "client1",
        "client2",
        "--ignore-not-found",
        "--wait=true",
    ]);
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    for f in [
        "eniconfig-crd.yaml",
        "cninode-crd.yaml",
        "rbac-custom-networking.yaml",
    ] {
        c.kubectl_ok(&["apply", "-f", &format!("{deploy}/{f}")]);
    }
    c.kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/eniconfigs.crd.k8s.amazonaws.com",
        "crd/cninodes.vpcresources.k8s.aws",
    ]);
    let sg = seeded_id(c, None).await;
    let nets = [
        (Ipv4Addr::new(100, 64, 0, 0), 19),
        (Ipv4Addr::new(100, 64, 32, 0), 19),
    ];
    // One ENIConfig per AZ, named as the AZ, found by the node's zone label (EKS's usual
    // set-up; the annotation's route is in ipamd/tests/kube.rs).
    let names = [zone_of_node(0).to_string(), zone_of_node(1).to_string()];
    // node2 is in the second zone's node subnet.
    assert!(
        in_cidr(c.lab.nodes[1].primary_ip, Ipv4Addr::new(10, 0, 32, 0), 20),
        "node2: {}",
        c.lab.nodes[1].primary_ip
    );
    for (i, name) in names.iter().enumerate() {
        let subnet = seeded_id(c, Some(&format!("pods-{i}"))).await;
        apply(
            c,
            &format!(
                "apiVersion: crd.k8s.amazonaws.com/v1alpha1\nkind: ENIConfig\nmetadata:\n  name: {}\nspec:\n  subnet: {subnet}\n  securityGroups: [{sg}]\n",
                name
            ),
        );
        c.kubectl_ok(&[
            "label",
            "node",
            &node_of(c, i),
            &format!("topology.kubernetes.io/zone={name}"),
            "--overwrite",
        ]);
    }
    c.kubectl_ok(&[
        "set",
        "env",
        "-n",
        "kube-system",
        "daemonset/aws-node",
        "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true",
        "ENI_CONFIG_LABEL_DEF=topology.kubernetes.io/zone",
    ]);
    c.wait_rollout(
        "kube-system",
        "daemonset/aws-node",
        Duration::from_secs(180),
    );
    for (i, name) in names.iter().enumerate() {
        let t = Instant::now();
        loop {
            let p = c.pool(i);
            if p["customNetworking"]["MyENI"] == name.as_str()
                && p["customNetworking"]["problem"].is_null()
            {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "node{}: {p}", i + 1);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Each node's CNINode (made by ipamd: no VPC resource controller here) names its
        // ENIConfig.
        let t = Instant::now();
        loop {
            let (_, out) = c.kubectl(&[
                "get",
                "cninode",
                &node_of(c, i),
                "-o",
                "jsonpath={.spec.features[?(@.name==\"CustomNetworking\")].value}",
            ]);
            if out.trim() == name {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "node{}'s CNINode: {out}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let cn = WEB
        .replace("web", "cn")
        .replace("replicas: 24", "replicas: 4");
    apply(c, &cn);
    c.wait_rollout("default", "deployment/cn", Duration::from_secs(180));
    let running = pods(c, "app=cn");
    assert_eq!(running.len(), 4, "{running:?}");
    let enis = c.lab.enis().await;
    for (pod, (node, ip)) in &running {
        let i: usize = node.trim_start_matches("node").parse::<usize>().unwrap() - 1;
        let (net, len) = nets[i];
        assert!(
            in_cidr(*ip, net, len),
            "{pod} on {node}: {ip} is not in {}'s {net}/{len}",
            names[i]
        );
        let eni = enis
            .iter()
            .find(|e| e.addresses.contains(ip))
            .unwrap_or_else(|| panic!("{pod}: {ip} on no ENI"));
        assert!(
            eni.device > 0 && eni.instance == c.lab.nodes[i].instance,
            "{pod}: {ip} on {}",
            eni.id
        );
        let d = c
            .lab
            .ec2
            .describe_network_interfaces()
            .network_interface_ids(&eni.id)
            .send()
            .await
            .unwrap();
        let groups: Vec<&str> = d.network_interfaces()[0]
            .groups()
            .iter()
            .filter_map(|g| g.group_id())
            .collect();
        assert_eq!(groups, vec![sg.as_str()], "{pod}: {}'s groups", eni.id);
    }
    // Pod to pod across nodes without NAT.
    apply(c, &client("cn-client", &node_of(c, 0)));
    c.wait_pods_ready("default", &["cn-client"], Duration::from_secs(60));
    let (_, me) = c.pod_ip("default", "cn-client");
    assert!(in_cidr(me, nets[0].0, nets[0].1), "cn-client: {me}");
    let far = running
        .iter()
        .find(|(_, (n, _))| *n == node_of(c, 1))
        .unwrap();
    let (seen, server) =
        ask_from_pod(c, "cn-client", &far.1.1.to_string(), 8080).expect("pod to pod");
    assert_eq!(
        (seen.as_str(), server.as_str()),
        (me.to_string().as_str(), far.0.as_str()),
        "no NAT between pods"
    );
    // Node to its pod.
    let near = running
        .iter()
        .find(|(_, (n, _))| *n == node_of(c, 0))
        .unwrap();
    let (seen, _) = ask_from_ns(
        &c.lab.nodes[0].ns_path(),
        SocketAddr::new(near.1.1.into(), 8080),
    )
    .expect("node to pod");
    assert_eq!(seen, c.lab.nodes[0].primary_ip.to_string());
    // Pod to the internet host: as the node's primary IP.
    assert_eq!(
        internet_sees(c, "cn-client", 7001),
        c.lab.nodes[0].primary_ip.to_string(),
        "SNAT to the node's address"
    );
    // Neither VPC block is SNATed.
    let save = iptables_save(c, 0);
    for block in ["10.0.0.0/16", "100.64.0.0/16"] {
        assert!(
            save.lines().any(|l| l.starts_with("-A AWS-SNAT-CHAIN-0")
                && l.contains(&format!("-d {block}"))
                && l.contains("RETURN")),
            "AWS-SNAT-CHAIN-0 does not exclude {block}:\n{save}"
        );
    }
    eprintln!(
        "custom networking: 4 pods on 100.64 subnets of their nodes' ENIConfigs, checked in {:?}",
        t0.elapsed()
    );
}
