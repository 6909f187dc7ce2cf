//! Restarts: kill -9 in the middle of 200 concurrent Add/Del calls loses no answered
//! assignment and doubles none; start-up serves from the checkpoint before EC2 answers;
//! a node moves from aws-node keeping its pods' addresses; a corrupt checkpoint is set
//! aside instead of crash-looping.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ec2_emulator_sdk_check::Emulator;
use ipamd_core::checkpoint;

#[test]
fn sigkill_during_200_concurrent_calls_loses_and_doubles_nothing_on_disk() {
    in_node_ns(
        "ipamd",
        sigkill_during_200_concurrent_calls_loses_and_doubles_nothing_on_disk_,
    )
}

async fn sigkill_during_200_concurrent_calls_loses_and_doubles_nothing_on_disk_() {
    // A disk: the journal goes through the writer thread (group commit).
    sigkill_during_churn(None).await;
}

#[test]
fn sigkill_during_200_concurrent_calls_loses_and_doubles_nothing_on_tmpfs() {
    in_node_ns(
        "ipamd",
        sigkill_during_200_concurrent_calls_loses_and_doubles_nothing_on_tmpfs_,
    )
}

async fn sigkill_during_200_concurrent_calls_loses_and_doubles_nothing_on_tmpfs_() {
    // tmpfs, as /var/run on a node: the journal is written inline.
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    sigkill_during_churn(Some(dir.path().join("ipam.json"))).await;
}

async fn sigkill_during_churn(store: Option<std::path::PathBuf>) {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "c5.18xlarge"]).remove(0);
    let store_s = store.as_ref().map(|p| p.display().to_string());
    let mut knobs = vec![
        ("WARM_IP_TARGET", "40"),
        ("MINIMUM_IP_TARGET", "200"),
        ("IPAMD_CHECKPOINT_FSYNC", "false"),
    ];
    if let Some(s) = &store_s {
        knobs.push(("AWS_VPC_K8S_CNI_BACKING_STORE", s.as_str()));
    }
    let mut d = Ipamd::start(&emu, &knobs);
    let c = d.client().await;
    let warm = eventually(Duration::from_secs(60), true, async || {
        counts(&emu, &id).await.1 >= 200
    })
    .await;
    assert!(warm, "pool did not warm up\n{}", d.log());

    let added: Arc<Mutex<HashMap<String, String>>> = Default::default();
    let del_sent: Arc<Mutex<HashSet<String>>> = Default::default();
    let del_answered: Arc<Mutex<HashSet<String>>> = Default::default();
    let answered = Arc::new(AtomicUsize::new(0));
    let pid = nix::unistd::Pid::from_raw(d.child.as_ref().unwrap().id() as i32);
    let mut tasks = Vec::new();
    for i in 0..150 {
        let (c, added, answered) = (c.clone(), added.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let k = format!("k{i}");
            // Spread over ~150 ms so the kill lands among calls in flight.
            tokio::time::sleep(Duration::from_millis(i)).await;
            if let Ok(r) = c.add(&k).await
                && r.success
            {
                added
                    .lock()
                    .unwrap()
                    .insert(k, r.ip_allocation_metadata[0].i_pv4_addr.clone());
                answered.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // 50 deletes, each of a pod whose add was answered first.
    for i in 0..50 {
        let (c, added, del_sent, del_answered) = (
            c.clone(),
            added.clone(),
            del_sent.clone(),
            del_answered.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let k = format!("k{}", i * 3);
            let t0 = Instant::now();
            while !added.lock().unwrap().contains_key(&k) {
                if t0.elapsed() > Duration::from_secs(5) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            del_sent.lock().unwrap().insert(k.clone());
            if let Ok(r) = c.del(&k).await
                && r.success
            {
                del_answered.lock().unwrap().insert(k);
            }
        }));
    }
    // Kill -9 in the middle of it.
    let t0 = Instant::now();
    while answered.load(Ordering::SeqCst) < 60 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    for t in tasks {
        let _ = t.await;
    }
    d.kill9();
    let added = added.lock().unwrap().clone();
    let del_sent = del_sent.lock().unwrap().clone();
    let del_answered = del_answered.lock().unwrap().clone();
    eprintln!(
        "before the kill: {} adds answered, {} deletes sent, {} answered",
        added.len(),
        del_sent.len(),
        del_answered.len()
    );
    assert!(
        added.len() >= 60 && added.len() < 150,
        "the kill should land mid-churn, but {} of 150 adds were answered",
        added.len()
    );

    d.spawn();
    let c = d.client().await;
    let l = checkpoint::load(&store.clone().unwrap_or_else(|| d.store())).unwrap();
    let held: HashMap<String, String> = l
        .assignments
        .iter()
        .map(|a| (a.key.container_id.clone(), a.ip.to_string()))
        .collect();
    let ips: HashSet<&String> = held.values().collect();
    assert_eq!(ips.len(), held.len(), "an address held twice");
    for (k, ip) in &added {
        if del_answered.contains(k) {
            assert!(
                !held.contains_key(k),
                "{k} was deleted (answered) but came back"
            );
        } else if !del_sent.contains(k) {
            assert_eq!(held.get(k), Some(ip), "{k}'s answered address was lost");
            // The runtime may repeat ADD: the same address.
            let again = c.add(k).await.unwrap();
            assert_eq!(&again.ip_allocation_metadata[0].i_pv4_addr, ip);
        }
    }
    // A new pod never gets an address a surviving pod holds.
    let fresh = c.add("fresh").await.unwrap();
    assert!(!ips.contains(&fresh.ip_allocation_metadata[0].i_pv4_addr));
}

#[test]
fn serves_from_the_checkpoint_before_ec2_answers() {
    in_node_ns("ipamd", serves_from_the_checkpoint_before_ec2_answers_)
}

async fn serves_from_the_checkpoint_before_ec2_answers_() {
    let emu = Emulator::start();
    let _id = emu.seed(&["--type", "m5.large"]).remove(0);
    let mut d = Ipamd::start(&emu, &[]);
    let c = d.client().await;
    let mut held = HashMap::new();
    for i in 0..5 {
        let r = c.add(&format!("s{i}")).await.unwrap();
        held.insert(
            format!("s{i}"),
            r.ip_allocation_metadata[0].i_pv4_addr.clone(),
        );
    }
    d.terminate();
    // EC2 now takes 3 s per call; IMDS is local and quick.
    emu.control(
        "POST",
        "/_emulator/faults",
        r#"{"action":"*","latency_ms":3000}"#,
    );
    let t0 = Instant::now();
    d.spawn();
    let c = d.client().await;
    for (k, ip) in &held {
        assert_eq!(
            &c.add(k).await.unwrap().ip_allocation_metadata[0].i_pv4_addr,
            ip
        );
    }
    let took = t0.elapsed();
    eprintln!("serving restored pods {took:?} after start");
    assert!(
        took < Duration::from_secs(3),
        "waited for EC2 before serving: {took:?}"
    );
    emu.control("DELETE", "/_emulator/faults", "");
}

#[test]
fn moves_from_aws_node_keeping_addresses() {
    in_node_ns("ipamd", moves_from_aws_node_keeping_addresses_)
}

async fn moves_from_aws_node_keeping_addresses_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.large"]).remove(0);
    // aws-node had put 3 secondary IPs on the primary ENI and given one to a pod.
    let (ec2, inst) = ec2_instance(&emu, &id).await;
    let eni = inst.network_interfaces()[0]
        .network_interface_id()
        .unwrap()
        .to_string();
    let r = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&eni)
        .secondary_private_ip_address_count(3)
        .send()
        .await
        .unwrap();
    let pod_ip = r.assigned_private_ip_addresses()[1]
        .private_ip_address()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("ipam.json");
    std::fs::write(
        &store,
        format!(
            r#"{{"version":"vpc-cni-ipam/1","allocations":[{{"networkName":"aws-cni","containerID":"upstream-sandbox","ifName":"eth0","ipv4":"{pod_ip}","allocationTimestamp":1716812345123456789,"metadata":{{"k8sPodNamespace":"default","k8sPodName":"legacy"}}}}]}}"#
        ),
    )
    .unwrap();
    let d = Ipamd::start(
        &emu,
        &[("AWS_VPC_K8S_CNI_BACKING_STORE", store.to_str().unwrap())],
    );
    let c = d.client().await;
    let mut others = HashSet::new();
    for i in 0..8 {
        let r = c.add(&format!("new{i}")).await.unwrap();
        others.insert(r.ip_allocation_metadata[0].i_pv4_addr.clone());
    }
    assert!(
        !others.contains(&pod_ip),
        "the legacy pod's address was given away\n{}",
        d.log()
    );
    let again = c.add("upstream-sandbox").await.unwrap();
    assert_eq!(again.ip_allocation_metadata[0].i_pv4_addr, pod_ip);
    let del = c.del("upstream-sandbox").await.unwrap();
    assert_eq!(del.ip_allocation_metadata[0].i_pv4_addr, pod_ip);
}

#[test]
fn a_corrupt_checkpoint_is_set_aside_not_a_crash_loop() {
    in_node_ns("ipamd", a_corrupt_checkpoint_is_set_aside_not_a_crash_loop_)
}

async fn a_corrupt_checkpoint_is_set_aside_not_a_crash_loop_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "m5.large"]);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("ipam.json");
    std::fs::write(
        &store,
        b"{\"version\":\"vpc-cni-ipam/1\",\"allocations\":[{\"networkName\":",
    )
    .unwrap();
    let d = Ipamd::start(
        &emu,
        &[("AWS_VPC_K8S_CNI_BACKING_STORE", store.to_str().unwrap())],
    );
    let c = d.client().await;
    assert!(c.add("after").await.unwrap().success);
    let log = d.log();
    assert!(
        log.contains("unusable") && log.contains("moved it to"),
        "{log}"
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the corrupt file is kept for a person to read"
    );
}
