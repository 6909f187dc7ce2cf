//! `scripts/run --cluster`: aws-node as users run it. The emulated VPC with two m5.large
//! nodes, a real Kubernetes control plane, a kubelet, kube-proxy and containerd on each
//! node, deploy/aws-node.yaml applied from the image deploy/build-image made, CoreDNS. A
//! 12-pod Deployment behind a Service: each pod's VPC address and the ENI holding it, a
//! pod reaching the Service by name, a pod on the other node directly, and the internet
//! host (as the node's primary IP). Everything is removed at the end (also on Ctrl-C).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vpc_cni_tests::cluster::Cluster;
use vpc_cni_tests::lab::{INTERNET_ADDR, in_fabric, in_netns};

fn step(s: &str) {
    println!("\x1b[1m==> {s}\x1b[0m");
}

const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: hello
  namespace: default
spec:
  replicas: 12
  selector:
    matchLabels: {app: hello}
  template:
    metadata:
      labels: {app: hello}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: hello}
      containers:
        - name: web
          image: lab.local/pause:1
          imagePullPolicy: Never
          command: ["/bin/sh", "-c"]
          args:
            - |
              mkdir -p /www/cgi-bin
              printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho "$HOSTNAME saw $REMOTE_ADDR"\n' > /www/cgi-bin/who
              chmod +x /www/cgi-bin/who
              exec httpd -f -p 8080 -h /www
          readinessProbe:
            tcpSocket: {port: 8080}
            periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: default
spec:
  selector: {app: hello}
  ports:
    - {port: 80, targetPort: 8080}
"#;

async fn run(fabric: String) -> bool {
    step("starting the cluster: emulated VPC, control plane, 2 kubelet nodes, aws-node, CoreDNS");
    let c = Cluster::start(&fabric, 2, "m5.large").await;
    println!("cluster up in {:.1} s", c.started.elapsed().as_secs_f64());
    for (node, (registered, ready)) in &c.boot {
        println!(
            "  {node}: registered {:.1} s after its kubelet started, Ready {:.1} s after (once aws-node wrote the conflist)",
            registered.unwrap_or_default().as_secs_f64(),
            ready.unwrap_or_default().as_secs_f64()
        );
    }
    println!("{}", c.kubectl_ok(&["get", "nodes", "-o", "wide"]));
    println!(
        "{}",
        c.kubectl_ok(&["get", "pods", "-n", "kube-system", "-o", "wide"])
    );

    step("a 12-pod Deployment behind a Service");
    let path = c.dir.join("hello.yaml");
    std::fs::write(&path, APP).unwrap();
    let t0 = Instant::now();
    c.kubectl_ok(&["apply", "-f", &path.display().to_string()]);
    c.wait_rollout("default", "deployment/hello", Duration::from_secs(180));
    println!("12 pods Ready in {:.1} s", t0.elapsed().as_secs_f64());
    let enis = c.lab.enis().await;
    let pods = c.get_json(&["pods", "-n", "default", "-l", "app=hello"]);
    let mut rows = BTreeMap::new();
    for p in pods["items"].as_array().into_iter().flatten() {
        let name = p["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let node = p["spec"]["nodeName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ip = p["status"]["podIP"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let eni = ip
            .parse()
            .ok()
            .and_then(|a| enis.iter().find(|e| e.addresses.contains(&a)))
            .map(|e| format!("{} (device {})", e.id, e.device))
            .unwrap_or_else(|| "NOT IN EC2".into());
        rows.insert(name, (node, ip, eni));
    }
    println!(
        "{:<24} {:<6} {:<12} ENI holding it in EC2",
        "POD", "NODE", "IP"
    );
    let mut ok = true;
    for (pod, (node, ip, eni)) in &rows {
        ok &= !eni.starts_with("NOT");
        println!("{pod:<24} {node:<6} {ip:<12} {eni}");
    }

    step("traffic");
    let first = rows.keys().next().cloned().unwrap_or_default();
    let first_node = rows.get(&first).map(|r| r.0.clone()).unwrap_or_default();
    let (far, (_, far_ip, _)) = rows
        .iter()
        .find(|(_, (n, _, _))| *n != first_node)
        .map(|(p, r)| (p.clone(), r.clone()))
        .unwrap_or_default();
    let direct = format!("{far} on the other node, directly");
    for (what, host, port) in [
        (
            "the Service by name (CoreDNS, kube-proxy)",
            "hello".to_string(),
            80,
        ),
        (direct.as_str(), far_ip.clone(), 8080),
    ] {
        let (done, out) = c.exec(
            "default",
            &first,
            &format!("printf 'GET /cgi-bin/who HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}"),
        );
        // (busybox httpd writes an IPv4 peer as [::ffff:a.b.c.d].)
        let answer = out
            .lines()
            .rev()
            .find(|l| l.contains("saw"))
            .unwrap_or("")
            .replace("[::ffff:", "")
            .replace(']', "");
        ok &= done && !answer.is_empty();
        println!(
            "{first} -> {what}: {}",
            if answer.is_empty() {
                out.trim()
            } else {
                &answer
            }
        );
    }
    let inet = format!("/var/run/netns/{}", c.lab.internet);
    let listener = std::thread::spawn(move || {
        in_netns(&inet, || {
            let l = TcpListener::bind("0.0.0.0:7001").ok()?;
            l.set_nonblocking(false).ok()?;
            l.accept().ok().map(|(_, peer)| peer.ip().to_string())
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    let _ = c.exec(
        "default",
        &first,
        &format!("echo hi | nc -w 3 {INTERNET_ADDR} 7001"),
    );
    let seen = listener.join().ok().flatten().unwrap_or_default();
    let node_ip = c
        .lab
        .nodes
        .iter()
        .zip(&c.nodes)
        .find(|(_, k)| k.name == first_node)
        .map(|(l, _)| l.primary_ip.to_string())
        .unwrap_or_default();
    ok &= seen == node_ip;
    println!(
        "{first} -> the internet host {INTERNET_ADDR}: arrived from {seen} ({first_node}'s primary IP is {node_ip})"
    );
    println!(
        "{}",
        c.kubectl_ok(&["get", "pods", "-n", "default", "-o", "wide"])
    );
    step("removing the cluster");
    ok
}

static OK: AtomicBool = AtomicBool::new(false);

fn main() {
    vpc_cni_tests::require_root();
    in_fabric(async |fabric| OK.store(run(fabric).await, Ordering::SeqCst));
    let ok = OK.load(Ordering::SeqCst);
    println!(
        "{}",
        if ok {
            "done: every pod had a VPC address its node's ENI holds; everything removed"
        } else {
            "FAILED (see above); everything removed"
        }
    );
    std::process::exit(if ok { 0 } else { 1 });
}
