//! ipamd against the EC2 + IMDS emulator process: the pool reaches its targets, grows
//! and shrinks with pods, frees and deletes ENIs, sweeps leaked ENIs, rides out throttling.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use ec2_emulator_sdk_check::Emulator;

#[test]
fn eni_mode_grows_with_pods_and_frees_the_spare_eni() {
    in_node_ns("ipamd", eni_mode_grows_with_pods_and_frees_the_spare_eni_)
}

async fn eni_mode_grows_with_pods_and_frees_the_spare_eni_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let d = Ipamd::start(&emu, &[]);
    let c = d.client().await;
    // WARM_ENI_TARGET=1 on m5.large: one ENI's worth (9) spare.
    let got = eventually(Duration::from_secs(20), (1, 9), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (1, 9), "{}", d.log());
    let mut ips = HashSet::new();
    for i in 0..5 {
        let r = c.add(&format!("c{i}")).await.unwrap();
        assert!(r.success);
        assert!(
            ips.insert(r.ip_allocation_metadata[0].i_pv4_addr.clone()),
            "unique"
        );
    }
    // 4 spare < 9: a second ENI, filled whole.
    let got = eventually(Duration::from_secs(20), (2, 18), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (2, 18), "{}", d.log());
    let view = ec2_view(&emu, &id).await;
    assert_eq!(view[1].1, 1, "second ENI at device index 1");
    let second = view[1].0.clone();
    // Its host side: eth1 up at MTU 9001 with its primary address, table 2 holding the
    // gateway and default routes, rule pref 32765, and no main-table subnet route.
    // (EC2 shows the ENI before the host does: wait for ipamd to finish its side.)
    let table = eventually(Duration::from_secs(10), true, async || {
        table_routes(2).contains("default via")
    })
    .await;
    assert!(table, "{}", d.log());
    let link: serde_json::Value =
        serde_json::from_str(&sh(&["ip", "-j", "addr", "show", "eth1"])).unwrap();
    assert_eq!(link[0]["mtu"], 9001, "{link}");
    assert!(
        link[0]["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP"),
        "{link}"
    );
    let eni_ip = link[0]["addr_info"][0]["local"]
        .as_str()
        .unwrap()
        .to_string();
    let table = table_routes(2);
    assert!(
        table.contains("default via") && table.contains("dev eth1"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("10.") && l.contains("dev eth1") && l.contains("scope link")),
        "{table}"
    );
    assert_eq!(
        sh(&["ip", "route", "show", "table", "main", "dev", "eth1"]),
        ""
    );
    let rules = sh(&["ip", "rule", "show"]);
    assert!(
        rules.contains(&format!("32765:\tfrom {eni_ip} lookup 2")),
        "{rules}"
    );
    // The node-wide state: SNAT to the primary address, the fwmark rule.
    assert!(
        rules.contains("1024:\tfrom all fwmark 0x80/0x80 lookup main"),
        "{rules}"
    );
    let snat = String::from_utf8_lossy(
        &std::process::Command::new("iptables-save")
            .args(["-t", "nat"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(snat.contains("-j SNAT --to-source"), "{snat}\n{}", d.log());
    for i in 0..5 {
        let r = c.del(&format!("c{i}")).await.unwrap();
        assert!(r.success && !r.ip_allocation_metadata.is_empty());
    }
    // 18 spare >= (1+1) x 9: the second ENI is detached and deleted.
    let got = eventually(Duration::from_secs(20), (1, 9), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (1, 9), "{}", d.log());
    // Detached first, deleted right after: wait for the delete, not just the detach.
    let (ec2, _) = ec2_instance(&emu, &id).await;
    let still_there = eventually(Duration::from_secs(10), false, async || {
        ec2.describe_network_interfaces()
            .send()
            .await
            .unwrap()
            .network_interfaces()
            .iter()
            .any(|n| n.network_interface_id() == Some(second.as_str()))
    })
    .await;
    assert!(!still_there, "freed ENI deleted, not left available");
    // ...and its host side undone before the detach.
    assert_eq!(table_routes(2), "");
    assert!(!sh(&["ip", "rule", "show"]).contains("32765:"));
}

#[test]
fn ip_target_mode_reaches_and_keeps_its_targets() {
    in_node_ns("ipamd", ip_target_mode_reaches_and_keeps_its_targets_)
}

async fn ip_target_mode_reaches_and_keeps_its_targets_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "t3.small"]).remove(0);
    // The upstream scenario: t3.small (3 x 4), WARM_IP=2, MIN_IP=5, 0 pods -> 2 ENIs, 5 IPs.
    let d = Ipamd::start(&emu, &[("WARM_IP_TARGET", "2"), ("MINIMUM_IP_TARGET", "5")]);
    let c = d.client().await;
    let got = eventually(Duration::from_secs(20), (2, 5), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (2, 5), "{}", d.log());
    for i in 0..4 {
        assert!(c.add(&format!("p{i}")).await.unwrap().success);
    }
    // 4 assigned + 2 warm = 6.
    let got = eventually(Duration::from_secs(20), (2, 6), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (2, 6), "{}", d.log());
    for i in 0..4 {
        assert!(c.del(&format!("p{i}")).await.unwrap().success);
    }
    let got = eventually(Duration::from_secs(20), 5, async || {
        counts(&emu, &id).await.1
    })
    .await;
    assert_eq!(got, 5, "shrinks back to MINIMUM_IP_TARGET\n{}", d.log());
}

#[test]
fn add_waits_for_the_refill_instead_of_failing() {
    in_node_ns("ipamd", add_waits_for_the_refill_instead_of_failing_)
}

async fn add_waits_for_the_refill_instead_of_failing_() {
    let emu = Emulator::start();
    let _id = emu.seed(&["--type", "m5.large"]).remove(0);
    // Slow EC2: every assign takes 400 ms. WARM_IP=1 keeps almost nothing spare.
    emu.control(
        "POST",
        "/_emulator/faults",
        r#"{"action":"AssignPrivateIpAddresses","latency_ms":400}"#,
    );
    let d = Ipamd::start(&emu, &[("WARM_IP_TARGET", "1")]);
    let c = d.client().await;
    let mut seen = HashSet::new();
    for i in 0..6 {
        let r = c.add(&format!("w{i}")).await.unwrap();
        assert!(
            r.success,
            "pod {i} was failed instead of waited for\n{}",
            d.log()
        );
        assert!(seen.insert(r.ip_allocation_metadata[0].i_pv4_addr.clone()));
    }
}

#[test]
fn throttling_and_latency_slow_it_down_but_lose_nothing() {
    in_node_ns(
        "ipamd",
        throttling_and_latency_slow_it_down_but_lose_nothing_,
    )
}

async fn throttling_and_latency_slow_it_down_but_lose_nothing_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.xlarge"]).remove(0);
    emu.control(
        "POST",
        "/_emulator/faults",
        r#"{"action":"*","code":"RequestLimitExceeded","probability":0.6,"count":25,"latency_ms":50}"#,
    );
    let d = Ipamd::start(
        &emu,
        &[("WARM_IP_TARGET", "3"), ("ADD_NETWORK_WAIT_MS", "30000")],
    );
    let c = d.client().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move { c.add(&format!("t{i}")).await }));
    }
    let mut ips = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert!(r.success, "{}", d.log());
        assert!(
            ips.insert(r.ip_allocation_metadata[0].i_pv4_addr.clone()),
            "no address twice"
        );
    }
    // The injected throttles really happened (the fault's count went down).
    let faults: serde_json::Value =
        serde_json::from_str(&emu.control("GET", "/_emulator/faults", "")).unwrap();
    let left = faults["*"]["count"].as_u64().unwrap();
    assert!(left < 25, "no throttle was injected: {faults}");
    eprintln!("throttles injected: {}", 25 - left);
    emu.control("DELETE", "/_emulator/faults", "");
    // Every address ipamd gave out is one EC2 holds for this instance.
    let held: HashSet<String> = ec2_view(&emu, &id)
        .await
        .into_iter()
        .flat_map(|e| e.2)
        .collect();
    assert!(
        ips.is_subset(&held),
        "ipamd gave out addresses EC2 does not hold for it"
    );
}

#[test]
fn a_leaked_eni_is_swept() {
    in_node_ns("ipamd", a_leaked_eni_is_swept_)
}

async fn a_leaked_eni_is_swept_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let (ec2, inst) = ec2_instance(&emu, &id).await;
    let subnet = inst.subnet_id().unwrap().to_string();
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    // As a crash between CreateNetworkInterface and AttachNetworkInterface leaves it.
    let leaked = ec2
        .create_network_interface()
        .subnet_id(&subnet)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::NetworkInterface)
                .tags(tag("node.k8s.amazonaws.com/instance_id", &id))
                .tags(tag(
                    "node.k8s.amazonaws.com/createdAt",
                    "2026-01-01T00:00:00Z",
                ))
                .build(),
        )
        .send()
        .await
        .unwrap()
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_string();
    // Someone else's unattached ENI must survive.
    let foreign = ec2
        .create_network_interface()
        .subnet_id(&subnet)
        .send()
        .await
        .unwrap();
    let foreign = foreign
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_string();
    // The ipamd that crashed ran here before: its checkpoint is on disk when the next
    // one starts (a fresh node's first sweep waits the sweep interval; this one's, the
    // minimum age, 0 here).
    let mut d = Ipamd::start(&emu, &[]);
    drop(d.client().await);
    d.kill9();
    d.spawn();
    let _c = d.client().await;
    let exists = async |eni: &str| {
        ec2.describe_network_interfaces()
            .send()
            .await
            .unwrap()
            .network_interfaces()
            .iter()
            .any(|n| n.network_interface_id() == Some(eni))
    };
    let gone = eventually(Duration::from_secs(15), false, async || {
        exists(&leaked).await
    })
    .await;
    assert!(!gone, "leaked ENI swept\n{}", d.log());
    assert!(
        exists(&foreign).await,
        "an ENI without our tag is never touched"
    );
}

#[test]
fn bad_knob_stops_startup_naming_it() {
    in_node_ns("ipamd", bad_knob_stops_startup_naming_it_)
}

async fn bad_knob_stops_startup_naming_it_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    let mut d = Ipamd::start(&emu, &[("WARM_IP_TARGET", "lots")]);
    let status = d.child.as_mut().unwrap().wait().unwrap();
    assert_eq!(status.code(), Some(2));
    let log = d.log();
    assert!(
        log.contains("WARM_IP_TARGET") && log.contains("lots"),
        "{log}"
    );
}

#[test]
fn prefix_mode_keeps_a_warm_prefix() {
    in_node_ns("ipamd", prefix_mode_keeps_a_warm_prefix_)
}

async fn prefix_mode_keeps_a_warm_prefix_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let d = Ipamd::start(
        &emu,
        &[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "1"),
        ],
    );
    let c = d.client().await;
    let prefixes = async || {
        ec2_view(&emu, &id)
            .await
            .iter()
            .map(|e| e.3.len())
            .sum::<usize>()
    };
    assert_eq!(
        eventually(Duration::from_secs(20), 1, prefixes).await,
        1,
        "{}",
        d.log()
    );
    let mut ips = HashSet::new();
    for i in 0..20 {
        let r = c.add(&format!("p{i}")).await.unwrap();
        assert!(r.success);
        ips.insert(r.ip_allocation_metadata[0].i_pv4_addr.clone());
    }
    assert_eq!(ips.len(), 20);
    // 20 pods + 16 warm: three /28s, every pod address inside one of them.
    assert_eq!(
        eventually(Duration::from_secs(20), 3, prefixes).await,
        3,
        "{}",
        d.log()
    );
    let held: Vec<String> = ec2_view(&emu, &id)
        .await
        .into_iter()
        .flat_map(|e| e.3)
        .collect();
    for ip in &ips {
        let a: std::net::Ipv4Addr = ip.parse().unwrap();
        assert!(
            held.iter()
                .any(|p| ipamd_core::net::parse_cidr(p).unwrap().contains(a)),
            "{ip} is in none of {held:?}"
        );
    }
}

#[test]
fn no_free_prefix_falls_back_to_single_addresses() {
    in_node_ns("ipamd", no_free_prefix_falls_back_to_single_addresses_)
}

async fn no_free_prefix_falls_back_to_single_addresses_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    // The subnet is fragmented: EC2 has no /28 to give.
    emu.control(
        "POST",
        "/_emulator/faults",
        r#"{"action":"AssignPrivateIpAddresses","code":"InsufficientCidrBlocks","count":1}"#,
    );
    let d = Ipamd::start(
        &emu,
        &[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "1"),
        ],
    );
    let c = d.client().await;
    let r = c.add("pod").await.unwrap();
    assert!(r.success, "{}", d.log());
    let view = ec2_view(&emu, &id).await;
    assert!(view.iter().all(|e| e.3.is_empty()), "no prefix was given");
    assert!(
        view.iter()
            .any(|e| e.2.contains(&r.ip_allocation_metadata[0].i_pv4_addr))
    );
    assert!(
        d.log().contains("falling back to single IPs"),
        "{}",
        d.log()
    );
}

async fn subnet_of_second_eni(discovery: &str) -> (String, String, String) {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let (ec2, inst) = ec2_instance(&emu, &id).await;
    let (vpc, primary_subnet) = (
        inst.vpc_id().unwrap().to_string(),
        inst.subnet_id().unwrap().to_string(),
    );
    let mk = async |cidr: &str, tagged: bool| {
        let mut b = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block(cidr)
            .availability_zone("us-west-2a");
        if tagged {
            b = b.tag_specifications(
                aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Subnet)
                    .tags(
                        aws_sdk_ec2::types::Tag::builder()
                            .key("kubernetes.io/role/cni")
                            .value("1")
                            .build(),
                    )
                    .build(),
            );
        }
        b.send()
            .await
            .unwrap()
            .subnet()
            .unwrap()
            .subnet_id()
            .unwrap()
            .to_string()
    };
    // A tagged subnet with more room than the primary's /20, and a bigger untagged one.
    let tagged = mk("10.0.32.0/19", true).await;
    let _untagged = mk("10.0.64.0/18", false).await;
    let d = Ipamd::start(&emu, &[("ENABLE_SUBNET_DISCOVERY", discovery)]);
    let c = d.client().await;
    for p in 0..3 {
        assert!(c.add(&format!("s{p}")).await.unwrap().success);
    }
    let got = eventually(Duration::from_secs(20), 2, async || {
        counts(&emu, &id).await.0
    })
    .await;
    assert_eq!(got, 2, "{}", d.log());
    let second = ec2_view(&emu, &id).await[1].0.clone();
    let n = ec2
        .describe_network_interfaces()
        .network_interface_ids(&second)
        .send()
        .await
        .unwrap();
    (
        n.network_interfaces()[0].subnet_id().unwrap().to_string(),
        tagged,
        primary_subnet,
    )
}

#[test]
fn subnet_discovery_puts_new_enis_in_the_roomiest_tagged_subnet() {
    in_node_ns(
        "ipamd",
        subnet_discovery_puts_new_enis_in_the_roomiest_tagged_subnet_,
    )
}

async fn subnet_discovery_puts_new_enis_in_the_roomiest_tagged_subnet_() {
    let (got, tagged, _) = subnet_of_second_eni("true").await;
    assert_eq!(got, tagged);
}

#[test]
fn without_subnet_discovery_new_enis_share_the_primary_subnet() {
    in_node_ns(
        "ipamd",
        without_subnet_discovery_new_enis_share_the_primary_subnet_,
    )
}

async fn without_subnet_discovery_new_enis_share_the_primary_subnet_() {
    let (got, _, primary) = subnet_of_second_eni("false").await;
    assert_eq!(got, primary);
}

#[test]
fn a_new_vpc_cidr_reaches_the_snat_rules_and_the_plugin() {
    in_node_ns(
        "ipamd",
        a_new_vpc_cidr_reaches_the_snat_rules_and_the_plugin_,
    )
}

async fn a_new_vpc_cidr_reaches_the_snat_rules_and_the_plugin_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let d = Ipamd::start(&emu, &[]);
    let c = d.client().await;
    let snat = || {
        String::from_utf8_lossy(
            &std::process::Command::new("iptables")
                .args(["-t", "nat", "-S", "AWS-SNAT-CHAIN-0"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned()
    };
    let ready = eventually(Duration::from_secs(20), true, async || {
        snat().contains("-j SNAT")
    })
    .await;
    assert!(ready, "{}", d.log());
    let (ec2, instance) = ec2_instance(&emu, &id).await;
    ec2.associate_vpc_cidr_block()
        .vpc_id(instance.vpc_id().unwrap())
        .cidr_block("100.64.0.0/16")
        .send()
        .await
        .unwrap();
    // The next reconcile (2 s in tests) re-reads IMDS and converges the rules.
    let seen = eventually(Duration::from_secs(20), true, async || {
        snat().contains("-d 100.64.0.0/16 ")
    })
    .await;
    assert!(seen, "{}\n{}", snat(), d.log());
    let r = c.add("after-cidr").await.unwrap();
    assert!(
        r.vp_cv4_cid_rs.iter().any(|c| c == "100.64.0.0/16"),
        "{:?}",
        r.vp_cv4_cid_rs
    );
}

#[test]
fn a_pod_that_lives_a_second_costs_no_eni_and_a_draining_pool_attaches_at_once() {
    in_node_ns("ipamd", a_pod_that_lives_a_second_costs_no_eni_)
}

async fn a_pod_that_lives_a_second_costs_no_eni_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    // Default knobs (WARM_ENI_TARGET=1) with the default warm grace.
    let d = Ipamd::start(&emu, &[("IPAMD_WARM_GRACE_MS", "5000")]);
    let c = d.client().await;
    let got = eventually(Duration::from_secs(20), (1, 9), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (1, 9), "{}", d.log());
    // One pod for a second: 8 of 9 spare is short of the target, but not for long.
    assert!(c.add("brief").await.unwrap().success);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.del("brief").await.unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        counts(&emu, &id).await,
        (1, 9),
        "no ENI for a brief pod\n{}",
        d.log()
    );
    // A shortfall that lasts: attached once the grace is over.
    assert!(c.add("stays").await.unwrap().success);
    let t = std::time::Instant::now();
    let got = eventually(Duration::from_secs(15), (2, 18), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (2, 18), "{}", d.log());
    assert!(
        t.elapsed() >= Duration::from_secs(4),
        "attached after the grace, not at once"
    );
    c.del("stays").await.unwrap();
    let got = eventually(Duration::from_secs(20), (1, 9), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (1, 9), "the spare ENI goes again\n{}", d.log());
    // Draining: five pods at once leave 4 of 9 free: the ENI is attached at once.
    let t = std::time::Instant::now();
    for i in 0..5 {
        assert!(c.add(&format!("burst{i}")).await.unwrap().success);
    }
    let got = eventually(Duration::from_secs(15), (2, 18), async || {
        counts(&emu, &id).await
    })
    .await;
    assert_eq!(got, (2, 18), "{}", d.log());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "a draining pool waited {:?} for its ENI\n{}",
        t.elapsed(),
        d.log()
    );
}

fn calls(emu: &Emulator, action: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&emu.control("GET", "/_emulator/calls", "")).unwrap();
    v[action].as_u64().unwrap_or(0)
}

/// Something of each of the instance's attached ENIs (sorted), by device.
async fn by_device<T: Ord>(
    emu: &Emulator,
    instance: &str,
    of: impl Fn(&aws_sdk_ec2::types::NetworkInterface) -> Vec<T>,
) -> Vec<Vec<T>> {
    let (ec2, _) = ec2_instance(emu, instance).await;
    let r = ec2_emulator_sdk_check::attached_enis(&ec2, instance)
        .await
        .unwrap();
    let mut v: Vec<(i32, Vec<T>)> = r
        .network_interfaces()
        .iter()
        .map(|n| {
            let mut x = of(n);
            x.sort();
            (
                n.attachment().and_then(|a| a.device_index()).unwrap_or(-1),
                x,
            )
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, x)| x).collect()
}

/// The security groups of the instance's ENIs by device.
async fn groups_by_device(emu: &Emulator, instance: &str) -> Vec<Vec<String>> {
    by_device(emu, instance, |n| {
        n.groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_string))
            .collect()
    })
    .await
}

#[test]
fn secondary_enis_follow_the_primary_enis_security_groups() {
    in_node_ns(
        "pool-sg",
        secondary_enis_follow_the_primary_enis_security_groups_,
    )
}

async fn secondary_enis_follow_the_primary_enis_security_groups_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let (ec2, inst) = ec2_instance(&emu, &id).await;
    let d = Ipamd::start(&emu, &[("WARM_IP_TARGET", "12")]);
    // 12 spare on an m5.large: the primary's 9 and a second ENI.
    let got = eventually(Duration::from_secs(20), 2, async || {
        groups_by_device(&emu, &id).await.len()
    })
    .await;
    assert_eq!(got, 2, "{}", d.log());
    let g = groups_by_device(&emu, &id).await;
    assert_eq!(g[1], g[0], "a new ENI carries the primary's groups");
    // The user adds a group to the node's primary ENI.
    let extra = ec2
        .create_security_group()
        .group_name("extra")
        .description("extra")
        .vpc_id(inst.vpc_id().unwrap())
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    let primary = inst.network_interfaces()[0]
        .network_interface_id()
        .unwrap()
        .to_string();
    let mut want = g[0].clone();
    want.push(extra);
    want.sort();
    // (The new ENI's DeleteOnTermination, the same action, done first.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = calls(&emu, "ModifyNetworkInterfaceAttribute");
    ec2.modify_network_interface_attribute()
        .network_interface_id(&primary)
        .set_groups(Some(want.clone()))
        .send()
        .await
        .unwrap();
    let got = eventually(
        Duration::from_secs(15),
        vec![want.clone(), want.clone()],
        async || groups_by_device(&emu, &id).await,
    )
    .await;
    assert_eq!(got, vec![want.clone(), want], "{}", d.log());
    // One call of ours for the one secondary ENI (the user's own call counted too), and
    // none while nothing changes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        calls(&emu, "ModifyNetworkInterfaceAttribute") - before,
        2,
        "{}",
        d.log()
    );
}

/// The tags of the instance's ENIs by device (upstream's keys and ADDITIONAL_ENI_TAGS').
async fn tags_by_device(emu: &Emulator, instance: &str) -> Vec<Vec<(String, String)>> {
    by_device(emu, instance, |n| {
        n.tag_set()
            .iter()
            .filter(|t| t.key() != Some("node.k8s.amazonaws.com/createdAt"))
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_string(),
                    t.value().unwrap_or_default().to_string(),
                )
            })
            .collect()
    })
    .await
}

#[test]
fn every_managed_eni_carries_upstreams_tags_the_primary_included() {
    in_node_ns(
        "pool-tags",
        every_managed_eni_carries_upstreams_tags_the_primary_included_,
    )
}

async fn every_managed_eni_carries_upstreams_tags_the_primary_included_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let want = |cluster: &str| {
        let mut t = vec![
            (
                "cluster.k8s.amazonaws.com/name".to_string(),
                cluster.to_string(),
            ),
            ("node.k8s.amazonaws.com/instance_id".to_string(), id.clone()),
            ("team".to_string(), "net".to_string()),
        ];
        t.sort();
        t
    };
    let knobs = |cluster: &'static str| {
        vec![
            ("CLUSTER_NAME", cluster),
            ("ADDITIONAL_ENI_TAGS", r#"{"team":"net"}"#),
            ("WARM_IP_TARGET", "12"),
            ("IPAMD_EC2_RECONCILE_INTERVAL_MS", "1000"),
        ]
    };
    assert_eq!(
        tags_by_device(&emu, &id).await,
        vec![vec![]],
        "the seed tags nothing"
    );
    let mut d = Ipamd::start(&emu, &knobs("lab"));
    // The primary ENI (made with the instance, untagged) is tagged from the describe the
    // reconcile pass makes anyway; the second ENI was created with the tags.
    let got = eventually(
        Duration::from_secs(20),
        vec![want("lab"), want("lab")],
        async || tags_by_device(&emu, &id).await,
    )
    .await;
    assert_eq!(got, vec![want("lab"), want("lab")], "{}", d.log());
    // One CreateTags (the primary), and none in the passes after.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(calls(&emu, "CreateTags"), 1, "{}", d.log());
    d.terminate();
    // A restart finds them tagged: no call.
    let mut d = Ipamd::start(&emu, &knobs("lab"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(calls(&emu, "CreateTags"), 1, "{}", d.log());
    d.terminate();
    // The cluster renamed: both ENIs get the new name, one call each.
    let d = Ipamd::start(&emu, &knobs("lab2"));
    let got = eventually(
        Duration::from_secs(20),
        vec![want("lab2"), want("lab2")],
        async || tags_by_device(&emu, &id).await,
    )
    .await;
    assert_eq!(got, vec![want("lab2"), want("lab2")], "{}", d.log());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(calls(&emu, "CreateTags"), 3, "{}", d.log());
}
