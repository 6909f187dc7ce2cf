//! The cluster's figures (not a test): the cluster up from cold (control plane, kubelets,
//! nodes Ready with aws-node, CoreDNS), what aws-node adds to a node's boot (kubelet start
//! to the node registered, then to Ready: aws-node's pod started, ipamd serving, the
//! conflist written), and pod start-up (created to Running) for a 30-pod Deployment on
//! aws-cni against the same pods with hostNetwork.
//!
//! deploy/build-image && deploy/build-image --tag 0.1.0-b && tests/k8s/build &&
//! cargo run -p vpc-cni-tests --bin bench-cluster   (the harness only polls kubectl: debug is fine)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vpc_cni_tests::cluster::Cluster;
use vpc_cni_tests::lab::in_fabric;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn deployment(name: &str, host_network: bool) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: default
spec:
  replicas: 30
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      hostNetwork: {host_network}
      terminationGracePeriodSeconds: 1
      containers:
        - name: c
          image: lab.local/pause:1
          imagePullPolicy: Never
          command: ["/bin/sleep", "3600"]
"#
    )
}

/// Applies a 30-pod Deployment and times each pod from the apply to Running (polled
/// every 100 ms); deletes it after.
async fn start_up(c: &Cluster, name: &str, host_network: bool) -> Vec<Duration> {
    let path = c.dir.join(format!("{name}.yaml"));
    std::fs::write(&path, deployment(name, host_network)).unwrap();
    let t0 = Instant::now();
    c.kubectl_ok(&["apply", "-f", &path.display().to_string()]);
    let mut running: BTreeMap<String, Duration> = BTreeMap::new();
    while running.len() < 30 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{name}: {} of 30 Running",
            running.len()
        );
        let v = c.get_json(&["pods", "-n", "default", "-l", &format!("app={name}")]);
        for p in v["items"].as_array().into_iter().flatten() {
            if p["status"]["phase"] == "Running" {
                let n = p["metadata"]["name"].as_str().unwrap().to_string();
                running.entry(n).or_insert_with(|| t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.kubectl_ok(&[
        "delete",
        "-f",
        &path.display().to_string(),
        "--wait=true",
        "--timeout=120s",
    ]);
    // Until every pod is gone (its address back in the pool).
    let t1 = Instant::now();
    while c.get_json(&["pods", "-n", "default", "-l", &format!("app={name}")])["items"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        assert!(t1.elapsed() < Duration::from_secs(120));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    running.into_values().collect()
}

fn main() {
    vpc_cni_tests::require_root();
    in_fabric(async |fabric| {
        let c = Cluster::start(&fabric, 2, "m5.large").await;
        println!(
            "cluster up from cold (emulated VPC, control plane, 2 kubelets, aws-node, CoreDNS): {}",
            ms(c.started.elapsed())
        );
        for (node, (registered, ready)) in &c.boot {
            println!(
                "{node}: kubelet start -> node registered {}, -> node Ready (aws-node pod started, ipamd serving, conflist written) {}",
                registered.map(ms).unwrap_or_default(),
                ready.map(ms).unwrap_or_default()
            );
        }
        for round in 1..=2 {
            let mut cni = start_up(&c, &format!("cni{round}"), false).await;
            let mut host = start_up(&c, &format!("host{round}"), true).await;
            println!(
                "round {round}: 30-pod Deployment, created -> Running: aws-cni p50 {} p99 {}; hostNetwork p50 {} p99 {}",
                ms(pct(&mut cni, 0.5)),
                ms(pct(&mut cni, 0.99)),
                ms(pct(&mut host, 0.5)),
                ms(pct(&mut host, 0.99))
            );
        }
    });
}
