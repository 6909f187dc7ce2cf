//! The cluster's figures (not a test): the cluster up from cold (control plane, kubelets,
//! nodes Ready with aws-node, CoreDNS), what aws-node adds to a node's boot (kubelet start
//! to the node registered, then to Ready: aws-node's pod started, ipamd serving, the
//! conflist written), and pod start-up (created to Running) for a 30-pod Deployment on
//! aws-cni against the same pods with hostNetwork.
//!
//! deploy/build-image && deploy/build-image --tag 0.1.0-b && tests/k8s/build &&
//! cargo run -p vpc-cni-tests --bin bench-cluster   (the harness only polls kubectl: debug is fine)

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// An RFC 3339 timestamp of the API (second resolution) as a wall-clock time.
fn api_time(v: &serde_json::Value) -> Option<SystemTime> {
    let out = std::process::Command::new("date")
        .args(["-d", v.as_str()?, "+%s"])
        .output()
        .ok()?;
    let secs: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Seconds from `t0` to `t` (negative when the API's second rounding puts it before).
fn since(t0: SystemTime, t: Option<SystemTime>) -> String {
    match t {
        Some(t) => match t.duration_since(t0) {
            Ok(d) => format!("{:.1} s", d.as_secs_f64()),
            Err(e) => format!("-{:.1} s", e.duration().as_secs_f64()),
        },
        None => "?".into(),
    }
}

/// Where a node's boot goes, from its kubelet's start: registered, aws-node's pod created,
/// its init container run, its main container started, the conflist written (ipamd
/// serving), the node Ready. The API's times have a second's resolution.
fn boot_breakdown(c: &Cluster) {
    for n in &c.nodes {
        let Some(t0) = n.kubelet_started_at else {
            continue;
        };
        let node = c.get_json(&["node", &n.name]);
        let pods = c.get_json(&[
            "pods",
            "-n",
            "kube-system",
            "-l",
            "k8s-app=aws-node",
            "--field-selector",
            &format!("spec.nodeName={}", n.name),
        ]);
        let p = &pods["items"][0];
        let init = &p["status"]["initContainerStatuses"][0]["state"]["terminated"];
        let main = &p["status"]["containerStatuses"][0]["state"]["running"];
        let ready = |conds: &serde_json::Value| {
            conds
                .as_array()
                .and_then(|a| a.iter().find(|c| c["type"] == "Ready"))
                .and_then(|c| api_time(&c["lastTransitionTime"]))
        };
        let conflist = std::fs::metadata(n.dir.join("cni/net.d/10-aws.conflist"))
            .and_then(|m| m.modified())
            .ok();
        // aws-node's own part, to the millisecond: its first log line (containerd's
        // timestamp) to the conflist written.
        let pod = p["metadata"]["name"].as_str().unwrap_or_default();
        let (_, logs) = c.kubectl(&[
            "logs",
            "-n",
            "kube-system",
            pod,
            "-c",
            "aws-node",
            "--timestamps",
        ]);
        let first = logs
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().next())
            .and_then(|t| {
                let out = std::process::Command::new("date")
                    .args(["-d", t, "+%s.%N"])
                    .output()
                    .ok()?;
                let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
                Some(UNIX_EPOCH + Duration::from_secs_f64(secs))
            });
        if let (Some(first), Some(written)) = (first, conflist) {
            println!(
                "{}: aws-node's first log line -> conflist written: {}",
                n.name,
                written
                    .duration_since(first)
                    .map(ms)
                    .unwrap_or_else(|_| "?".into())
            );
        }
        println!(
            "{}: from kubelet start: registered {}, aws-node pod created {}, init container {}..{}, aws-node started {}, conflist written {}, node Ready {}, aws-node pod Ready {}",
            n.name,
            since(t0, api_time(&node["metadata"]["creationTimestamp"])),
            since(t0, api_time(&p["metadata"]["creationTimestamp"])),
            since(t0, api_time(&init["startedAt"])),
            since(t0, api_time(&init["finishedAt"])),
            since(t0, api_time(&main["startedAt"])),
            since(t0, conflist),
            since(t0, ready(&node["status"]["conditions"])),
            since(t0, ready(&p["status"]["conditions"])),
        );
    }
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
        boot_breakdown(&c);
        for round in 1..=3 {
            if round > 1 {
                // The previous round's addresses out of their cooldown (IP_COOLDOWN_PERIOD,
                // 30 s, as upstream): each round starts from the same warm pool.
                tokio::time::sleep(Duration::from_secs(31)).await;
            }
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
