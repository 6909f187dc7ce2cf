//! AWS_MANAGE_ENIS_NON_SCHEDULABLE against a real kube-apiserver (RBAC authorizer, on its
//! own etcd) and the EC2 + IMDS emulator: ipamd runs under deploy/aws-node.yaml's own
//! ServiceAccount, ClusterRole and binding, with a token of that account, and follows
//! cordons of its node as `kubectl cordon` and the node controller write them.

mod common;
#[path = "common/k8s.rs"]
mod k8s;

use std::path::Path;
use std::time::Duration;

use common::*;
use ec2_emulator_sdk_check::Emulator;
use ipamd::cli::http_get;
use serde_json::{Value, json};

const INTROSPECTION: &str = "127.0.0.1:61679";
const NODE: &str = "ip-10-0-1-10.us-west-2.compute.internal";

fn pool() -> Value {
    http_get(INTROSPECTION, "/v1/pool").unwrap_or(Value::Null)
}

async fn schedule_is(want: &str) -> bool {
    eventually(Duration::from_secs(10), Value::from(want), async || {
        pool()["node"]["schedule"].clone()
    })
    .await
        == want
}

/// (ENIs, IPs) stays at `want` for `d` (the pool loop runs every 200 ms here).
async fn holds(emu: &Emulator, id: &str, want: (usize, usize), d: Duration) -> bool {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end {
        if counts(emu, id).await != want {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

#[test]
fn a_cordoned_node_keeps_its_enis_until_uncordoned() {
    in_node_ns("kube", a_cordoned_node_keeps_its_enis_until_uncordoned_)
}

async fn a_cordoned_node_keeps_its_enis_until_uncordoned_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let k = k8s::K8s::start().await;
    // The node registered, already cordoned (a node being drained when aws-node starts).
    k.register_node(NODE, true).await;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/aws-node.yaml");
    let (ns, sa) = k.apply_rbac(&manifest).await;
    let token = k.token(&ns, &sa).await;
    let kubeconfig = k.kubeconfig("aws-node", &token);
    let d = Ipamd::start(
        &emu,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("MY_NODE_NAME", NODE),
        ],
    );
    let c = d.client().await;
    assert!(schedule_is("unschedulable").await, "{}", d.log());
    assert_eq!(pool()["node"]["eniHold"], "node is cordoned");
    // WARM_ENI_TARGET=1 would fill the primary ENI (9 IPs on m5.large): nothing is fetched.
    assert!(
        holds(&emu, &id, (1, 0), Duration::from_secs(2)).await,
        "{:?}\n{}",
        counts(&emu, &id).await,
        d.log()
    );
    // A pod that tolerates the cordon (a DaemonSet's) is not stranded: exactly its
    // address is fetched, on the ENI already there.
    let r = c.add("ds-pod").await.unwrap();
    assert!(r.success, "{r:?}\n{}", d.log());
    assert_eq!(counts(&emu, &id).await, (1, 1));
    // Uncordoned: the pool grows to its target (1 pod, 9 spare: the primary ENI full and
    // a second ENI).
    k.patch_node_spec(NODE, json!({"unschedulable": null}))
        .await;
    let got = eventually(Duration::from_secs(20), (2, 18), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (2, 18), "{}", d.log());
    assert_eq!(pool()["node"]["schedule"], "schedulable");
    // Cordoned again, this time by the node controller's taint alone; the pod leaves. ENI
    // mode would free the second ENI now (18 spare >= 2 x 9): it stays while cordoned.
    k.patch_node_spec(
        NODE,
        json!({"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}),
    )
    .await;
    assert!(schedule_is("unschedulable").await, "{}", d.log());
    c.del("ds-pod").await.unwrap();
    assert!(
        holds(&emu, &id, (2, 18), Duration::from_secs(2)).await,
        "{:?}\n{}",
        counts(&emu, &id).await,
        d.log()
    );
    let metrics = sh(&["curl", "-sf", "http://127.0.0.1:61678/metrics"]);
    assert!(
        metrics.contains("\nawscni_eni_management_held 1\n"),
        "{metrics}"
    );
    // Uncordoned: the spare ENI goes.
    k.patch_node_spec(NODE, json!({"taints": null})).await;
    let got = eventually(Duration::from_secs(20), (1, 9), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (1, 9), "{}", d.log());
    // All under the manifest's role: list + watch on nodes was enough, never refused.
    let log = d.log();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "{log}"
    );
}

#[test]
fn an_unreachable_api_does_not_stop_the_pool_for_long() {
    in_node_ns("kube", an_unreachable_api_does_not_stop_the_pool_for_long_)
}

async fn an_unreachable_api_does_not_stop_the_pool_for_long_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    // A kubeconfig for an API server that is not there.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: https://127.0.0.1:6443\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: x\ncontexts:\n- name: c\n  context:\n    cluster: t\n    user: u\ncurrent-context: c\n",
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let d = Ipamd::start(
        &emu,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("MY_NODE_NAME", NODE),
            ("IPAMD_SCHEDULE_WAIT_MS", "1500"),
        ],
    );
    let c = d.client().await;
    // Serving at once: a pod gets an address while the API is silent.
    let r = c.add("p0").await.unwrap();
    assert!(r.success, "{r:?}\n{}", d.log());
    assert_eq!(pool()["node"]["schedule"], "pending");
    // After the wait, ENIs are managed as on a schedulable node (as upstream when its GET
    // fails): the primary ENI is filled to WARM_ENI_TARGET's 9 spare, then a second ENI.
    let got = eventually(Duration::from_secs(20), (2, 18), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (2, 18), "{}", d.log());
    assert!(t0.elapsed() >= Duration::from_millis(1500));
    assert!(pool()["node"]["eniHold"].is_null());
    assert!(d.log().contains("watching node"), "{}", d.log());
}

#[test]
fn a_broken_api_configuration_stops_start_up_naming_it() {
    for (env, named) in [
        // In a pod, without the node's name.
        (
            vec![
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ],
            "MY_NODE_NAME",
        ),
        // A kubeconfig that is not there.
        (
            vec![
                ("KUBECONFIG", "/nonexistent/kubeconfig"),
                ("MY_NODE_NAME", NODE),
            ],
            "Kubernetes API configuration",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipamd"))
            .env_clear()
            .envs(env)
            .env(
                "AWS_VPC_K8S_CNI_BACKING_STORE",
                dir.path().join("ipam.json"),
            )
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{err}");
        // Nothing was touched before the refusal.
        assert!(!dir.path().join("ipam.json").exists());
    }
}
