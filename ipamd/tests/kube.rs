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

/// The seeded pod subnets (Name pods-<n>) and the pods security group, by EC2.
async fn pod_subnets_and_group(emu: &Emulator) -> (Vec<String>, String) {
    let conf = ec2_emulator_sdk_check::sdk_config(&emu.endpoint, "us-west-2").await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let mut subnets = vec![];
    for n in 0..3 {
        let r = ec2
            .describe_subnets()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:Name")
                    .values(format!("pods-{n}"))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        subnets.push(r.subnets()[0].subnet_id().unwrap().to_string());
    }
    let g = ec2
        .describe_security_groups()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("group-name")
                .values("pods")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let sg = g.security_groups()[0].group_id().unwrap().to_string();
    (subnets, sg)
}

/// The instance's ENIs by device: (subnet, security groups, secondary IPs).
async fn enis_by_device(emu: &Emulator, instance: &str) -> Vec<(String, Vec<String>, usize)> {
    let conf = ec2_emulator_sdk_check::sdk_config(&emu.endpoint, "us-west-2").await;
    let c = aws_sdk_ec2::Client::new(&conf);
    let r = ec2_emulator_sdk_check::attached_enis(&c, instance)
        .await
        .unwrap();
    let mut v: Vec<_> = r
        .network_interfaces()
        .iter()
        .map(|n| {
            (
                n.attachment().and_then(|a| a.device_index()).unwrap_or(-1),
                n.subnet_id().unwrap_or_default().to_string(),
                n.groups()
                    .iter()
                    .filter_map(|g| g.group_id().map(str::to_string))
                    .collect::<Vec<_>>(),
                n.private_ip_addresses()
                    .iter()
                    .filter(|a| !a.primary().unwrap_or(false))
                    .count(),
            )
        })
        .collect();
    v.sort_by_key(|x| x.0);
    v.into_iter().map(|(_, s, g, n)| (s, g, n)).collect()
}

fn in_subnet(ip: &str, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let (ip, net): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (ip.parse().unwrap(), net.parse().unwrap());
    let mask = u32::MAX << (32 - len.parse::<u32>().unwrap());
    u32::from(ip) & mask == u32::from(net) & mask
}

#[test]
fn custom_networking_follows_the_nodes_eni_config() {
    in_node_ns("kube", custom_networking_follows_the_nodes_eni_config_)
}

async fn custom_networking_follows_the_nodes_eni_config_() {
    let emu = Emulator::start();
    let id = emu
        .seed(&[
            "--type",
            "m5.large",
            "--pod-vpc-cidr",
            "100.64.0.0/16",
            "--pod-subnet",
            "100.64.0.0/19",
            "--pod-subnet",
            "100.64.32.0/19",
            "--pod-subnet",
            "100.64.64.0/19@us-west-2b",
        ])
        .remove(0);
    let (subnets, pods_sg) = pod_subnets_and_group(&emu).await;
    let nodes_sg = enis_by_device(&emu, &id).await[0].1.clone();
    let k = k8s::K8s::start().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    k.apply_crd(&root.join("eniconfig-crd.yaml")).await;
    k.apply_crd(&root.join("cninode-crd.yaml")).await;
    k.register_node(NODE, false).await;
    // One ENIConfig per AZ, named by the zone label (as EKS users set it up).
    const ZONE: &str = "topology.kubernetes.io/zone";
    k.patch_node_meta(NODE, json!({"labels": {ZONE: "us-west-2a"}}))
        .await;
    k.put_eni_config(
        "us-west-2a",
        json!({"subnet": subnets[0], "securityGroups": [pods_sg]}),
    )
    .await;
    let (ns, sa) = k.apply_rbac(&root.join("aws-node.yaml")).await;
    k.apply_rbac_extra(&root.join("rbac-custom-networking.yaml"))
        .await;
    let token = k.token(&ns, &sa).await;
    let kubeconfig = k.kubeconfig("aws-node", &token);
    // The node ran without custom networking first: its primary ENI holds 9 addresses of
    // the node subnet.
    {
        let mut before = Ipamd::start(&emu, &[]);
        let got = eventually(Duration::from_secs(10), (1, 9), async || {
            counts(&emu, &id).await
        })
        .await;
        assert_eq!(got, (1, 9), "{}", before.log());
        before.terminate();
    }
    let d = Ipamd::start(
        &emu,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("MY_NODE_NAME", NODE),
            ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true"),
            ("ENI_CONFIG_LABEL_DEF", ZONE),
            // IP-target mode: an ENI holds a few addresses (ENI mode would fill two whole
            // ENIs of an m5.large's three at once, leaving no room for a change).
            ("WARM_IP_TARGET", "2"),
            ("IP_COOLDOWN_PERIOD", "1"),
        ],
    );
    let c = d.client().await;
    // A pod gets an address of the ENIConfig's subnet, on a secondary ENI carrying the
    // ENIConfig's security group; the primary ENI gives pods nothing.
    let r = c.add("p1").await.unwrap();
    assert!(r.success, "{r:?}\n{}", d.log());
    assert!(
        in_subnet(&r.ip_allocation_metadata[0].i_pv4_addr, "100.64.0.0/19"),
        "{r:?}"
    );
    // The primary ENI's idle addresses went back to EC2 (the node subnet is what custom
    // networking spares).
    let primary_subnet = enis_by_device(&emu, &id).await[0].0.clone();
    let idle = eventually(Duration::from_secs(10), 0, async || {
        enis_by_device(&emu, &id).await[0].2
    })
    .await;
    assert_eq!(idle, 0, "{}", d.log());
    let enis = enis_by_device(&emu, &id).await;
    assert_eq!(enis.len(), 2, "{enis:?}\n{}", d.log());
    assert_eq!(
        enis[0],
        (primary_subnet.clone(), nodes_sg.clone(), 0),
        "{enis:?}"
    );
    assert_eq!(
        (&enis[1].0, &enis[1].1),
        (&subnets[0], &vec![pods_sg.clone()]),
        "{enis:?}"
    );
    assert!(enis[1].2 >= 3, "{enis:?}");
    let p = pool();
    assert_eq!(p["customNetworking"]["MyENI"], "us-west-2a", "{p}");
    assert!(p["customNetworking"]["problem"].is_null(), "{p}");
    // Upstream's max-pods for custom networking: (3 - 1) x (10 - 1) + 2.
    assert_eq!(p["limits"]["maxPods"], 20, "{p}");
    let ec = http_get(INTROSPECTION, "/v1/eni-configs").unwrap();
    assert_eq!(
        ec["ENI"]["us-west-2a"]["subnet"],
        subnets[0].as_str(),
        "{ec}"
    );
    // No VPC resource controller here: ipamd made the node's CNINode, owned by the Node,
    // with the feature naming the ENIConfig.
    let feature = |name: &'static str| {
        let k = &k;
        async move {
            k.cni_node(NODE).await.map(|c| {
                c["spec"]["features"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|f| f["name"] == name)
                    .map(|f| f["value"].as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
            })
        }
    };
    let got = eventually(
        Duration::from_secs(10),
        Some(vec!["us-west-2a".to_string()]),
        async || feature("CustomNetworking").await,
    )
    .await;
    assert_eq!(got, Some(vec!["us-west-2a".to_string()]), "{}", d.log());
    let cni_node = k.cni_node(NODE).await.unwrap();
    let owner = &cni_node["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["name"]),
        (&json!("Node"), &json!(NODE))
    );
    assert!(
        owner["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "{cni_node}"
    );
    assert!(
        k.node_events(NODE).await.is_empty(),
        "{:?}",
        k.node_events(NODE).await
    );
    // The controller adds its own feature: ipamd keeps it through its writes.
    k.patch_cni_node(
        NODE,
        json!({"spec": {"features": [
            {"name": "CustomNetworking", "value": "us-west-2a"},
            {"name": "SecurityGroupsForPods"},
        ]}}),
    )
    .await;

    // The annotation names another ENIConfig, not there yet: pods are still served from
    // the ENI there is, and the pool, the metric say what is missing.
    k.patch_node_meta(
        NODE,
        json!({"annotations": {"k8s.amazonaws.com/eniConfig": "pods-b"}}),
    )
    .await;
    let problem = eventually(Duration::from_secs(10), true, async || {
        pool()["customNetworking"]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("pods-b") && p.contains("no ENIConfig of that name"))
    })
    .await;
    assert!(problem, "{}\n{}", pool(), d.log());
    let metrics = sh(&["curl", "-sf", "http://127.0.0.1:61678/metrics"]);
    assert!(
        metrics.contains("\nawscni_eni_config_missing 1\n"),
        "{metrics}"
    );
    let r2 = c.add("p2").await.unwrap();
    assert!(
        r2.success && in_subnet(&r2.ip_allocation_metadata[0].i_pv4_addr, "100.64.0.0/19"),
        "{r2:?}"
    );
    // A Warning event on the node says it, where `kubectl describe node` finds it; the
    // CNINode names the ENIConfig the node names, the controller's feature kept.
    let said = |reason: &'static str, text: &'static str| {
        let k = &k;
        async move {
            k.node_events(NODE).await.iter().any(|(t, r, m, c)| {
                t == "Warning" && r == reason && m.contains(text) && c == "aws-node"
            })
        }
    };
    let evented = eventually(Duration::from_secs(10), true, async || {
        said("MissingENIConfig", "pods-b").await
    })
    .await;
    assert!(evented, "{:?}\n{}", k.node_events(NODE).await, d.log());
    let got = eventually(
        Duration::from_secs(10),
        Some(vec!["pods-b".to_string()]),
        async || feature("CustomNetworking").await,
    )
    .await;
    assert_eq!(got, Some(vec!["pods-b".to_string()]), "{}", d.log());
    assert_eq!(
        feature("SecurityGroupsForPods").await,
        Some(vec![String::new()])
    );

    // Created, naming no security group: new pods go to its subnet, on an ENI with the
    // node's groups; the old subnet's ENI serves no new pod.
    k.put_eni_config("pods-b", json!({"subnet": subnets[1]}))
        .await;
    // (Once ipamd's watch has seen it: the API answers the write before the event.)
    let seen = eventually(Duration::from_secs(10), true, async || {
        pool()["customNetworking"]["problem"].is_null()
    })
    .await;
    assert!(
        seen,
        "{}
{}",
        pool(),
        d.log()
    );
    let r3 = c.add("p3").await.unwrap();
    assert!(
        r3.success && in_subnet(&r3.ip_allocation_metadata[0].i_pv4_addr, "100.64.32.0/19"),
        "{r3:?}\n{}",
        d.log()
    );
    let enis = enis_by_device(&emu, &id).await;
    assert_eq!(enis.len(), 3, "{enis:?}");
    assert_eq!(
        (&enis[2].0, &enis[2].1),
        (&subnets[1], &nodes_sg),
        "{enis:?}"
    );
    // Once the old subnet's pods are gone, its ENI is freed (upstream keeps it).
    c.del("p1").await.unwrap();
    c.del("p2").await.unwrap();
    let left = eventually(Duration::from_secs(45), 2, async || {
        enis_by_device(&emu, &id).await.len()
    })
    .await;
    assert_eq!(
        left,
        2,
        "{:?}\n{}",
        enis_by_device(&emu, &id).await,
        d.log()
    );
    assert!(
        enis_by_device(&emu, &id)
            .await
            .iter()
            .all(|e| e.0 != subnets[0])
    );

    // Pointed at a subnet of another AZ: refused naming it, and pods are still served
    // from the ENI there is.
    k.put_eni_config("pods-b", json!({"subnet": subnets[2]}))
        .await;
    let problem = eventually(Duration::from_secs(15), true, async || {
        pool()["customNetworking"]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("us-west-2b"))
    })
    .await;
    assert!(problem, "{}\n{}", pool(), d.log());
    let evented = eventually(Duration::from_secs(10), true, async || {
        said("InvalidENIConfig", "us-west-2b").await
    })
    .await;
    assert!(evented, "{:?}\n{}", k.node_events(NODE).await, d.log());
    // One event per problem, not one per pool pass.
    assert_eq!(
        k.node_events(NODE).await.len(),
        2,
        "{:?}",
        k.node_events(NODE).await
    );
    let r4 = c.add("p4").await.unwrap();
    assert!(
        r4.success && in_subnet(&r4.ip_allocation_metadata[0].i_pv4_addr, "100.64.32.0/19"),
        "{r4:?}\n{}",
        d.log()
    );
    assert_eq!(enis_by_device(&emu, &id).await.len(), 2);
    // Never refused by the manifest's role.
    let log = d.log();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "{log}"
    );
}

#[test]
fn the_pool_holds_no_more_than_kubelets_pod_capacity() {
    in_node_ns("kube", the_pool_holds_no_more_than_kubelets_pod_capacity_)
}

async fn the_pool_holds_no_more_than_kubelets_pod_capacity_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let k = k8s::K8s::start().await;
    k.register_node(NODE, false).await;
    // kubelet --max-pods=5 on an m5.large (29 by the formula).
    k.set_node_capacity_pods(NODE, 5).await;
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
    let _c = d.client().await;
    let got = eventually(Duration::from_secs(10), (1, 5), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (1, 5), "{}", d.log());
    let max = eventually(Duration::from_secs(10), Value::from(5), async || {
        pool()["limits"]["maxPods"].clone()
    })
    .await;
    assert_eq!(max, 5, "{}", d.log());
    // WARM_ENI_TARGET=1 would take 9 addresses and a second ENI: 5 at most.
    assert!(
        holds(&emu, &id, (1, 5), Duration::from_secs(3)).await,
        "{:?}\n{}",
        counts(&emu, &id).await,
        d.log()
    );
}

#[test]
fn annotate_pod_ip_writes_and_clears_the_pods_address() {
    in_node_ns("kube", annotate_pod_ip_writes_and_clears_the_pods_address_)
}

async fn annotate_pod_ip_writes_and_clears_the_pods_address_() {
    const KEY: &str = "vpc.amazonaws.com/pod-ips";
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    let k = k8s::K8s::start().await;
    k.register_node(NODE, false).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    // The manifest's role, and the knob's own grant (patch on pods) beside it.
    let (ns, sa) = k.apply_rbac(&root.join("aws-node.yaml")).await;
    k.apply_rbac_extra(&root.join("rbac-annotate-pod-ip.yaml"))
        .await;
    let token = k.token(&ns, &sa).await;
    let kubeconfig = k.kubeconfig("aws-node", &token);
    k.create_pod("pod-a1").await;
    let d = Ipamd::start(
        &emu,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("MY_NODE_NAME", NODE),
            ("ANNOTATE_POD_IP", "true"),
        ],
    );
    let c = d.client().await;
    let r = c.add("a1").await.unwrap();
    assert!(r.success, "{r:?}\n{}", d.log());
    let ip = r.ip_allocation_metadata[0].i_pv4_addr.clone();
    let got = eventually(Duration::from_secs(10), Some(ip.clone()), async || {
        k.pod_annotation("pod-a1", KEY).await
    })
    .await;
    assert_eq!(got, Some(ip), "{}", d.log());
    // A pod the API does not know (a static pod's sandbox before its mirror): served all
    // the same, at once.
    let t0 = std::time::Instant::now();
    let r = c.add("ghost").await.unwrap();
    assert!(r.success && t0.elapsed() < Duration::from_secs(2), "{r:?}");
    // Released: the annotation goes.
    c.del("a1").await.unwrap();
    let got = eventually(Duration::from_secs(10), None, async || {
        k.pod_annotation("pod-a1", KEY).await
    })
    .await;
    assert_eq!(got, None, "{}", d.log());
    let log = d.log();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "{log}"
    );
}
