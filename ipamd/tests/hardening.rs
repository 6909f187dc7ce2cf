//! What production conditions broke (issue 13), each against the real ipamd process, the
//! emulator process and real links and routes in a node namespace: a full node stays
//! healthy; a lost, journal-only, directory or FIFO checkpoint never gives a live pod's
//! address away; an acknowledged DelNetwork survives a crash; EC2 refusing an ENI's
//! addresses is backed off; EC2 answers listing an ENI's own address never reach a pod;
//! an ENI whose link never appears is not attached again and again; IMDS that does not
//! answer at start-up is waited for while DEL is served; bad socket paths, pacing knobs,
//! unsupported features and an oversized checkpoint are refused or set aside.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ec2_emulator_sdk_check::Emulator;
use ipamd::cli::http_get;
use vpc_cni_proto::health::health_check_response::ServingStatus;

const INTROSPECTION: &str = "127.0.0.1:61679";

/// A workspace binary next to this test's (target/<profile>/<name>).
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} not built: cargo build --workspace --bins",
        p.display()
    );
    p
}

fn calls(emu: &Emulator, action: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&emu.control("GET", "/_emulator/calls", "")).unwrap();
    v[action].as_u64().unwrap_or(0)
}

fn pool_json() -> serde_json::Value {
    http_get(INTROSPECTION, "/v1/pool").unwrap()
}

/// DescribeNetworkInterfaces calls ipamd made (its budget's count).
fn ipamd_describes() -> u64 {
    http_get(INTROSPECTION, "/v1/ec2-budget").unwrap()["calls"]["DescribeNetworkInterfaces"]
        .as_u64()
        .unwrap_or(0)
}

/// /metrics as Prometheus text.
fn metrics() -> String {
    let out = Command::new("curl")
        .args(["-sf", "http://127.0.0.1:61678/metrics"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip_of(r: &vpc_cni_proto::rpc::AddNetworkReply) -> String {
    r.ip_allocation_metadata[0].i_pv4_addr.clone()
}

/// A pod's host side as the plugin leaves it: its host veth (named from namespace and
/// pod, as upstream) routing the pod's /32.
fn host_route_for(container: &str, ip: &str) {
    let veth = vpc_cni_proto::host_veth_name("eni", "default", &format!("pod-{container}"));
    sh(&[
        "ip",
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{}p", &veth[..13]),
    ]);
    sh(&["ip", "link", "set", &veth, "up"]);
    sh(&[
        "ip",
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        &veth,
        "scope",
        "link",
    ]);
}

// --- 1. A full node ---------------------------------------------------------------------

#[test]
fn a_full_node_stays_healthy_and_says_it_is_full() {
    in_node_ns("hard-full", a_full_node_stays_healthy_and_says_it_is_full_)
}

async fn a_full_node_stays_healthy_and_says_it_is_full_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    // One ENI of 9 addresses and no room to grow.
    let d = Ipamd::start(&emu, &[("MAX_ENI", "1"), ("ADD_NETWORK_WAIT_MS", "300")]);
    let c = d.client().await;
    // The pool filled first (under load its first AssignPrivateIpAddresses may take longer
    // than the short wait this test gives AddNetwork).
    let free = eventually(Duration::from_secs(20), serde_json::json!(9), async || {
        pool_json()["free"].clone()
    })
    .await;
    assert_eq!(free, 9, "{}", d.log());
    for i in 0..9 {
        assert!(
            c.add(&format!("p{i}")).await.unwrap().success,
            "{}",
            d.log()
        );
    }
    let full = c.add("one-too-many").await.unwrap();
    assert!(!full.success, "no address left: AddNetwork says so");
    // Health is "the daemon serves its API": the probes, `ipamd health`, the plugin's STATUS.
    assert_eq!(
        c.health().await.unwrap(),
        ServingStatus::Serving,
        "{}",
        d.log()
    );
    let health = Command::new(env!("CARGO_BIN_EXE_ipamd"))
        .args(["health", d.socket().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "ipamd health: {}",
        String::from_utf8_lossy(&health.stderr)
    );
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "aws-cni", "type": "aws-cni",
        "ipamdAddress": d.socket(), "pluginLogFile": d.dir.path().join("plugin.log"),
    });
    let mut status = Command::new(workspace_bin("aws-cni"))
        .env_clear()
        .env("CNI_COMMAND", "STATUS")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    status
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = status.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "STATUS on a full node: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // "No free address" is said where it belongs.
    let pool = pool_json();
    assert_eq!(pool["exhausted"], true, "{pool}");
    assert_eq!(pool["free"], 0, "{pool}");
    let metrics = metrics();
    assert!(metrics.contains("\nawscni_pool_exhausted 1\n"), "{metrics}");
    assert!(
        metrics.contains("\nawscni_no_available_ip_addresses 1\n"),
        "{metrics}"
    );
    // A pod leaves: not exhausted any more.
    assert!(c.del("p0").await.unwrap().success);
    assert_eq!(pool_json()["exhausted"], false);
}

// --- 2 and 7. Lost, partial and odd checkpoints ----------------------------------------

#[test]
fn a_lost_or_odd_checkpoint_never_hands_out_a_live_pods_address() {
    in_node_ns(
        "hard-ckpt",
        a_lost_or_odd_checkpoint_never_hands_out_a_live_pods_address_,
    )
}

async fn a_lost_or_odd_checkpoint_never_hands_out_a_live_pods_address_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    let mut d = Ipamd::start(&emu, &[("ADD_NETWORK_WAIT_MS", "2000")]);
    let store = d.store();
    let journal = PathBuf::from(format!("{}.journal", store.display()));
    let mut round = 0;
    for case in ["deleted", "journal only", "a directory", "a FIFO"] {
        round += 1;
        let c = d.client().await;
        // Three live pods: their addresses in ipamd, their routes on the host.
        let mut live = BTreeSet::new();
        for i in 0..3 {
            let k = format!("r{round}-live{i}");
            let r = c.add(&k).await.unwrap();
            assert!(r.success, "{}", d.log());
            host_route_for(&k, &ip_of(&r));
            live.insert(ip_of(&r));
        }
        // A clean restart writes them into the snapshot; a pod added after it is only in
        // the journal; then a crash.
        drop(c);
        d.terminate();
        d.spawn();
        let c = d.client().await;
        let k = format!("r{round}-late");
        let r = c.add(&k).await.unwrap();
        assert!(r.success, "{}", d.log());
        host_route_for(&k, &ip_of(&r));
        live.insert(ip_of(&r));
        drop(c);
        d.kill9();
        match case {
            "deleted" => {
                std::fs::remove_file(&store).unwrap();
                let _ = std::fs::remove_file(&journal);
            }
            "journal only" => std::fs::remove_file(&store).unwrap(),
            "a directory" => {
                std::fs::remove_file(&store).unwrap();
                std::fs::create_dir(&store).unwrap();
                std::fs::write(store.join("x"), b"someone's").unwrap();
            }
            _ => {
                std::fs::remove_file(&store).unwrap();
                nix::unistd::mkfifo(&store, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .unwrap();
            }
        }
        d.spawn();
        let t0 = Instant::now();
        let c = tokio::time::timeout(Duration::from_secs(30), d.client())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{case}: ipamd did not serve (a FIFO must not hang it)\n{}",
                    d.log()
                )
            });
        assert!(t0.elapsed() < Duration::from_secs(20), "{case}");
        // Every other address of the node goes to new pods; none of the live ones.
        let mut fresh = Vec::new();
        for i in 0..12 {
            let r = c.add(&format!("r{round}-new{i}")).await.unwrap();
            if r.success {
                fresh.push(ip_of(&r));
            }
        }
        assert!(fresh.len() >= 5, "{case}: {fresh:?}\n{}", d.log());
        for ip in &fresh {
            assert!(
                !live.contains(ip),
                "{case}: {ip} is a live pod's and was handed out again\n{}",
                d.log()
            );
        }
        if case == "a directory" || case == "a FIFO" {
            let aside = std::fs::read_dir(store.parent().unwrap())
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("ipam.json.corrupt-")
                });
            assert!(aside, "{case}: set aside for a person to read");
        }
        // Clean up this round's pods and routes for the next one.
        for i in 0..12 {
            let _ = c.del(&format!("r{round}-new{i}")).await;
        }
        for i in 0..3 {
            let _ = c.del(&format!("r{round}-live{i}")).await;
        }
        let _ = c.del(&format!("r{round}-late")).await;
        let links: serde_json::Value =
            serde_json::from_str(&sh(&["ip", "-j", "link", "show"])).unwrap();
        for l in links.as_array().unwrap() {
            let n = l["ifname"].as_str().unwrap();
            if n.starts_with("eni") && !n.ends_with('p') {
                sh(&["ip", "link", "del", n]);
            }
        }
    }
    // The rebuilt pods are released by their own DEL (by namespace and pod name).
}

// --- 6. An acknowledged DelNetwork survives a crash -------------------------------------

#[test]
fn an_answered_del_is_durable_even_when_another_del_released_it() {
    in_node_ns(
        "hard-del",
        an_answered_del_is_durable_even_when_another_del_released_it_,
    )
}

async fn an_answered_del_is_durable_even_when_another_del_released_it_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    // A disk (the journal's writer thread, fdatasync), not tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = dir.path().join("ipam.json");
    let mut d = Ipamd::start(
        &emu,
        &[("AWS_VPC_K8S_CNI_BACKING_STORE", store.to_str().unwrap())],
    );
    let mut resurrected = Vec::new();
    let mut kills_on_nothing_held = 0;
    for round in 0..60 {
        let c = d.client().await;
        let k = format!("k{round}");
        assert!(c.add(&k).await.unwrap().success, "{}", d.log());
        // Two DELs of the pod at once (containerd's two DELs, kubelet's retry): one
        // releases, the other finds nothing held.
        let (c1, c2, k1, k2) = (c.clone(), c.clone(), k.clone(), k.clone());
        let first = tokio::spawn(async move { c1.del(&k1).await });
        let second = tokio::spawn(async move { c2.del(&k2).await });
        let pid = nix::unistd::Pid::from_raw(d.child.as_ref().unwrap().id() as i32);
        // Kill at the first answer: it is an answered DEL, and must stay answered.
        let r = tokio::select! {
            r = first => r.unwrap(),
            r = second => r.unwrap(),
        };
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let answered = r.is_ok_and(|r| {
            kills_on_nothing_held += r.ip_allocation_metadata.is_empty() as u32;
            r.success
        });
        drop(c);
        d.kill9();
        d.spawn();
        // (Restored and re-snapshotted once it serves.)
        drop(d.client().await);
        let held = ipamd_core::checkpoint::load(&store)
            .unwrap()
            .assignments
            .iter()
            .any(|a| a.key.container_id == k);
        if answered && held {
            resurrected.push(k);
        }
    }
    eprintln!("{kills_on_nothing_held} kills at a \"nothing held\" answer");
    assert!(kills_on_nothing_held > 0, "the race was never reached");
    assert!(
        resurrected.is_empty(),
        "answered DELs undone by a crash: {resurrected:?}"
    );
}

// --- 5. EC2 refusing an ENI's addresses -------------------------------------------------

#[test]
fn an_eni_ec2_refuses_addresses_for_is_backed_off_and_others_serve() {
    in_node_ns(
        "hard-limit",
        an_eni_ec2_refuses_addresses_for_is_backed_off_and_others_serve_,
    )
}

async fn an_eni_ec2_refuses_addresses_for_is_backed_off_and_others_serve_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    let d = Ipamd::start(
        &emu,
        &[
            ("WARM_IP_TARGET", "2"),
            ("MINIMUM_IP_TARGET", "2"),
            ("ADD_NETWORK_WAIT_MS", "8000"),
        ],
    );
    let c = d.client().await;
    let warm = eventually(Duration::from_secs(20), true, async || {
        pool_json()["state"]["total"].as_u64() == Some(2)
    })
    .await;
    assert!(warm, "{}", d.log());
    // From now on EC2 refuses every AssignPrivateIpAddresses as if the ENI were full,
    // though it has room and a describe shows so.
    emu.control(
        "POST",
        "/_emulator/faults",
        r#"{"action":"AssignPrivateIpAddresses","code":"PrivateIpAddressLimitExceeded"}"#,
    );
    emu.control("DELETE", "/_emulator/calls", "");
    let describes_before = ipamd_describes();
    let t0 = Instant::now();
    // Pods keep coming: the primary ENI cannot grow, a new ENI (created with its
    // addresses, no assign call) serves them.
    let mut ok = 0;
    for i in 0..6 {
        if c.add(&format!("p{i}")).await.unwrap().success {
            ok += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(t0.elapsed())).await;
    // ipamd's own count of describes (the test's hotplug describes too).
    let assigns = calls(&emu, "AssignPrivateIpAddresses");
    let describes = ipamd_describes() - describes_before;
    eprintln!(
        "in 12 s: {assigns} refused assigns, {describes} describes by ipamd, {ok}/6 pods served"
    );
    assert_eq!(ok, 6, "one refusing ENI hid the rest\n{}", d.log());
    // Each ENI is asked again after 1, 2, 4, 8 s: at most 4 each of the instance's 3.
    assert!(
        assigns <= 14,
        "{assigns} refused assigns in 12 s: no backoff\n{}",
        d.log()
    );
    assert!(
        describes <= 16,
        "{describes} describes in 12 s\n{}",
        d.log()
    );
    assert!(
        d.log().contains("EC2 refuses more addresses on"),
        "{}",
        d.log()
    );
}

// --- 10. An ENI's own address in EC2's answers ------------------------------------------

#[test]
fn an_enis_own_address_in_ec2s_answers_never_reaches_a_pod() {
    in_node_ns(
        "hard-primary",
        an_enis_own_address_in_ec2s_answers_never_reaches_a_pod_,
    )
}

async fn an_enis_own_address_in_ec2s_answers_never_reaches_a_pod_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    // EC2 (as stock moto does) echoes the ENI's primary address and one address twice in
    // AssignPrivateIpAddresses, and lists the primary without its flag in describes.
    emu.control(
        "POST",
        "/_emulator/settings",
        r#"{"assign_echoes_primary":true,"describe_primary_unflagged":true}"#,
    );
    let d = Ipamd::start(
        &emu,
        &[
            ("WARM_IP_TARGET", "3"),
            ("MINIMUM_IP_TARGET", "12"),
            ("ADD_NETWORK_WAIT_MS", "3000"),
        ],
    );
    let c = d.client().await;
    let mut got = Vec::new();
    for i in 0..14 {
        let r = c.add(&format!("p{i}")).await.unwrap();
        if r.success {
            got.push(ip_of(&r));
        }
    }
    emu.control(
        "POST",
        "/_emulator/settings",
        r#"{"assign_echoes_primary":false,"describe_primary_unflagged":false}"#,
    );
    let (ec2, _) = ec2_instance(&emu, &id).await;
    let enis = ec2_emulator_sdk_check::attached_enis(&ec2, &id)
        .await
        .unwrap();
    let primaries: HashSet<String> = enis
        .network_interfaces()
        .iter()
        .filter_map(|n| n.private_ip_address().map(str::to_string))
        .collect();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "an address given twice: {got:?}");
    for ip in &got {
        assert!(
            !primaries.contains(ip),
            "{ip} is an ENI's own address\n{}",
            d.log()
        );
    }
    assert!(got.len() >= 10, "{got:?}\n{}", d.log());
}

// --- 13. An ENI whose link never appears ------------------------------------------------

#[test]
fn an_eni_whose_link_never_appears_is_waited_for_not_attached_again() {
    in_node_ns(
        "hard-link",
        an_eni_whose_link_never_appears_is_waited_for_not_attached_again_,
    )
}

async fn an_eni_whose_link_never_appears_is_waited_for_not_attached_again_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    let mut d = Ipamd::start(
        &emu,
        &[
            ("IPAMD_ENI_LINK_WAIT_MS", "500"),
            ("ADD_NETWORK_WAIT_MS", "500"),
        ],
    );
    // The hypervisor never shows the ENI attached at device 1.
    d.hotplug.as_ref().unwrap().withhold(1);
    let c = d.client().await;
    // The primary ENI filled first (the short AddNetwork wait is for the ENI's link, not
    // for the first assign on a loaded machine).
    let free = eventually(Duration::from_secs(20), serde_json::json!(9), async || {
        pool_json()["free"].clone()
    })
    .await;
    assert_eq!(free, 9, "{}", d.log());
    // WARM_ENI_TARGET=1: 9 addresses spare; 2 pods make ipamd attach a second ENI.
    for i in 0..2 {
        assert!(c.add(&format!("p{i}")).await.unwrap().success);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let attaches = calls(&emu, "AttachNetworkInterface");
    assert_eq!(attaches, 1, "attached again and again\n{}", d.log());
    let pool = pool_json();
    let waiting = pool["waitingForLink"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(waiting.len(), 1, "{pool}");
    assert_eq!(waiting[0]["device"], 1, "{pool}");
    let metrics = metrics();
    assert!(
        metrics.contains("awscni_eni_waiting_for_link_seconds{eni=\"eni-"),
        "{metrics}"
    );
    // Pods keep their addresses on the primary ENI meanwhile.
    assert!(c.add("p2").await.unwrap().success);
    // The link appears: the ENI's addresses are served.
    d.hotplug.as_ref().unwrap().release(1);
    let ready = eventually(Duration::from_secs(20), 0, async || {
        pool_json()["waitingForLink"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(9)
    })
    .await;
    assert_eq!(ready, 0, "{}", d.log());
    // The ENI it waited for is the one it has: no other was created meanwhile.
    assert_eq!(counts(&emu, &id).await.0, 2, "{}", d.log());
    assert_eq!(calls(&emu, "AttachNetworkInterface"), 1, "{}", d.log());
    let mut devices = BTreeSet::new();
    for i in 3..14 {
        let r = c.add(&format!("p{i}")).await.unwrap();
        assert!(r.success, "{}", d.log());
        devices.insert(r.ip_allocation_metadata[0].device_number);
    }
    assert!(
        devices.contains(&1),
        "the second ENI serves now: {devices:?}"
    );
    // (14 pods leave fewer than an ENI's worth spare: WARM_ENI_TARGET=1 may now attach a
    // third, at device 2, any time.)
    d.hotplug.take();
}

// --- 14. IMDS not answering at start-up -------------------------------------------------

#[test]
fn imds_not_answering_at_start_is_waited_for_while_del_is_served() {
    in_node_ns(
        "hard-imds",
        imds_not_answering_at_start_is_waited_for_while_del_is_served_,
    )
}

async fn imds_not_answering_at_start_is_waited_for_while_del_is_served_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    let mut d = Ipamd::start(&emu, &[]);
    let c = d.client().await;
    let a = ip_of(&c.add("a").await.unwrap());
    let b = ip_of(&c.add("b").await.unwrap());
    drop(c);
    d.terminate();
    emu.control("POST", "/_emulator/imds", r#"{"unavailable":true}"#);
    d.spawn();
    let c = d.client().await;
    // Up, serving its socket, saying it cannot hand out addresses yet.
    assert_eq!(c.health().await.unwrap(), ServingStatus::NotServing);
    // A pod deleted meanwhile is released from the checkpoint.
    let del = c.del("a").await.unwrap();
    assert_eq!(del.ip_allocation_metadata[0].i_pv4_addr, a, "{}", d.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "ipamd exited\n{}",
        d.log()
    );
    let said = eventually(Duration::from_secs(20), true, async || {
        d.log()
            .contains("instance metadata (IMDS) not available, retrying")
    })
    .await;
    assert!(said, "{}", d.log());
    // A pod added now waits for IMDS; its answer must carry the VPC's CIDRs, which are
    // known only once IMDS has answered (they were read before the wait, and were empty).
    let early = tokio::spawn({
        let c = c.clone();
        async move { c.add("early").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    emu.control("POST", "/_emulator/imds", r#"{"unavailable":false}"#);
    let early = early.await.unwrap().unwrap();
    assert!(early.success, "{early:?}\n{}", d.log());
    assert_eq!(early.vp_cv4_cid_rs, vec!["10.0.0.0/16"], "{early:?}");
    let serving = eventually(Duration::from_secs(15), true, async || {
        c.health().await.is_ok_and(|s| s == ServingStatus::Serving)
    })
    .await;
    assert!(serving, "{}", d.log());
    // The surviving pod keeps its address; new pods get others.
    assert_eq!(ip_of(&c.add("b").await.unwrap()), b);
    assert!(c.add("c").await.unwrap().success);
}

#[test]
fn imds_that_never_answers_stops_ipamd_after_the_bounded_wait() {
    in_node_ns(
        "hard-imds2",
        imds_that_never_answers_stops_ipamd_after_the_bounded_wait_,
    )
}

async fn imds_that_never_answers_stops_ipamd_after_the_bounded_wait_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    // Nothing listens where IMDS should be (the hotplug still reads the emulator's).
    let mut d = Ipamd::start(
        &emu,
        &[
            ("IPAMD_IMDS_WAIT_MS", "2000"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9/"),
        ],
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = d.child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "still running\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(1));
    assert!(t0.elapsed() >= Duration::from_secs(2));
    assert!(d.log().contains("IPAMD_IMDS_WAIT_MS"), "{}", d.log());
}

// --- Bad knobs and paths ----------------------------------------------------------------

/// Starts ipamd with `knobs` and expects it to stop at once with exit 2 naming `var`.
fn refused(emu: &Emulator, knobs: &[(&str, &str)], var: &str) -> Ipamd {
    let mut d = Ipamd::start(emu, knobs);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = d.child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{knobs:?} accepted\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(2), "{knobs:?}\n{}", d.log());
    assert!(
        d.log().contains(var),
        "{knobs:?}: the message names {var}\n{}",
        d.log()
    );
    d
}

#[test]
fn bad_paths_knobs_and_unsupported_features_are_refused_naming_them() {
    in_node_ns(
        "hard-knobs",
        bad_paths_knobs_and_unsupported_features_are_refused_naming_them_,
    )
}

async fn bad_paths_knobs_and_unsupported_features_are_refused_naming_them_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the socket goes is someone's data: refused, left as it was.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"keep me").unwrap();
    refused(
        &emu,
        &[("IPAMD_SOCKET", file.to_str().unwrap())],
        "IPAMD_SOCKET",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let intro = format!("unix:{}", file.display());
    refused(
        &emu,
        &[("INTROSPECTION_BIND_ADDRESS", &intro)],
        "INTROSPECTION_BIND_ADDRESS",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // The socket may not be the checkpoint.
    let store = dir.path().join("ipam.json");
    refused(
        &emu,
        &[
            ("IPAMD_SOCKET", store.to_str().unwrap()),
            ("AWS_VPC_K8S_CNI_BACKING_STORE", store.to_str().unwrap()),
        ],
        "IPAMD_SOCKET",
    );
    // Pacing knobs have floors: a pool loop at 0 ms would spin on EC2.
    for var in [
        "IPAMD_POOL_INTERVAL_MS",
        "IPAMD_RECONCILE_INTERVAL_MS",
        "IPAMD_SHRINK_INTERVAL_MS",
    ] {
        refused(&emu, &[(var, "0")], var);
    }
    // What this daemon does not do is refused, not ignored.
    refused(&emu, &[("ENABLE_POD_ENI", "true")], "ENABLE_POD_ENI");
    refused(
        &emu,
        &[("POD_SECURITY_GROUP_ENFORCING_MODE", "lax")],
        "POD_SECURITY_GROUP_ENFORCING_MODE",
    );
    refused(
        &emu,
        &[("AWS_VPC_K8S_CNI_LOG_FORMAT", "xml")],
        "AWS_VPC_K8S_CNI_LOG_FORMAT",
    );
    refused(
        &emu,
        &[("ADDITIONAL_ENI_TAGS", r#"{"":"v"}"#)],
        "ADDITIONAL_ENI_TAGS",
    );
}

// --- An oversized checkpoint ------------------------------------------------------------

#[test]
fn a_checkpoint_larger_than_any_node_is_set_aside_not_loaded() {
    in_node_ns(
        "hard-huge",
        a_checkpoint_larger_than_any_node_is_set_aside_not_loaded_,
    )
}

async fn a_checkpoint_larger_than_any_node_is_set_aside_not_loaded_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("ipam.json");
    write_allocations(&store, 400_000);
    let mut d = Ipamd::start(
        &emu,
        &[("AWS_VPC_K8S_CNI_BACKING_STORE", store.to_str().unwrap())],
    );
    let c = d.client().await;
    assert!(c.add("after").await.unwrap().success, "{}", d.log());
    let pid = d.child.as_ref().unwrap().id();
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    eprintln!(
        "ipamd peak RSS with a 400,000-allocation checkpoint: {} MB",
        rss_kb / 1024
    );
    assert!(
        rss_kb < 100 * 1024,
        "peak RSS {rss_kb} kB: the file was loaded whole"
    );
    assert!(
        d.log().contains("more than a node's state can")
            || d.log().contains("more than any instance"),
        "{}",
        d.log()
    );
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ipam.json.corrupt-")
        });
    assert!(aside, "kept for a person to read");
    d.kill9();
    // 16,385 allocations is under the size bound but over the count bound: same.
    write_allocations(&store, 16_385);
    d.spawn();
    let c = d.client().await;
    assert!(c.add("again").await.unwrap().success, "{}", d.log());
    assert!(d.log().contains("more than any instance"), "{}", d.log());
}

#[test]
fn restored_assignments_beyond_the_instances_capacity_are_set_aside() {
    in_node_ns(
        "hard-excess",
        restored_assignments_beyond_the_instances_capacity_are_set_aside_,
    )
}

async fn restored_assignments_beyond_the_instances_capacity_are_set_aside_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("ipam.json");
    // 1,000 allocations on no ENI of this node: an m5.large holds 27 addresses for pods.
    write_allocations(&store, 1000);
    let d = Ipamd::start(
        &emu,
        &[("AWS_VPC_K8S_CNI_BACKING_STORE", store.to_str().unwrap())],
    );
    let c = d.client().await;
    assert!(c.add("after").await.unwrap().success);
    let bounded = eventually(Duration::from_secs(20), true, async || {
        ipamd_core::checkpoint::load(&store).is_ok_and(|l| l.assignments.len() <= 28)
    })
    .await;
    assert!(bounded, "{}", d.log());
    let excess = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ipam.json.excess-")
        })
        .expect("the excess is written aside");
    let aside = ipamd_core::checkpoint::load(&excess.path()).unwrap();
    assert!(
        aside.assignments.len() >= 973,
        "{}",
        aside.assignments.len()
    );
}

fn write_allocations(path: &Path, n: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    write!(f, r#"{{"version":"vpc-cni-ipam/1","allocations":["#).unwrap();
    for i in 0..n {
        if i > 0 {
            write!(f, ",").unwrap();
        }
        write!(
            f,
            r#"{{"networkName":"aws-cni","containerID":"c{i:08}","ifName":"eth0","ipv4":"172.{}.{}.{}","allocationTimestamp":1,"metadata":{{"k8sPodNamespace":"default","k8sPodName":"p{i}"}}}}"#,
            16 + i / 65536 % 16,
            i / 256 % 256,
            i % 256
        )
        .unwrap();
    }
    write!(f, "]}}").unwrap();
}
