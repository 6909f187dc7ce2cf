//! A model of upstream aws-node's (v1.x ipamd) calling pattern, from its source, on the
//! same EC2 model. What it does, and what it leaves out:
//!
//! - Limits from its built-in instance-type table (no DescribeInstanceTypes); at start one
//!   DescribeNetworkInterfaces of the node's ENIs (`DescribeAllENIs` in nodeInit) and a
//!   CreateTags for each that lacks the instance's tag (`TagENI`: a fresh node's primary).
//! - One pool pass every 5 s (`ipPoolMonitorInterval`), one action per pass: short of the
//!   target, one AssignPrivateIpAddresses on the first ENI with room (a whole ENI's worth
//!   in WARM_ENI mode, the shortfall with WARM_IP / MINIMUM_IP, /28s with prefixes); with
//!   no room, one new ENI: DescribeSubnets when subnet discovery is on (its default),
//!   CreateNetworkInterface with the addresses, AttachNetworkInterface,
//!   ModifyNetworkInterfaceAttribute (DeleteOnTermination), then the wait for the ENI in
//!   IMDS (`eniAttachTime`-like: modelled as 2 s). At most every 30 s
//!   (`decreaseIPPoolInterval`) the pass may shrink instead: in WARM_ENI mode one ENI
//!   past the target that is empty, not in cooldown and at least 60 s old is freed
//!   (DescribeNetworkInterfaces for its attachment, DetachNetworkInterface,
//!   DeleteNetworkInterface retried while EC2 says it is in use); with IP targets, the
//!   surplus free addresses are unassigned, one call per ENI.
//! - Reconcile: IMDS each 60 s (unmetered) and a DescribeNetworkInterfaces every 2 min
//!   (what was measured on upstream v1.23.2 idle: findings.md).
//! - The leaked-ENI cleanup: first after a random 0-300 s (`eniCleanupStartupDelayMax`),
//!   then hourly: one DescribeNetworkInterfaces.
//! - AddNetwork never waits: without a free address (30 s cooldown after a release) it
//!   fails at once and kubelet tries again after its back-off.
//! - aws-sdk-go-v2's standard retryer as upstream configures it (`awssession`: 10
//!   attempts): a throttled or transient call is retried after rand x min(20 s,
//!   2^attempt s), paying 5 of a 500-token retry quota per retry (refunded on success).
//! - Left out: custom networking, the VPC resource controller's trunk ENIs, EFA, the
//!   Kubernetes API's calls (not EC2), IMDS lag.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ipamd_core::cloud::{CloudResult, Ec2, Imds, NewEni};
use ipamd_core::pool::Limits;
use tokio::time::Instant;

use crate::PodApi;
use crate::model::{NodeCloud, Rng, instance_limits};
use crate::scenario::Scenario;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Eni(u32),
    Ip { warm: u32, min: u32 },
    Prefix(u32),
}

struct UEni {
    id: String,
    device: u32,
    primary: bool,
    attachment: Option<String>,
    addrs: Vec<Ipv4Addr>,
    slots_used: u32,
    attached_at: Instant,
}

#[derive(Default)]
struct State {
    enis: Vec<UEni>,
    assigned: HashMap<String, Ipv4Addr>,
    cooldown: HashMap<Ipv4Addr, Instant>,
    quota: u32,
}

pub struct Upstream {
    cloud: NodeCloud,
    instance_id: String,
    subnet_id: String,
    sgs: Vec<String>,
    limits: Limits,
    mode: Mode,
    subnet_discovery: bool,
    cooldown: Duration,
    scale: f64,
    state: Mutex<State>,
    rng: Mutex<Rng>,
}

impl Upstream {
    fn secs(&self, s: f64) -> Duration {
        Duration::from_secs_f64(s * self.scale)
    }

    /// The standard retryer: up to 10 attempts, full-jitter exponential back-off
    /// capped at 20 s, a retry quota of 500 tokens at 5 a retry.
    async fn call<T, F, Fut>(&self, f: F) -> CloudResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = CloudResult<T>>,
    {
        let mut attempt = 1u32;
        let mut paid = 0;
        loop {
            match f().await {
                Ok(v) => {
                    let mut s = self.state.lock().unwrap();
                    s.quota = (s.quota + if paid > 0 { paid } else { 1 }).min(500);
                    return Ok(v);
                }
                Err(e) => {
                    let can = {
                        let mut s = self.state.lock().unwrap();
                        let ok = e.is_transient() && attempt < 10 && s.quota >= 5;
                        if ok {
                            s.quota -= 5;
                        }
                        ok
                    };
                    if !can {
                        return Err(e);
                    }
                    paid = 5;
                    let cap = (1u64 << attempt.min(10)) as f64;
                    let r = self.rng.lock().unwrap().f64();
                    tokio::time::sleep(self.secs(r * cap.min(20.0))).await;
                    attempt += 1;
                }
            }
        }
    }

    fn free_now(&self, s: &State) -> u32 {
        let now = Instant::now();
        let held: u32 = s.enis.iter().map(|e| e.addrs.len() as u32).sum();
        let cooling = s.cooldown.values().filter(|t| **t > now).count() as u32;
        held.saturating_sub(s.assigned.len() as u32 + cooling)
    }

    fn per_eni(&self) -> u32 {
        self.limits.ipv4_per_eni - 1
    }

    /// How many addresses the pass should add (0: none).
    fn short(&self, s: &State) -> u32 {
        let free = self.free_now(s);
        let total: u32 = s.enis.iter().map(|e| e.addrs.len() as u32).sum();
        match self.mode {
            Mode::Eni(w) => {
                let want = self.per_eni() * w.max(1);
                want.saturating_sub(free)
            }
            Mode::Ip { warm, min } => warm.saturating_sub(free).max(min.saturating_sub(total)),
            Mode::Prefix(w) => (16 * w.max(1)).saturating_sub(free),
        }
    }

    async fn pass(&self, last_shrink: &mut Instant) {
        let (short, room) = {
            let s = self.state.lock().unwrap();
            let short = self.short(&s);
            let room = s
                .enis
                .iter()
                .filter(|e| e.slots_used < self.per_eni())
                .map(|e| (e.id.clone(), self.per_eni() - e.slots_used))
                .next();
            (short, room)
        };
        if short > 0 {
            if let Some((eni, room)) = room {
                let n = match self.mode {
                    Mode::Eni(_) => room,
                    Mode::Ip { .. } => short.min(room),
                    Mode::Prefix(_) => short.div_ceil(16).min(room),
                };
                let got = if let Mode::Prefix(_) = self.mode {
                    self.call(|| self.cloud.assign_prefixes(&eni, n))
                        .await
                        .map(|ps| {
                            ps.iter()
                                .flat_map(|p| {
                                    (0..16u32).map(move |i| Ipv4Addr::from(u32::from(p.addr) + i))
                                })
                                .collect::<Vec<_>>()
                        })
                } else {
                    self.call(|| self.cloud.assign_ips(&eni, n)).await
                };
                if let Ok(addrs) = got {
                    let mut s = self.state.lock().unwrap();
                    if let Some(e) = s.enis.iter_mut().find(|e| e.id == eni) {
                        e.slots_used += n;
                        e.addrs.extend(addrs);
                    }
                }
                return;
            }
            let count = self.state.lock().unwrap().enis.len() as u32;
            if count < self.limits.max_enis {
                self.alloc_eni(short).await;
            }
            return;
        }
        if short == 0 && last_shrink.elapsed() >= self.secs(30.0) {
            *last_shrink = Instant::now();
            self.shrink().await;
        }
    }

    async fn alloc_eni(&self, short: u32) {
        if self.subnet_discovery {
            let vpc = "vpc-0sim".to_string();
            let _ = self.call(|| self.cloud.cni_subnets(&vpc)).await;
        }
        let (ips, prefixes) = match self.mode {
            Mode::Eni(_) => (self.per_eni(), 0),
            Mode::Ip { .. } => (short.clamp(1, self.per_eni()), 0),
            Mode::Prefix(_) => (0, short.div_ceil(16).clamp(1, self.per_eni())),
        };
        let req = NewEni {
            subnet_id: self.subnet_id.clone(),
            security_groups: self.sgs.clone(),
            description: format!("aws-K8S-{}", self.instance_id),
            tags: vec![(
                "node.k8s.amazonaws.com/instance_id".into(),
                self.instance_id.clone(),
            )],
            secondary_ips: ips,
            prefixes,
        };
        let Ok(eni) = self.call(|| self.cloud.create_eni(&req)).await else {
            return;
        };
        let device = {
            let s = self.state.lock().unwrap();
            (1..16)
                .find(|d| s.enis.iter().all(|e| e.device != *d))
                .unwrap_or(1)
        };
        let att = match self
            .call(|| self.cloud.attach_eni(&eni.id, &self.instance_id, device))
            .await
        {
            Ok(a) => a,
            Err(_) => {
                let _ = self.call(|| self.cloud.delete_eni(&eni.id)).await;
                return;
            }
        };
        let _ = self
            .call(|| self.cloud.set_delete_on_termination(&eni.id, &att))
            .await;
        // Waiting for the ENI and its addresses to show in IMDS.
        tokio::time::sleep(self.secs(2.0)).await;
        let mut addrs: Vec<Ipv4Addr> = eni.secondary_ips.clone();
        for p in &eni.prefixes {
            addrs.extend((0..16u32).map(|i| Ipv4Addr::from(u32::from(p.addr) + i)));
        }
        self.state.lock().unwrap().enis.push(UEni {
            id: eni.id.clone(),
            device,
            primary: false,
            attachment: Some(att),
            addrs,
            slots_used: ips + prefixes,
            attached_at: Instant::now(),
        });
    }

    async fn shrink(&self) {
        match self.mode {
            Mode::Eni(w) | Mode::Prefix(w) => {
                let per = if matches!(self.mode, Mode::Prefix(_)) {
                    16 * self.per_eni()
                } else {
                    self.per_eni()
                };
                let victim = {
                    let s = self.state.lock().unwrap();
                    let free = self.free_now(&s);
                    if free < (w + 1) * per {
                        return;
                    }
                    let now = Instant::now();
                    s.enis
                        .iter()
                        .filter(|e| {
                            !e.primary
                                && now.saturating_duration_since(e.attached_at) >= self.secs(60.0)
                                && e.addrs.iter().all(|a| {
                                    !s.assigned.values().any(|x| x == a)
                                        && s.cooldown.get(a).is_none_or(|t| *t <= now)
                                })
                        })
                        .max_by_key(|e| e.device)
                        .map(|e| (e.id.clone(), e.attachment.clone()))
                };
                let Some((id, _)) = victim else { return };
                // FreeENI: the attachment from a describe, detach, delete (retried).
                let _ = self
                    .call(|| self.cloud.instance_enis(&self.instance_id))
                    .await;
                let att = {
                    let s = self.state.lock().unwrap();
                    s.enis
                        .iter()
                        .find(|e| e.id == id)
                        .and_then(|e| e.attachment.clone())
                };
                if let Some(att) = att
                    && self.call(|| self.cloud.detach_eni(&att)).await.is_err()
                {
                    return;
                }
                self.state.lock().unwrap().enis.retain(|e| e.id != id);
                for _ in 0..20 {
                    tokio::time::sleep(self.secs(2.0)).await;
                    match self.call(|| self.cloud.delete_eni(&id)).await {
                        Err(e) if e.code == "InvalidNetworkInterface.InUse" => continue,
                        _ => break,
                    }
                }
            }
            Mode::Ip { warm, min } => {
                let plan: Vec<(String, Vec<Ipv4Addr>)> = {
                    let s = self.state.lock().unwrap();
                    let free = self.free_now(&s);
                    let total: u32 = s.enis.iter().map(|e| e.addrs.len() as u32).sum();
                    let mut over = free.saturating_sub(warm).min(total.saturating_sub(min));
                    let now = Instant::now();
                    let mut plan = Vec::new();
                    for e in &s.enis {
                        if over == 0 {
                            break;
                        }
                        let take: Vec<Ipv4Addr> = e
                            .addrs
                            .iter()
                            .filter(|a| {
                                !s.assigned.values().any(|x| x == *a)
                                    && s.cooldown.get(*a).is_none_or(|t| *t <= now)
                            })
                            .take(over as usize)
                            .copied()
                            .collect();
                        over -= take.len() as u32;
                        if !take.is_empty() {
                            plan.push((e.id.clone(), take));
                        }
                    }
                    plan
                };
                for (eni, ips) in plan {
                    if self
                        .call(|| self.cloud.unassign_ips(&eni, &ips))
                        .await
                        .is_ok()
                    {
                        let mut s = self.state.lock().unwrap();
                        if let Some(e) = s.enis.iter_mut().find(|e| e.id == eni) {
                            e.addrs.retain(|a| !ips.contains(a));
                            e.slots_used = e.slots_used.saturating_sub(ips.len() as u32);
                        }
                    }
                }
            }
        }
    }
}

#[async_trait]
impl PodApi for Upstream {
    async fn add(&self, key: &str) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.assigned.contains_key(key) {
            return true;
        }
        let now = Instant::now();
        let pick = s
            .enis
            .iter()
            .flat_map(|e| e.addrs.iter())
            .copied()
            .find(|a| {
                !s.assigned.values().any(|x| x == a) && s.cooldown.get(a).is_none_or(|t| *t <= now)
            });
        match pick {
            Some(a) => {
                s.assigned.insert(key.to_string(), a);
                s.cooldown.remove(&a);
                true
            }
            None => false,
        }
    }
    async fn del(&self, key: &str) {
        let mut s = self.state.lock().unwrap();
        if let Some(a) = s.assigned.remove(key) {
            s.cooldown.insert(a, Instant::now() + self.cooldown);
        }
    }
}

pub async fn start(sc: &Scenario, cloud: NodeCloud) -> Arc<dyn PodApi> {
    let env = sc.knobs.clone();
    let num = |k: &str| env.get(k).and_then(|v| v.parse::<u32>().ok());
    let on = |k: &str, d: bool| env.get(k).map(|v| v == "true").unwrap_or(d);
    let mode = if on("ENABLE_PREFIX_DELEGATION", false) {
        Mode::Prefix(num("WARM_PREFIX_TARGET").unwrap_or(1))
    } else if num("WARM_IP_TARGET").is_some() || num("MINIMUM_IP_TARGET").is_some() {
        Mode::Ip {
            warm: num("WARM_IP_TARGET").unwrap_or(0),
            min: num("MINIMUM_IP_TARGET").unwrap_or(0),
        }
    } else {
        Mode::Eni(num("WARM_ENI_TARGET").unwrap_or(1))
    };
    let meta = cloud.instance().await.expect("model IMDS");
    let enis = cloud.enis().await.expect("model IMDS");
    let primary = enis.iter().find(|e| e.device_number == 0).expect("primary");
    let seed = cloud.node as u64 ^ sc.seed.rotate_left(17);
    let me = Arc::new(Upstream {
        instance_id: meta.instance_id.clone(),
        subnet_id: primary.subnet_id.clone(),
        sgs: primary.security_groups.clone(),
        limits: instance_limits(&meta.instance_type).expect("a known instance type"),
        mode,
        subnet_discovery: on("ENABLE_SUBNET_DISCOVERY", true),
        cooldown: Duration::from_secs_f64(
            num("IP_COOLDOWN_PERIOD").unwrap_or(30) as f64 * sc.time_scale,
        ),
        scale: sc.time_scale,
        state: Mutex::new(State {
            quota: 500,
            ..State::default()
        }),
        rng: Mutex::new(Rng::new(seed)),
        cloud,
    });
    me.state.lock().unwrap().enis.push(UEni {
        id: primary.id.clone(),
        device: 0,
        primary: true,
        attachment: None,
        addrs: primary.secondary_ips.clone(),
        slots_used: primary.secondary_ips.len() as u32,
        attached_at: Instant::now(),
    });
    // nodeInit: DescribeAllENIs, then TagENI on each managed ENI lacking the instance tag
    // (a CreateTags for the primary of a fresh node).
    let id = me.instance_id.clone();
    if let Ok(described) = me.call(|| me.cloud.instance_enis(&id)).await {
        let tag = ("node.k8s.amazonaws.com/instance_id".to_string(), id.clone());
        for e in described.iter().filter(|e| !e.tags.contains(&tag)) {
            let tags = [tag.clone()];
            let _ = me.call(|| me.cloud.create_tags(&e.id, &tags)).await;
        }
    }
    let pool = me.clone();
    tokio::spawn(async move {
        let mut last_shrink = Instant::now();
        loop {
            pool.pass(&mut last_shrink).await;
            tokio::time::sleep(pool.secs(5.0)).await;
        }
    });
    let rec = me.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(rec.secs(120.0)).await;
            let id = rec.instance_id.clone();
            let _ = rec.call(|| rec.cloud.instance_enis(&id)).await;
        }
    });
    let sweep = me.clone();
    tokio::spawn(async move {
        let first = sweep.rng.lock().unwrap().f64() * 300.0;
        tokio::time::sleep(sweep.secs(first)).await;
        loop {
            let id = sweep.instance_id.clone();
            let _ = sweep
                .call(|| {
                    sweep
                        .cloud
                        .unattached_enis_tagged("node.k8s.amazonaws.com/instance_id", &id)
                })
                .await;
            tokio::time::sleep(sweep.secs(3600.0)).await;
        }
    });
    me
}
