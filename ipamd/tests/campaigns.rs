//! Campaigns against the real ipamd and emulator processes (issue 13): 50 SIGKILLs at
//! random instants among 200 concurrent Add/Del calls on a disk-backed checkpoint (no
//! answered Add lost, no address doubled, no answered Del undone); and 2 minutes of EC2
//! refusing half of every call (RequestLimitExceeded) and answering the rest 500 ms late
//! while pods churn (the pool converges after, no ENI leaks, and how many AddNetwork calls
//! waited past ADD_NETWORK_WAIT_MS is reported). Each prints its figures.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ec2_emulator_sdk_check::Emulator;
use ipamd::cli::http_get;

/// A small xorshift, seeded from the clock (printed, to replay a failure).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("CAMPAIGN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| ipamd_core::clock::now_ns() | 1);
        eprintln!("CAMPAIGN_SEED={seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn fifty_sigkills_among_concurrent_calls_lose_double_and_undo_nothing() {
    in_node_ns(
        "campaign-kill",
        fifty_sigkills_among_concurrent_calls_lose_double_and_undo_nothing_,
    )
}

async fn fifty_sigkills_among_concurrent_calls_lose_double_and_undo_nothing_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "c5.18xlarge"]).remove(0);
    // A disk: the journal's writer thread with fdatasync, not tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = dir.path().join("ipam.json");
    let mut d = Ipamd::start(
        &emu,
        &[
            ("AWS_VPC_K8S_CNI_BACKING_STORE", store.to_str().unwrap()),
            ("WARM_IP_TARGET", "40"),
            ("MINIMUM_IP_TARGET", "200"),
        ],
    );
    let c = d.client().await;
    let warm = eventually(Duration::from_secs(60), true, async || {
        counts(&emu, &id).await.1 >= 200
    })
    .await;
    assert!(warm, "pool did not warm up\n{}", d.log());
    drop(c);
    let mut rng = Rng::new();
    let (mut lost, mut doubled, mut undone) = (Vec::new(), 0usize, Vec::new());
    let (mut adds_answered, mut dels_answered) = (0usize, 0usize);
    // Pods alive across rounds: key -> address (answered, never deleted).
    let mut alive: BTreeMap<String, String> = BTreeMap::new();
    for round in 0..50 {
        let c = d.client().await;
        // Serving, not only answering (AddNetwork needs the instance known).
        let serving = eventually(Duration::from_secs(20), true, async || {
            c.health().await.is_ok_and(|s| {
                s == vpc_cni_proto::health::health_check_response::ServingStatus::Serving
            })
        })
        .await;
        assert!(serving, "{}", d.log());
        let added: Arc<Mutex<HashMap<String, String>>> = Default::default();
        let del_sent: Arc<Mutex<HashSet<String>>> = Default::default();
        let del_answered: Arc<Mutex<HashSet<String>>> = Default::default();
        let mut tasks = Vec::new();
        // 150 new pods and 50 deletes (of earlier rounds' pods, or of this round's once
        // answered), all at once.
        for i in 0..150 {
            let (c, added) = (c.clone(), added.clone());
            let k = format!("r{round}-{i}");
            let wait = rng.below(40);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if let Ok(r) = c.add(&k).await
                    && r.success
                {
                    added
                        .lock()
                        .unwrap()
                        .insert(k, r.ip_allocation_metadata[0].i_pv4_addr.clone());
                }
            }));
        }
        let old: Vec<String> = alive.keys().take(50).cloned().collect();
        for k in old {
            let (c, del_sent, del_answered) = (c.clone(), del_sent.clone(), del_answered.clone());
            let wait = rng.below(40);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                del_sent.lock().unwrap().insert(k.clone());
                if let Ok(r) = c.del(&k).await
                    && r.success
                {
                    del_answered.lock().unwrap().insert(k);
                }
            }));
        }
        // SIGKILL at a random instant within the burst.
        tokio::time::sleep(Duration::from_millis(10 + rng.below(120))).await;
        d.kill9();
        for t in tasks {
            let _ = t.await;
        }
        drop(c);
        let added = added.lock().unwrap().clone();
        let del_sent = del_sent.lock().unwrap().clone();
        let del_answered = del_answered.lock().unwrap().clone();
        adds_answered += added.len();
        dels_answered += del_answered.len();
        d.spawn();
        let c = d.client().await;
        let l = ipamd_core::checkpoint::load(&store).unwrap();
        let held: HashMap<String, String> = l
            .assignments
            .iter()
            .map(|a| (a.key.container_id.clone(), a.ip.to_string()))
            .collect();
        let ips: HashSet<&String> = held.values().collect();
        doubled += held.len() - ips.len();
        for (k, ip) in added.iter().chain(alive.iter()) {
            if del_sent.contains(k) {
                continue;
            }
            if held.get(k) != Some(ip) {
                lost.push(k.clone());
            }
        }
        for k in &del_answered {
            if held.contains_key(k) {
                undone.push(k.clone());
            }
            alive.remove(k);
        }
        // What a sent-but-unanswered DEL did is the runtime's to retry: settle it now.
        for k in del_sent.difference(&del_answered) {
            let _ = c.del(k).await;
            alive.remove(k);
        }
        // Unanswered ADDs: the runtime retries or deletes; delete them.
        for k in held.keys() {
            if k.starts_with(&format!("r{round}-")) && !added.contains_key(k) {
                let _ = c.del(k).await;
            }
        }
        alive.extend(added);
        // Keep the node from filling up: the oldest pods go (answered, so checked above).
        while alive.len() > 300 {
            let k = alive.keys().next().unwrap().clone();
            assert!(c.del(&k).await.unwrap().success);
            alive.remove(&k);
        }
    }
    eprintln!(
        "SIGKILL campaign: 50 kills, {adds_answered} answered adds and {dels_answered} answered dels among them: {} lost, {doubled} doubled, {} undone",
        lost.len(),
        undone.len()
    );
    assert!(lost.is_empty(), "answered adds lost: {lost:?}");
    assert_eq!(doubled, 0, "addresses held twice");
    assert!(undone.is_empty(), "answered dels undone: {undone:?}");
    assert!(
        adds_answered > 1000,
        "the kills should land among answered calls"
    );
}

#[test]
fn two_minutes_of_ec2_throttling_while_pods_churn() {
    in_node_ns(
        "campaign-ec2",
        two_minutes_of_ec2_throttling_while_pods_churn_,
    )
}

async fn two_minutes_of_ec2_throttling_while_pods_churn_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--type", "m5.4xlarge"]).remove(0);
    let d = Ipamd::start(
        &emu,
        &[
            // Upstream's pacing, but a sweep every 10 s (an ENI created in a failed attach).
            ("IPAMD_POOL_INTERVAL_MS", "5000"),
            ("IPAMD_SHRINK_INTERVAL_MS", "30000"),
            ("IPAMD_RECONCILE_INTERVAL_MS", "60000"),
            ("IPAMD_ENI_MIN_AGE_MS", "60000"),
            ("IPAMD_LEAKED_ENI_SWEEP_MS", "10000"),
            ("IPAMD_LEAKED_ENI_MIN_AGE_MS", "20000"),
            ("ADD_NETWORK_WAIT_MS", "10000"),
        ],
    );
    let c = d.client().await;
    let ready = eventually(Duration::from_secs(30), true, async || {
        counts(&emu, &id).await.1 >= 29
    })
    .await;
    assert!(ready, "{}", d.log());
    emu.control(
        "POST",
        "/_emulator/faults",
        r#"{"action":"*","code":"RequestLimitExceeded","probability":0.5,"latency_ms":500}"#,
    );
    let t0 = Instant::now();
    let mut rng = Rng::new();
    let mut live: Vec<String> = Vec::new();
    let (mut adds, mut late, mut failed) = (0u32, 0u32, 0u32);
    // A growth of the pool that EC2's refusals made slow costs whole batches of 8 at
    // once: consecutive batches with an ADD past the bound are one episode.
    let (mut batches, mut episodes, mut run, mut longest) = (0u32, 0u32, 0u32, 0u32);
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    // Churn in waves: up to 100 pods (4 ENIs' worth of addresses) in batches of 8 at once.
    while t0.elapsed() < Duration::from_secs(120) {
        let grow = live.len() < 20 || (live.len() < 100 && rng.below(3) > 0);
        if grow {
            let mut batch = Vec::new();
            for _ in 0..8 {
                n += 1;
                let k = format!("p{n}");
                let c = c.clone();
                batch.push(tokio::spawn(async move {
                    let t = Instant::now();
                    let r = c.add(&k).await;
                    (k, r.map(|r| r.success).unwrap_or(false), t.elapsed())
                }));
            }
            batches += 1;
            let late_before = late;
            for b in batch {
                let (k, ok, took) = b.await.unwrap();
                adds += 1;
                slowest = slowest.max(took);
                if took >= Duration::from_secs(10) {
                    late += 1;
                }
                if ok {
                    live.push(k);
                } else {
                    failed += 1;
                }
            }
            if late > late_before {
                run += 1;
                if run == 1 {
                    episodes += 1;
                }
                longest = longest.max(run);
            } else {
                run = 0;
            }
        } else {
            for _ in 0..8 {
                if live.is_empty() {
                    break;
                }
                let k = live.swap_remove(rng.below(live.len() as u64) as usize);
                assert!(c.del(&k).await.unwrap().success);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    emu.control("DELETE", "/_emulator/faults", "");
    let budget = http_get("127.0.0.1:61679", "/v1/ec2-budget").unwrap();
    eprintln!(
        "2 min of 50 % RequestLimitExceeded + 500 ms: {adds} AddNetwork calls, {late} waited past ADD_NETWORK_WAIT_MS (10 s) in {episodes} episodes (longest {longest} of {batches} batches), {failed} got no address, slowest {slowest:?}; EC2 calls {}, throttled {}",
        budget["totalCalls"], budget["throttled"]
    );
    // Afterwards: ipamd and EC2 agree on every ENI and address, and no ENI is left
    // unattached (a create whose attach failed is deleted, or swept).
    let agree = eventually(Duration::from_secs(150), true, async || {
        let view = ec2_view(&emu, &id).await;
        let enis: serde_json::Value = http_get("127.0.0.1:61679", "/v1/enis").unwrap();
        let mut in_ec2: BTreeSet<(String, String)> = BTreeSet::new();
        for (eni, _, ips, _) in &view {
            for ip in ips {
                in_ec2.insert((eni.clone(), ip.clone()));
            }
        }
        let mut in_ipamd: BTreeSet<(String, String)> = BTreeSet::new();
        for (eni, e) in enis["ENIs"].as_object().unwrap() {
            // (A /32 per secondary IP; IPAddresses lists only those in use.)
            for cidr in e["AvailableIPv4Cidrs"].as_object().unwrap().keys() {
                if let Some(ip) = cidr.strip_suffix("/32") {
                    in_ipamd.insert((eni.clone(), ip.to_string()));
                }
            }
        }
        let (ec2, _) = ec2_instance(&emu, &id).await;
        let unattached = ec2
            .describe_network_interfaces()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("status")
                    .values("available")
                    .build(),
            )
            .send()
            .await
            .map(|r| r.network_interfaces().len())
            .unwrap_or(usize::MAX);
        if in_ec2 != in_ipamd || unattached != 0 {
            let only_ec2: BTreeSet<&String> =
                in_ec2.difference(&in_ipamd).map(|(e, _)| e).collect();
            eprintln!(
                "not yet: {} addresses only in EC2 (on {only_ec2:?}), {} only in ipamd, {unattached} unattached",
                in_ec2.difference(&in_ipamd).count(),
                in_ipamd.difference(&in_ec2).count()
            );
            tokio::time::sleep(Duration::from_secs(5)).await;
            return false;
        }
        true
    })
    .await;
    if !agree {
        let _ = std::fs::write("/tmp/campaign-ec2.log", d.log());
    }
    assert!(
        agree,
        "ipamd and EC2 did not converge, or an ENI leaked (log: /tmp/campaign-ec2.log)"
    );
    // Under this fault model an ENI growth that pods wait for can still take past the
    // bound: about 4 refusals before its create and attach both go through (one growth in
    // five) cost ~10 s of backoff, halved token rate and 500 ms per call. That is the
    // design (a throttled account is not spent faster for one node), and a run has 3-5
    // growths with pods waiting: 0-2 episodes, each a batch or two. A stall of the pool
    // makes one episode run on; a loop spends calls by the hundred.
    let stalled = episodes > 3 || longest > 6;
    if stalled || std::env::var_os("CAMPAIGN_LOG").is_some() {
        let _ = std::fs::write("/tmp/campaign-ec2.log", d.log());
    }
    assert!(
        !stalled,
        "{late} AddNetwork calls waited past ADD_NETWORK_WAIT_MS on a node with ENI room, in {episodes} episodes, the longest {longest} batches (log: /tmp/campaign-ec2.log)"
    );
    let calls = budget["totalCalls"].as_u64().unwrap();
    assert!(calls <= 300, "{calls} EC2 calls in 2 minutes: a loop");
    assert!(adds > 100, "{adds}");
}
