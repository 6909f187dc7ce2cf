//! The pool loop: asks the warm-pool policy (`pool::Policy`, a pure function) what to do
//! next and carries it out one step at a time: assign addresses to an ENI, release them,
//! or hand attaching and freeing ENIs to `enis`. Every decision is recorded with its outcome.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

use tracing::{debug, info, warn};

use super::Node;
use crate::clock::now_ns;
use crate::datastore::{Datastore, Eni};
use crate::pool::{Decision, Limits, Mode, Policy, PoolState};

/// A decision of the pool loop and why, for introspection and logs.
#[derive(Debug, Clone)]
pub struct DecisionRecord {
    pub at: SystemTime,
    pub state: PoolState,
    pub decision: Decision,
    pub outcome: String,
}

/// What the pool loop remembers between passes.
#[derive(Debug, Default)]
pub(super) struct LoopState {
    pub(super) last_shrink: Option<Instant>,
    pub(super) subnet_full_until: Option<Instant>,
    pub(super) prefix_fallback: bool,
    pub(super) decisions: Vec<DecisionRecord>,
    /// ENIs EC2 refuses more addresses for although ipamd counts room on them (a view
    /// that a reconcile did not change): not asked again before the time, doubling.
    pub(super) eni_backoff: BTreeMap<String, Backoff>,
    /// After a failed attach, no other before the time (doubling).
    pub(super) attach_backoff: Option<Backoff>,
    /// The attach back-off came from a throttled attach no pod was waiting for.
    pub(super) attach_backoff_warm_only: bool,
    /// ENIs attached whose link has not appeared on the host yet: they count as ENIs
    /// (no second attach at their device, none while they wait) but give no addresses.
    pub(super) waiting_for_link: BTreeMap<String, LinkWait>,
    /// Custom networking: ENIConfig subnets EC2 described (in this AZ), by id; the
    /// subnet of the ENIConfig that cannot be used, and why.
    pub(super) custom_subnets: BTreeMap<String, crate::cloud::SubnetInfo>,
    pub(super) subnet_problem: Option<(String, String)>,
    /// Subnet discovery's last answer, and when.
    pub(super) subnets: Option<(Instant, Vec<crate::cloud::SubnetInfo>)>,
    /// Since when the policy has wanted an ENI attached while the pool could still serve
    /// pods (see `warm_grace`).
    pub(super) attach_wanted_since: Option<Instant>,
    /// An ENI created whose attach failed for a transient reason (throttling): attached
    /// by the next attempt instead of a new one. (With its subnet's CIDR.)
    pub(super) created_unattached: Option<(crate::cloud::EniInfo, crate::net::Ipv4Net)>,
    /// Since when the pool has had more than its targets (see `shrink_grace`).
    pub(super) surplus_since: Option<Instant>,
}

/// Not before `until`; the next wait is `next`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub until: Instant,
    pub next: Duration,
}

impl Backoff {
    /// After one more failure: from `first`, doubling up to `max`.
    pub(super) fn after(prev: Option<Backoff>, first: Duration, max: Duration) -> Backoff {
        let wait = prev.map(|b| b.next).unwrap_or(first);
        Backoff {
            until: Instant::now() + wait,
            next: (wait * 2).min(max),
        }
    }

    pub fn active(&self) -> bool {
        Instant::now() < self.until
    }
}

/// An attached ENI whose link is awaited on the host.
#[derive(Debug, Clone)]
pub struct LinkWait {
    pub eni: Eni,
    pub since: Instant,
}

/// First and longest waits before asking EC2 again for addresses on an ENI it refused.
const ENI_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));
/// First and longest waits before another attach after a failed one.
const ATTACH_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(120));
/// The same after EC2 throttled an attach that only the warm target wanted (no pod waiting).
const WARM_ATTACH_BACKOFF: (Duration, Duration) =
    (Duration::from_secs(30), Duration::from_secs(300));
/// No attach for the warm target alone (no pod waiting) this long after EC2 throttled any
/// of the node's ENI calls: the account's ENI bucket is short, and the nodes whose pods
/// wait need its tokens (a fleet scaling out spent a quarter of them on warm ENIs).
const WARM_HOLD_AFTER_THROTTLE: Duration = Duration::from_secs(60);

impl Node {
    pub fn decisions(&self) -> Vec<DecisionRecord> {
        self.pool.lock().unwrap().decisions.clone()
    }

    pub fn policy(&self, limits: Limits) -> Policy {
        let c = &self.cfg;
        let mode = if c.enable_prefix_delegation {
            Mode::Prefix {
                warm_prefix: c.warm_prefix_target,
                warm_ip: c.warm_ip_target.unwrap_or(0),
                min_ip: c.minimum_ip_target.unwrap_or(0),
            }
        } else if c.ip_target_mode() {
            Mode::IpTarget {
                warm_ip: c.warm_ip_target.unwrap_or(0),
                min_ip: c.minimum_ip_target.unwrap_or(0),
            }
        } else {
            Mode::Eni {
                warm_eni: c.warm_eni_target,
            }
        };
        Policy {
            mode,
            limits,
            max_enis: c.max_eni.unwrap_or(limits.max_enis).min(limits.max_enis),
            primary_serves: !c.custom_network_cfg,
            max_pods_cap: match self.kubelet_max_pods.load(Ordering::Relaxed) {
                0 => None,
                n => Some(n),
            },
        }
    }

    pub fn pool_state(&self, limits: Limits) -> PoolState {
        let mut s = self.store.lock().unwrap();
        self.pool_state_of(&mut s, limits)
    }

    /// The policy's view of the datastore: an ENI EC2 refuses addresses for (backed off)
    /// offers no free slot, and an ENI waiting for its link counts as an ENI with none.
    /// (Lock order: the datastore, then the loop's state.)
    fn pool_state_of(&self, s: &mut Datastore, limits: Limits) -> PoolState {
        let (total, assigned, cooldown, _) = s.counts(now_ns());
        let (refused, waiting): (Vec<String>, u32) = {
            let rt = self.pool.lock().unwrap();
            (
                rt.eni_backoff
                    .iter()
                    .filter(|(_, b)| b.active())
                    .map(|(id, _)| id.clone())
                    .collect(),
                rt.waiting_for_link.len() as u32,
            )
        };
        let per = limits.slots_per_eni();
        let (mut enis, mut free_slots, mut prefixes) = (waiting, 0, 0);
        for e in s.enis() {
            enis += 1;
            if !refused.contains(&e.id) && s.serves(e) {
                free_slots += per.saturating_sub(e.slots_used());
            }
            prefixes += e.prefixes.len() as u32;
        }
        PoolState {
            enis,
            total,
            assigned,
            cooldown,
            free_slots,
            prefixes,
        }
    }

    /// Does the pool loop have something to do after this change? (Waking it on every
    /// call would put its work on the path of every AddNetwork.)
    pub(super) fn pool_has_work(&self, s: &mut Datastore) -> bool {
        match self.limits() {
            Some(l) => self.policy(l).decide(&self.pool_state_of(s, l)) != Decision::Steady,
            None => true,
        }
    }

    /// No address is free and the pool cannot grow (max pods, MAX_ENI, the instance's
    /// ENI and address limits): a full node. Not a failure: health stays SERVING.
    pub fn pool_exhausted(&self) -> bool {
        let Some(l) = self.limits() else {
            return false;
        };
        let mut s = self.store.lock().unwrap();
        s.counts(now_ns()).3 == 0
            && self.policy(l).decide(&self.pool_state_of(&mut s, l)) == Decision::AtCapacity
    }

    /// ENIs EC2 refuses addresses for, and until when (for introspection).
    pub fn eni_backoffs(&self) -> Vec<(String, Backoff)> {
        let rt = self.pool.lock().unwrap();
        rt.eni_backoff
            .iter()
            .filter(|(_, b)| b.active())
            .map(|(id, b)| (id.clone(), *b))
            .collect()
    }

    /// ENIs attached and waiting for their link on the host: (ENI, device, since).
    pub fn waiting_for_link(&self) -> Vec<(String, u32, Instant)> {
        let rt = self.pool.lock().unwrap();
        rt.waiting_for_link
            .values()
            .map(|w| (w.eni.id.clone(), w.eni.device_number, w.since))
            .collect()
    }

    /// The pool loop: starts once the instance is known (`learn_instance`), runs until
    /// the task is dropped.
    pub async fn run_pool(self: Arc<Self>) {
        let inst = loop {
            if let Some(i) = self.identity() {
                break i;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.converge_host().await;
        loop {
            if self.limits().is_none() {
                // A known type's limits come from the built-in table: no EC2 call.
                let known = crate::pool::known_limits(&inst.meta.instance_type);
                let got = match known {
                    Some(l) => Ok(l),
                    None => {
                        self.ec2
                            .instance_type_limits(&inst.meta.instance_type)
                            .await
                    }
                };
                match got {
                    Ok(l) => {
                        info!(
                            ?l,
                            max_pods = self.policy(l).max_pods(),
                            "limits of {} ({})",
                            inst.meta.instance_type,
                            if known.is_some() {
                                "built-in table"
                            } else {
                                "DescribeInstanceTypes"
                            }
                        );
                        *self.limits.write().unwrap() = Some(l);
                        self.reconcile_at_start().await;
                        let per_slot = if self.cfg.enable_prefix_delegation {
                            16
                        } else {
                            1
                        };
                        self.bound_restored(l.max_enis * l.slots_per_eni() * per_slot)
                            .await;
                    }
                    Err(e) => {
                        warn!("DescribeInstanceTypes failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let progressed = self.step().await;
            if !progressed {
                self.housekeeping().await;
                // A deferred attach is looked at again when its grace ends.
                let grace_left = self
                    .pool
                    .lock()
                    .unwrap()
                    .attach_wanted_since
                    .map(|t| self.timing.warm_grace.saturating_sub(t.elapsed()))
                    .filter(|g| !g.is_zero());
                // (Once it has ended, the pool interval as ever: an attach backed off
                // after a failure is not retried in a tight loop.)
                let wait = grace_left.map_or(self.timing.pool_interval, |g| {
                    (g + Duration::from_millis(5)).min(self.timing.pool_interval)
                });
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.wake_pool.notified() => {}
                }
            }
        }
    }

    pub(super) fn record_decision(
        &self,
        state: PoolState,
        decision: &Decision,
        outcome: impl Into<String>,
    ) {
        let outcome = outcome.into();
        debug!(?state, ?decision, %outcome, "pool");
        let mut rt = self.pool.lock().unwrap();
        // The same decision held back for the same reason, pass after pass: one record.
        if let Some(last) = rt.decisions.last_mut()
            && last.decision == *decision
            && last.outcome == outcome
            && last.state == state
        {
            last.at = crate::clock::wall_now();
            return;
        }
        rt.decisions.push(DecisionRecord {
            at: crate::clock::wall_now(),
            state,
            decision: decision.clone(),
            outcome,
        });
        let n = rt.decisions.len();
        if n > 50 {
            rt.decisions.drain(..n - 50);
        }
    }

    /// One decision and its action. Returns whether anything changed.
    pub async fn step(self: &Arc<Self>) -> bool {
        let Some(limits) = self.limits() else {
            return false;
        };
        if self.cfg.disable_network_resource_provisioning {
            return false;
        }
        self.retry_waiting_links().await;
        let policy = self.policy(limits);
        let state = self.pool_state(limits);
        let mut decision = policy.decide(&state);
        let prefix_mode = matches!(policy.mode, Mode::Prefix { .. });
        let hold = self.eni_hold();
        if hold.is_none()
            && self.cfg.custom_network_cfg
            && (self.free_drained_eni(state).await || self.release_idle_primary_ips(state).await)
        {
            return true;
        }
        if let Some(why) = hold {
            match decision {
                Decision::AttachEni | Decision::FreeEni => {
                    self.record_decision(state, &decision, format!("held: {why}"));
                    return false;
                }
                // Only what pods are waiting for: a DaemonSet pod tolerating the cordon
                // is not stranded while the ENIs attached have room.
                Decision::Assign { count } => {
                    // Less the free addresses the waiting pods have not taken yet.
                    let free = state.available().saturating_sub(state.cooldown);
                    let short = self.waiting.load(Ordering::SeqCst).saturating_sub(free);
                    let want = if prefix_mode {
                        short.div_ceil(16)
                    } else {
                        short
                    };
                    if want == 0 {
                        self.record_decision(state, &decision, format!("held: {why}"));
                        return false;
                    }
                    decision = Decision::Assign {
                        count: count.min(want),
                    };
                }
                _ => {}
            }
        }
        // Pods waiting now need addresses beyond the targets (the policy counts only what
        // the datastore holds): asked for in the same call, not one pass after another.
        // Not on top of a MINIMUM_IP_TARGET that already counts them.
        let waiting = self.waiting.load(Ordering::SeqCst);
        if hold.is_none()
            && waiting > 0
            && let Decision::Assign { count } = decision
        {
            let need = policy.shortfall_with_waiting(&state, waiting);
            let need = if prefix_mode {
                need.div_ceil(16)
            } else {
                need.min(policy.max_pods().saturating_sub(state.total))
            };
            decision = Decision::Assign {
                count: count.max(need),
            };
        }
        // Hysteresis: an ENI only for the warm target (no pod waiting, more than half of
        // the target still free) is attached once that shortfall has lasted `warm_grace`,
        // as upstream's 5 s loop would first notice it: a pod that lives a few seconds no
        // longer costs an attach now and a free a minute later (5 EC2 calls). A pool that
        // is really draining (half the target gone, or a pod waiting) attaches at once.
        if decision == Decision::AttachEni && !self.timing.warm_grace.is_zero() {
            let free = state.available().saturating_sub(state.cooldown);
            let short = policy.shortfall(&state);
            let waiting = self.waiting.load(Ordering::SeqCst);
            let since = *self
                .pool
                .lock()
                .unwrap()
                .attach_wanted_since
                .get_or_insert_with(Instant::now);
            if waiting == 0 && free > short && since.elapsed() < self.timing.warm_grace {
                self.record_decision(
                    state,
                    &decision,
                    format!(
                        "deferred: {free} free, {short} short of the warm target for {:?} of {:?}",
                        since.elapsed(),
                        self.timing.warm_grace
                    ),
                );
                return false;
            }
        } else if decision != Decision::AttachEni {
            self.pool.lock().unwrap().attach_wanted_since = None;
        }
        // A surplus is counted from when it is first seen; wanting more (or nothing)
        // ends it.
        if !matches!(
            decision,
            Decision::Release { .. } | Decision::FreeEni | Decision::Steady
        ) {
            self.pool.lock().unwrap().surplus_since = None;
        }
        match decision {
            Decision::Steady if hold.is_some() => false,
            Decision::Steady if !matches!(policy.mode, Mode::Eni { .. }) => {
                // IP-target and prefix modes release addresses one by one; an ENI left
                // holding none is not needed for the targets and goes too.
                let empty = {
                    let s = self.store.lock().unwrap();
                    s.enis()
                        .filter(|e| !e.is_primary && e.slots_used() == 0)
                        .any(|e| e.first_seen.elapsed() >= self.timing.eni_min_age)
                };
                if !empty {
                    self.pool.lock().unwrap().surplus_since = None;
                    false
                } else if self.shrink_allowed() {
                    self.free_eni(state, &Decision::FreeEni).await
                } else {
                    false
                }
            }
            Decision::Steady | Decision::AtCapacity => {
                self.pool.lock().unwrap().surplus_since = None;
                false
            }
            Decision::Assign { count } => {
                if let Some(until) = self.pool.lock().unwrap().subnet_full_until
                    && Instant::now() < until
                {
                    return false;
                }
                let fallback = self.pool.lock().unwrap().prefix_fallback;
                let per = limits.slots_per_eni();
                let refused: Vec<String> =
                    self.eni_backoffs().into_iter().map(|(id, _)| id).collect();
                // Fill an existing ENI (lowest device number first) before attaching one;
                // not one EC2 keeps refusing: the others are not hidden behind it.
                let target = {
                    let s = self.store.lock().unwrap();
                    let mut enis: Vec<&Eni> = s
                        .enis()
                        .filter(|e| e.slots_used() < per && !refused.contains(&e.id) && s.serves(e))
                        .collect();
                    enis.sort_by_key(|e| e.device_number);
                    enis.first()
                        .map(|e| (e.id.clone(), per - e.slots_used(), e.slots_used()))
                };
                let Some((eni, room, slots_before)) = target else {
                    return false;
                };
                let result = if prefix_mode && !fallback {
                    self.ec2
                        .assign_prefixes(&eni, count.min(room))
                        .await
                        .map(|p| (vec![], p))
                } else {
                    let n = if prefix_mode {
                        (count * 16).min(room)
                    } else {
                        count.min(room)
                    };
                    self.ec2.assign_ips(&eni, n).await.map(|ips| (ips, vec![]))
                };
                match result {
                    Ok((ips, prefixes)) => {
                        {
                            let mut s = self.store.lock().unwrap();
                            let mut refused = s.add_ips(&eni, &ips).unwrap_or_else(|e| vec![e]);
                            for p in &prefixes {
                                if let Err(e) = s.add_prefix(&eni, *p) {
                                    refused.push(e);
                                }
                            }
                            drop(s);
                            self.note_refused(&eni, &refused, true);
                        }
                        self.pool.lock().unwrap().eni_backoff.remove(&eni);
                        self.addresses_added.notify_waiters();
                        self.record_decision(
                            state,
                            &decision,
                            format!("{eni}: +{} IPs, +{} prefixes", ips.len(), prefixes.len()),
                        );
                        true
                    }
                    Err(e) if e.code == "InsufficientCidrBlocks" && prefix_mode => {
                        warn!("no free /28 in the subnet: falling back to single IPs ({e})");
                        self.pool.lock().unwrap().prefix_fallback = true;
                        self.record_decision(state, &decision, format!("fallback to /32: {e}"));
                        true
                    }
                    Err(e) if e.is_subnet_full() => {
                        self.metrics.error("increaseIPPoolSubnetFull");
                        warn!(
                            "subnet is out of addresses, backing off {:?}: {e}",
                            self.timing.subnet_full_backoff
                        );
                        self.pool.lock().unwrap().subnet_full_until =
                            Some(Instant::now() + self.timing.subnet_full_backoff);
                        self.record_decision(state, &decision, e.to_string());
                        false
                    }
                    Err(e) if e.code == "PrivateIpAddressLimitExceeded" => {
                        // Our view of the ENI may be stale: learn the truth from EC2. If that
                        // changes nothing, EC2 and ipamd disagree about this ENI: back off it
                        // (doubling) instead of asking again at once, pass after pass.
                        warn!("{e}; reconciling");
                        self.reconcile_with_ec2().await;
                        let slots_now =
                            self.store.lock().unwrap().eni(&eni).map(|e| e.slots_used());
                        if slots_now.is_some_and(|n| n > slots_before) {
                            return true;
                        }
                        let b = {
                            let mut rt = self.pool.lock().unwrap();
                            let prev = rt.eni_backoff.get(&eni).copied();
                            let b = Backoff::after(prev, ENI_BACKOFF.0, ENI_BACKOFF.1);
                            rt.eni_backoff.insert(eni.clone(), b);
                            b
                        };
                        self.metrics.error("increaseIPPoolAddressLimitExceeded");
                        let wait = b.until.saturating_duration_since(Instant::now());
                        warn!(
                            "EC2 refuses more addresses on {eni} although ipamd counts {room} free slots there, and a reconcile did not explain it: not asking again for {wait:?}"
                        );
                        self.record_decision(
                            state,
                            &decision,
                            format!("{eni} refused by EC2 ({}): backing off {wait:?}", e.code),
                        );
                        // Other ENIs (or a new one) may still serve: decide again.
                        true
                    }
                    Err(e) => {
                        self.metrics.error("increaseIPPoolAllocIPAddressesFailed");
                        warn!("assigning addresses to {eni} failed: {e}");
                        self.record_decision(state, &decision, e.to_string());
                        false
                    }
                }
            }
            Decision::AttachEni => {
                if let Some(until) = self.pool.lock().unwrap().subnet_full_until
                    && Instant::now() < until
                {
                    return false;
                }
                let problem = self.eni_config_problem();
                let held = {
                    let rt = self.pool.lock().unwrap();
                    if let Some(why) = problem {
                        Some(format!("held: {why}"))
                    } else if let Some(w) = rt.waiting_for_link.values().next() {
                        Some(format!(
                            "held: {} (device {}) is attached and waiting for its link",
                            w.eni.id, w.eni.device_number
                        ))
                    } else {
                        // A back-off that only the warm target ran into does not hold
                        // back a pod waiting now.
                        let waiting = self.waiting.load(Ordering::SeqCst) > 0;
                        let throttled = self
                            .ec2
                            .eni_calls_throttled_ago()
                            .filter(|ago| !waiting && *ago < WARM_HOLD_AFTER_THROTTLE);
                        if let Some(ago) = throttled {
                            Some(format!(
                                "held: EC2 throttled the node's ENI calls {}s ago and no pod waits",
                                ago.as_secs()
                            ))
                        } else {
                            rt.attach_backoff
                                .filter(Backoff::active)
                                .filter(|_| !(waiting && rt.attach_backoff_warm_only))
                                .map(|b| {
                                    format!(
                                        "held: backing off {:?} after a failed attach",
                                        b.until.saturating_duration_since(Instant::now())
                                    )
                                })
                        }
                    }
                };
                if let Some(why) = held {
                    self.record_decision(state, &decision, why);
                    return false;
                }
                if self.attaching.swap(true, Ordering::SeqCst) {
                    return false;
                }
                let me = self.clone();
                let short = policy.shortfall(&state) + self.waiting.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let r = me.attach_new_eni(limits, short).await;
                    me.attaching.store(false, Ordering::SeqCst);
                    match r {
                        Ok(outcome) => {
                            {
                                let mut rt = me.pool.lock().unwrap();
                                rt.attach_backoff = None;
                                rt.attach_backoff_warm_only = false;
                            }
                            me.record_decision(state, &Decision::AttachEni, outcome);
                            me.addresses_added.notify_waiters();
                            me.wake_pool.notify_one();
                        }
                        Err(e) => {
                            let wait = {
                                let mut rt = me.pool.lock().unwrap();
                                if e.is_subnet_full() {
                                    rt.subnet_full_until =
                                        Some(Instant::now() + me.timing.subnet_full_backoff);
                                }
                                // Throttled while no pod waited: the account's ENI calls
                                // are short, and nodes with pods waiting need them more.
                                let warm_only =
                                    e.is_throttle() && me.waiting.load(Ordering::SeqCst) == 0;
                                let (first, max) = if warm_only {
                                    WARM_ATTACH_BACKOFF
                                } else {
                                    ATTACH_BACKOFF
                                };
                                let b = Backoff::after(
                                    rt.attach_backoff
                                        .filter(|_| rt.attach_backoff_warm_only == warm_only),
                                    first,
                                    max,
                                );
                                rt.attach_backoff = Some(b);
                                rt.attach_backoff_warm_only = warm_only;
                                b.until.saturating_duration_since(Instant::now())
                            };
                            me.metrics.error("increaseIPPoolAllocENI");
                            warn!(
                                "attaching an ENI failed, next attempt in {wait:?} at the earliest: {e}"
                            );
                            me.record_decision(state, &Decision::AttachEni, e.to_string());
                        }
                    }
                });
                false
            }
            Decision::Release { count } => {
                if !self.shrink_allowed() {
                    return false;
                }
                self.release(count, prefix_mode, state, &decision).await
            }
            Decision::FreeEni => {
                if !self.shrink_allowed() {
                    return false;
                }
                self.free_eni(state, &decision).await
            }
        }
    }

    /// Whether the pool may give something back now: its surplus has lasted
    /// `shrink_grace` (a pool that churns keeps what it will need again; no grace while
    /// addresses are scarce: EC2 said a subnet is full, or subnet discovery saw one with
    /// fewer than 64 free), and the last shrink is `shrink_interval` ago.
    pub(super) fn shrink_allowed(&self) -> bool {
        let mut rt = self.pool.lock().unwrap();
        let now = Instant::now();
        let since = *rt.surplus_since.get_or_insert(now);
        let scarce = rt.subnet_full_until.is_some_and(|t| now < t)
            || rt
                .subnets
                .as_ref()
                .is_some_and(|(_, s)| s.iter().any(|s| s.available_addresses < 64));
        if !scarce && now.saturating_duration_since(since) < self.timing.shrink_grace {
            return false;
        }
        let ok = rt
            .last_shrink
            .is_none_or(|t| t.elapsed() >= self.timing.shrink_interval);
        if ok {
            rt.last_shrink = Some(Instant::now());
        }
        ok
    }

    async fn release(
        &self,
        count: u32,
        prefix_mode: bool,
        state: PoolState,
        decision: &Decision,
    ) -> bool {
        if prefix_mode {
            let picked = {
                let mut s = self.store.lock().unwrap();
                let p = s.releasable_prefixes(count);
                p.into_iter()
                    .filter(|(e, n)| s.remove_prefix(e, *n).is_ok())
                    .collect::<Vec<_>>()
            };
            for (eni, p) in &picked {
                if let Err(e) = self.ec2.unassign_prefixes(eni, &[*p]).await {
                    self.metrics.error("decreaseIPPoolUnassignPrefixesFailed");
                    warn!("unassigning {p} from {eni} failed, keeping it: {e}");
                    let _ = self.store.lock().unwrap().add_prefix(eni, *p);
                }
            }
            self.record_decision(
                state,
                decision,
                format!("released {} prefixes", picked.len()),
            );
            return !picked.is_empty();
        }
        let picked = {
            let mut s = self.store.lock().unwrap();
            let ips = s.releasable_ips(count);
            ips.into_iter()
                .filter(|(e, ip)| s.remove_ips(e, &[*ip]).is_ok())
                .collect::<Vec<_>>()
        };
        // One call per ENI for all its addresses.
        let mut by_eni: std::collections::BTreeMap<String, Vec<Ipv4Addr>> = Default::default();
        for (e, ip) in &picked {
            by_eni.entry(e.clone()).or_default().push(*ip);
        }
        for (eni, ips) in &by_eni {
            if let Err(e) = self.ec2.unassign_ips(eni, ips).await {
                self.metrics
                    .error("decreaseIPPoolUnassignIPAddressesFailed");
                warn!("unassigning {ips:?} from {eni} failed, keeping them: {e}");
                let _ = self.store.lock().unwrap().add_ips(eni, ips);
            }
        }
        self.record_decision(state, decision, format!("released {} IPs", picked.len()));
        !picked.is_empty()
    }
}
