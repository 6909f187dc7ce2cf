//! What an operator reads, from a real ipamd against the emulator after a known sequence of
//! pods: the introspection JSON, the Prometheus metrics and `ipamd status`/`ipamd health`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;
use ec2_emulator_sdk_check::Emulator;
use ipamd::cli::http_get;
use serde_json::Value;

const INTROSPECTION: &str = "127.0.0.1:61679";

/// One sample of the Prometheus text: `series` is the name with its labels, as written.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn scrape() -> String {
    let out = Command::new("curl")
        .args(["-sf", "http://127.0.0.1:61678/metrics"])
        .output()
        .expect("curl");
    assert!(out.status.success(), "scrape failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn introspection_metrics_and_status_after_known_pods() {
    in_node_ns("ops", introspection_metrics_and_status_after_known_pods_)
}

async fn introspection_metrics_and_status_after_known_pods_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let d = Ipamd::start(&emu, &[("WARM_IP_TARGET", "3"), ("MINIMUM_IP_TARGET", "5")]);
    let c = d.client().await;
    // Four pods, one deleted: 3 assigned, so the pool settles at max(5, 3 + 3) = 6.
    let mut ips = Vec::new();
    for i in 0..4 {
        let r = c.add(&format!("c{i}")).await.unwrap();
        assert!(r.success, "{}", d.log());
        ips.push(r.ip_allocation_metadata[0].i_pv4_addr.clone());
    }
    assert!(c.del("c1").await.unwrap().success);
    let settled = eventually(Duration::from_secs(20), Some(6.0), async || {
        sample(&scrape(), "awscni_total_ip_addresses")
    })
    .await;
    assert_eq!(settled, Some(6.0), "{}", d.log());
    let (_, ec2_ips) = counts(&emu, &id).await;
    assert_eq!(ec2_ips, 6, "EC2 agrees");

    // /v1/pods: exactly the three live pods with the addresses AddNetwork gave them.
    let pods = http_get(INTROSPECTION, "/v1/pods").unwrap();
    let got: BTreeSet<(String, String)> = pods
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["namespace"], "default");
            assert_eq!(p["ifName"], "eth0");
            assert_eq!(p["deviceNumber"], 0);
            (
                p["name"].as_str().unwrap().to_string(),
                p["ip"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [0, 2, 3]
        .iter()
        .map(|i| (format!("pod-c{i}"), ips[*i].clone()))
        .collect();
    assert_eq!(got, want);

    // /v1/enis: upstream's shape; every address EC2 gave the ENI, the pods' with their keys.
    let enis = http_get(INTROSPECTION, "/v1/enis").unwrap();
    assert_eq!(enis["TotalIPs"], 6, "{enis:#}");
    assert_eq!(enis["AssignedIPs"], 3, "{enis:#}");
    let all = enis["ENIs"].as_object().unwrap();
    assert_eq!(all.len(), 1);
    let (eni_id, eni) = all.iter().next().unwrap();
    assert_eq!(eni["ID"], eni_id.as_str());
    assert_eq!(eni["IsPrimary"], true);
    assert_eq!(eni["DeviceNumber"], 0);
    let view = ec2_view(&emu, &id).await;
    assert_eq!(&view[0].0, eni_id);
    let cidrs = eni["AvailableIPv4Cidrs"].as_object().unwrap();
    let listed: BTreeSet<String> = cidrs.keys().cloned().collect();
    let in_ec2: BTreeSet<String> = view[0].2.iter().map(|ip| format!("{ip}/32")).collect();
    assert_eq!(listed, in_ec2);
    for i in [0, 2, 3] {
        let c = &cidrs[&format!("{}/32", ips[i])];
        assert_eq!(c["Cidr"]["Mask"], "/////w==");
        assert_eq!(c["IsPrefix"], false);
        let a = &c["IPAddresses"][&ips[i]];
        assert_eq!(a["IPAMKey"]["containerID"], format!("c{i}"), "{c:#}");
        assert_eq!(a["IPAMKey"]["networkName"], "aws-cni");
        assert_eq!(a["IPAMMetadata"]["k8sPodName"], format!("pod-c{i}"));
    }

    // /v1/pool: the mode, the targets, no shortfall, and the decisions that got here.
    let pool = http_get(INTROSPECTION, "/v1/pool").unwrap();
    assert_eq!(pool["mode"], "ip-target", "{pool:#}");
    assert_eq!(pool["targets"]["WARM_IP_TARGET"], 3);
    assert_eq!(pool["targets"]["MINIMUM_IP_TARGET"], 5);
    assert_eq!(pool["state"]["assigned"], 3);
    assert_eq!(pool["state"]["total"], 6);
    assert_eq!(pool["shortfall"], 0);
    assert_eq!(pool["next"], "steady");
    assert_eq!(pool["limits"]["maxPods"], 29, "m5.large: 3 ENIs x 9 + 2");
    let decisions = pool["decisions"].as_array().unwrap();
    assert!(
        decisions
            .iter()
            .any(|d| d["decision"].as_str().unwrap().starts_with("assign")
                && d["outcome"].as_str().unwrap().contains("+5 IPs")),
        "the first fill to MINIMUM_IP_TARGET is explained: {pool:#}"
    );

    // /v1/ec2-budget: what was spent, per action, and the buckets.
    let budget = http_get(INTROSPECTION, "/v1/ec2-budget").unwrap();
    // m5.large's limits come from the built-in table.
    assert_eq!(
        budget["calls"].get("DescribeInstanceTypes"),
        None,
        "{budget:#}"
    );
    assert!(
        budget["log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c[1] == "AssignPrivateIpAddresses" && c[2] == "200"),
        "{budget:#}"
    );
    assert!(
        budget["calls"]["AssignPrivateIpAddresses"]
            .as_u64()
            .unwrap()
            >= 2
    );
    assert_eq!(budget["throttled"], 0);
    let families: BTreeSet<&str> = budget["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["family"].as_str().unwrap())
        .collect();
    assert_eq!(
        families,
        BTreeSet::from(["assign-unassign", "describe", "eni-lifecycle"])
    );

    // Settings: raw knobs for ipamd, typed host-networking ones apart.
    let env = http_get(INTROSPECTION, "/v1/ipamd-env-settings").unwrap();
    assert_eq!(env["WARM_IP_TARGET"], "3");
    assert_eq!(env["WARM_ENI_TARGET"], "");
    assert!(env.get("AWS_VPC_ENI_MTU").is_none(), "{env:#}");
    let net = http_get(INTROSPECTION, "/v1/networkutils-env-settings").unwrap();
    assert_eq!(net["AWS_VPC_ENI_MTU"], 9001);
    assert_eq!(net["AWS_VPC_K8S_CNI_EXTERNALSNAT"], false);
    assert_eq!(net["AWS_VPC_K8S_CNI_RANDOMIZESNAT"], "prng");
    let cfgs = http_get(INTROSPECTION, "/v1/eni-configs").unwrap();
    assert_eq!(cfgs["ENI"], Value::Object(Default::default()));

    // /metrics under upstream's names, with the values the sequence implies.
    let m = scrape();
    let expect = [
        ("awscni_add_ip_req_count", 4.0),
        ("awscni_del_ip_req_count{reason=\"PodDeleted\"}", 1.0),
        ("awscni_assigned_ip_addresses", 3.0),
        ("awscni_total_ip_addresses", 6.0),
        ("awscni_total_ipv4_prefixes", 0.0),
        ("awscni_eni_allocated", 1.0),
        ("awscni_eni_max", 3.0),
        ("awscni_ip_max", 27.0),
        ("awscni_no_available_ip_addresses", 0.0),
        ("awscni_add_network_latency_seconds_count", 4.0),
        (
            "awscni_add_network_latency_seconds_bucket{le=\"+Inf\"}",
            4.0,
        ),
        (
            "awscni_build_info{version=\"0.1.0\",implementation=\"rust\"}",
            1.0,
        ),
    ];
    for (series, v) in expect {
        assert_eq!(sample(&m, series), Some(v), "{series}\n{m}");
    }
    let subnet = eni["SubnetID"].as_str().unwrap();
    assert_eq!(
        sample(
            &m,
            &format!("awscni_subnet_free_ip_addresses{{subnet=\"{subnet}\"}}")
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "awscni_ec2api_req_count{fn=\"AssignPrivateIpAddresses\"}"
        ),
        budget["calls"]["AssignPrivateIpAddresses"].as_f64(),
    );
    assert!(
        sample(
            &m,
            "awscni_aws_api_latency_ms_count{api=\"AssignPrivateIpAddresses\",error=\"false\",status=\"200\"}"
        )
        .is_some(),
        "{m}"
    );
    for l in m.lines().filter(|l| l.starts_with("# TYPE")) {
        let name = l.split(' ').nth(2).unwrap();
        assert!(
            !name.ends_with("_total"),
            "upstream names carry no _total: {l}"
        );
    }

    // The person on the node: `ipamd status` shows the same ENI, pool and pods.
    let out = Command::new(env!("CARGO_BIN_EXE_ipamd"))
        .args(["status", INTROSPECTION])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains(eni_id.as_str()), "{text}");
    assert!(text.contains("ENIs (6 addresses, 3 assigned)"), "{text}");
    assert!(text.contains("mode ip-target"), "{text}");
    assert!(text.contains("Pods (3)"), "{text}");
    for i in [0, 2, 3] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("pod-c{i} ")))
            .unwrap_or_else(|| panic!("pod-c{i} missing:\n{text}"));
        assert!(
            line.contains(&ips[i]) && line.contains(eni_id.as_str()),
            "{line}"
        );
    }
    assert!(!text.contains("pod-c1 "), "{text}");
    // The pool row: 1 ENI, 6 total, 3 assigned, 0 cooling, 3 available, no shortfall.
    let row = text
        .lines()
        .skip_while(|l| !l.starts_with("ENIS"))
        .nth(1)
        .unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells, ["1", "6", "3", "0", "3", "0", "0", "29"], "{text}");

    let health = Command::new(env!("CARGO_BIN_EXE_ipamd"))
        .arg("health")
        .arg(d.socket())
        .output()
        .unwrap();
    assert!(health.status.success(), "{health:?}");
    let absent = Command::new(env!("CARGO_BIN_EXE_ipamd"))
        .args(["health", "/nonexistent/ipamd.sock"])
        .output()
        .unwrap();
    assert!(!absent.status.success());
    assert!(
        String::from_utf8_lossy(&absent.stderr).contains("unreachable"),
        "{absent:?}"
    );
}

#[test]
fn introspection_on_a_unix_socket_and_endpoints_disabled() {
    in_node_ns(
        "ops-unix",
        introspection_on_a_unix_socket_and_endpoints_disabled_,
    )
}

async fn introspection_on_a_unix_socket_and_endpoints_disabled_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "t3.small"]);
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix:{}/introspect.sock", dir.path().display());
    let d = Ipamd::start(
        &emu,
        &[
            ("INTROSPECTION_BIND_ADDRESS", sock.as_str()),
            ("DISABLE_METRICS", "true"),
        ],
    );
    let c = d.client().await;
    assert!(c.add("u0").await.unwrap().success);
    let pods = eventually(Duration::from_secs(5), 1, async || {
        http_get(&sock, "/v1/pods")
            .ok()
            .and_then(|p| p.as_array().map(Vec::len))
            .unwrap_or(0)
    })
    .await;
    assert_eq!(pods, 1, "{}", d.log());
    assert!(
        Command::new("curl")
            .args(["-sf", "http://127.0.0.1:61678/metrics"])
            .status()
            .map(|s| !s.success())
            .unwrap(),
        "DISABLE_METRICS=true serves nothing"
    );
    assert!(
        http_get(INTROSPECTION, "/v1/pods").is_err(),
        "moved to the socket"
    );
}

#[test]
fn addresses_removed_behind_ipamds_back_are_forgotten_counted_and_refilled() {
    in_node_ns("ops-force", addresses_removed_behind_ipamds_back_)
}

async fn addresses_removed_behind_ipamds_back_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let d = Ipamd::start(&emu, &[]);
    let _c = d.client().await;
    let got = eventually(Duration::from_secs(20), (1, 9), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (1, 9), "{}", d.log());
    let view = ec2_view(&emu, &id).await;
    let (eni, victims) = (view[0].0.clone(), view[0].2[..2].to_vec());
    // Someone (a person, another tool) unassigns two free addresses in EC2.
    let conf = ec2_emulator_sdk_check::sdk_config(&emu.endpoint, "us-west-2").await;
    aws_sdk_ec2::Client::new(&conf)
        .unassign_private_ip_addresses()
        .network_interface_id(&eni)
        .private_ip_addresses(&victims[0])
        .private_ip_addresses(&victims[1])
        .send()
        .await
        .unwrap();
    // Two reconciles in a row (2 s apart here) confirm it; ipamd forgets them, counts
    // them under upstream's metric, and refills the pool to its target.
    let removed = eventually(Duration::from_secs(20), Some(2.0), async || {
        sample(&scrape(), "awscni_force_removed_ips")
    })
    .await;
    assert_eq!(removed, Some(2.0), "{}", d.log());
    assert!(
        d.log()
            .contains(&format!("{} is no longer on {eni} in EC2", victims[0]))
    );
    let agree = eventually(Duration::from_secs(20), true, async || {
        let ec2: BTreeSet<String> = ec2_view(&emu, &id).await[0]
            .2
            .iter()
            .map(|ip| format!("{ip}/32"))
            .collect();
        let ours: BTreeSet<String> = http_get(INTROSPECTION, "/v1/enis")
            .map(|e| {
                e["ENIs"][&eni]["AvailableIPv4Cidrs"]
                    .as_object()
                    .map(|c| c.keys().cloned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        ec2.len() == 9 && ec2 == ours
    })
    .await;
    assert!(agree, "ipamd and EC2 agree again, 9 addresses\n{}", d.log());
    assert_eq!(sample(&scrape(), "awscni_force_removed_enis"), Some(0.0));
}

#[test]
fn a_quiet_node_reconciles_from_imds_and_asks_ec2_only_when_they_differ() {
    in_node_ns("ops-quiet", a_quiet_node_reconciles_from_imds_)
}

/// DescribeNetworkInterfaces calls ipamd made (its budget's count).
fn describes() -> u64 {
    http_get(INTROSPECTION, "/v1/ec2-budget").unwrap()["calls"]["DescribeNetworkInterfaces"]
        .as_u64()
        .unwrap_or(0)
}

async fn a_quiet_node_reconciles_from_imds_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    // A reconcile pass every second; EC2's own interval left at its default (5 min).
    let d = Ipamd::start(&emu, &[("IPAMD_RECONCILE_INTERVAL_MS", "1000")]);
    let _c = d.client().await;
    let got = eventually(Duration::from_secs(20), (1, 9), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (1, 9), "{}", d.log());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Quiet: IMDS shows what the datastore holds, so no pass asks EC2.
    let before = describes();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        describes(),
        before,
        "8 quiet reconcile passes asked EC2\n{}",
        d.log()
    );
    // An address unassigned behind ipamd's back: IMDS shows the difference, EC2 is asked,
    // and (two describes agreeing) the address is forgotten and the pool refilled.
    let view = ec2_view(&emu, &id).await;
    let (eni, victim) = (view[0].0.clone(), view[0].2[0].clone());
    let conf = ec2_emulator_sdk_check::sdk_config(&emu.endpoint, "us-west-2").await;
    aws_sdk_ec2::Client::new(&conf)
        .unassign_private_ip_addresses()
        .network_interface_id(&eni)
        .private_ip_addresses(&victim)
        .send()
        .await
        .unwrap();
    let removed = eventually(Duration::from_secs(20), Some(1.0), async || {
        sample(&scrape(), "awscni_force_removed_ips")
    })
    .await;
    assert_eq!(removed, Some(1.0), "{}", d.log());
    assert!(
        describes() >= before + 2,
        "the difference was checked with EC2"
    );
    let refilled = eventually(Duration::from_secs(20), 9, async || {
        ec2_view(&emu, &id).await[0].2.len()
    })
    .await;
    assert_eq!(refilled, 9);
    // Agreeing again: quiet again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let again = describes();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(describes(), again, "quiet again\n{}", d.log());
}
