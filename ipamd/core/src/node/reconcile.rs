//! How ipamd, EC2 and the host come to agree: the periodic reconcile (ENIs and
//! addresses EC2 has that ipamd lacks, and forced removal of what EC2 no longer has),
//! reclaiming assignments whose pod left no interface, and the leaked-ENI sweep.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

use tracing::{debug, error, info, warn};

use super::{Node, RECOVERED_PREFIX, TAG_CREATED_AT, TAG_INSTANCE_ID, now_ns, store_eni};
use crate::budget;
use crate::clock::parse_rfc3339;
use crate::cloud::EniInfo;
use crate::net::Ipv4Net;

/// What reconcile remembers between passes.
#[derive(Debug, Default)]
pub(super) struct ReconcileState {
    pub(super) last_reconcile: Option<Instant>,
    /// The last pass that asked EC2 (DescribeNetworkInterfaces).
    pub(super) last_ec2_reconcile: Option<Instant>,
    /// When the leaked-ENI sweep is due next. An ENI tagged with this instance is left
    /// unattached only by an ipamd that ran here before (a checkpoint on disk, ENIs or
    /// addresses IMDS shows at start) or by this one (a create whose answer was lost, a
    /// delete that failed): then the minimum age after that; else, on a fresh node, the
    /// sweep interval from the first pass (`note_possible_leak`).
    pub(super) next_sweep: Option<Instant>,
    /// What the datastore held that EC2's last describe did not show: removed only when
    /// two describes in a row agree (describes can lag behind a change).
    missing: BTreeSet<Lost>,
    /// Free addresses a pod route on the host pointed at in the last pass: taken for that
    /// pod when the next pass sees the route still there.
    routed_free: BTreeSet<Ipv4Addr>,
    /// Tags asked for an ENI in this process (`Node::tag_managed_enis`).
    pub(super) tags_asked: BTreeSet<(String, Vec<(String, String)>)>,
}

/// Something the datastore holds that EC2 stopped showing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Lost {
    Eni(String),
    Ip(String, Ipv4Addr),
    Prefix(String, Ipv4Net),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Eni(id) => write!(f, "{id} is no longer attached"),
            Lost::Ip(id, ip) => write!(f, "{ip} is no longer on {id}"),
            Lost::Prefix(id, p) => write!(f, "{p} is no longer on {id}"),
        }
    }
}

/// IMDS shows exactly the ENIs, secondary addresses and prefixes the datastore holds.
fn agrees(held: &[(String, bool, Vec<Ipv4Addr>, Vec<Ipv4Net>)], imds: &[EniInfo]) -> bool {
    type View<'a> = BTreeMap<&'a str, (BTreeSet<Ipv4Addr>, BTreeSet<Ipv4Net>)>;
    let ours: View = held
        .iter()
        .map(|(id, _, ips, p)| {
            (
                id.as_str(),
                (ips.iter().copied().collect(), p.iter().copied().collect()),
            )
        })
        .collect();
    let theirs: View = imds
        .iter()
        .map(|e| {
            (
                e.id.as_str(),
                (
                    e.secondary_ips.iter().copied().collect(),
                    e.prefixes.iter().copied().collect(),
                ),
            )
        })
        .collect();
    ours == theirs
}

impl Node {
    /// Learns from EC2 what IMDS had not shown yet (or lost): ENIs and addresses. EC2 is
    /// asked only when IMDS (free, unmetered) disagrees with the datastore, cannot answer,
    /// or a removal awaits its confirming describe, and at least every
    /// `ec2_reconcile_interval` (IMDS can lag behind EC2): on a quiet node, one describe per
    /// 5 minutes where upstream spends one per 2.
    pub async fn reconcile(&self) {
        self.reconcile_pass(false).await
    }

    /// A reconcile pass that asks EC2 whatever IMDS says: where EC2's answer is the
    /// point (EC2 refused an address our view says fits; start-up).
    pub async fn reconcile_with_ec2(&self) {
        self.reconcile_pass(true).await
    }

    /// The first reconcile, once the limits are known. A fresh node (IMDS and the
    /// datastore hold the primary ENI alone, without secondary addresses or prefixes, and
    /// no pod) has nothing EC2 could add: IMDS alone, EC2 due an interval later. Any other
    /// node asks EC2 (attachments, tags, addresses IMDS has not shown yet).
    pub async fn reconcile_at_start(&self) {
        let fresh = {
            let s = self.store.lock().unwrap();
            let enis: Vec<_> = s.enis().collect();
            enis.len() == 1
                && enis[0].is_primary
                && enis[0].ips.is_empty()
                && enis[0].prefixes.is_empty()
                && s.assignments().is_empty()
        };
        let imds_fresh = fresh
            && self.imds.enis().await.is_ok_and(|e| {
                e.len() == 1 && e[0].secondary_ips.is_empty() && e[0].prefixes.is_empty()
            });
        if !imds_fresh {
            // An earlier ipamd attached ENIs or addresses here: it may have left an ENI.
            self.note_possible_leak();
        }
        if imds_fresh {
            debug!("reconcile at start: a fresh node, EC2 not asked");
            self.reconciler.lock().unwrap().last_ec2_reconcile = Some(Instant::now());
            self.reconcile_pass(false).await
        } else {
            self.reconcile_pass(true).await
        }
    }

    async fn reconcile_pass(&self, force_ec2: bool) {
        let t0 = Instant::now();
        // What we held before asking EC2: only that can have been removed behind our back
        // (addresses we add while the describe runs are not in it).
        let before: Vec<(String, bool, Vec<Ipv4Addr>, Vec<Ipv4Net>)> = {
            let s = self.store.lock().unwrap();
            s.enis()
                .map(|e| {
                    (
                        e.id.clone(),
                        e.is_primary,
                        e.ips.iter().copied().collect(),
                        e.prefixes.iter().copied().collect(),
                    )
                })
                .collect()
        };
        let Some(inst) = self.identity() else {
            return;
        };
        // IMDS knows what EC2's describe lacks: subnet CIDRs, and the VPC's CIDRs.
        let imds = self.imds.enis().await;
        let t_imds = t0.elapsed();
        let imds_failed = imds.is_err();
        let imds_enis = imds.unwrap_or_default();
        self.follow_primary_security_groups(&imds_enis).await;
        if let Some(p) = imds_enis.iter().find(|e| e.mac == inst.meta.primary_mac)
            && !p.vpc_cidrs.is_empty()
            && self.vpc_cidrs() != p.vpc_cidrs
        {
            info!(
                "VPC CIDRs are now {:?}: refreshing the SNAT rules",
                p.vpc_cidrs
            );
            *self.vpc_cidrs.write().unwrap() = p.vpc_cidrs.clone();
        }
        let why_ec2 = {
            let rt = self.reconciler.lock().unwrap();
            if force_ec2 {
                Some("asked to")
            } else if imds_failed {
                Some("IMDS did not answer")
            } else if rt
                .last_ec2_reconcile
                .is_none_or(|t| t.elapsed() >= self.timing.ec2_reconcile_interval)
            {
                Some("due")
            } else if !rt.missing.is_empty() {
                Some("a removal to confirm")
            } else if !agrees(&before, &imds_enis) {
                Some("IMDS differs from the datastore")
            } else {
                None
            }
        };
        let Some(why_ec2) = why_ec2 else {
            self.reconciler.lock().unwrap().last_reconcile = Some(Instant::now());
            self.metrics.reconciled("nodeIPPoolReconcile");
            self.host_side_pass().await;
            debug!(
                "reconcile: IMDS agrees with the datastore ({t_imds:?}), EC2 not asked; host {:?}",
                t0.elapsed() - t_imds
            );
            return;
        };
        debug!("reconcile: asking EC2 ({why_ec2})");
        let describe = self.ec2.instance_enis(&inst.meta.instance_id);
        // Only due: one attempt (the next pass asks again); else the budget's retries.
        let described = if why_ec2 == "due" {
            budget::at_most(1, describe).await
        } else {
            describe.await
        };
        let enis = match described {
            Ok(e) => e,
            Err(e) => {
                self.metrics.error("nodeIPPoolReconcileDescribeFailed");
                warn!("reconcile: {e}");
                // Tried again a reconcile interval later, not at the next pool pass (a
                // throttled describe was asked again every pass).
                self.reconciler.lock().unwrap().last_reconcile = Some(Instant::now());
                return;
            }
        };
        self.reconciler.lock().unwrap().last_ec2_reconcile = Some(Instant::now());
        let t_describe = t0.elapsed();
        let unknown: Vec<EniInfo> = {
            let s = self.store.lock().unwrap();
            enis.iter()
                .filter(|e| s.eni(&e.id).is_none())
                .cloned()
                .collect()
        };
        // An ENI enters the datastore only once the host can route its addresses.
        let mut ready = Vec::new();
        for mut e in unknown {
            if let Some(i) = imds_enis.iter().find(|i| i.mac == e.mac) {
                e.subnet_cidr = i.subnet_cidr;
            } else if e.subnet_id == inst.primary_subnet {
                e.subnet_cidr = inst.primary_subnet_cidr;
            }
            let eni = store_eni(&e, e.device_number == 0);
            if !eni.is_primary {
                if e.subnet_cidr.len == 0 {
                    debug!("reconcile: subnet of {} not known yet", e.id);
                    continue;
                }
                if let Err(err) = self
                    .host
                    .setup_eni(&self.eni_net(&eni), Duration::ZERO)
                    .await
                {
                    debug!("reconcile: {} not ready on the host yet: {err}", e.id);
                    continue;
                }
            }
            ready.push(eni);
        }
        let mut refused = Vec::new();
        {
            let mut s = self.store.lock().unwrap();
            for eni in ready {
                let id = eni.id.clone();
                refused.push((id, s.add_eni(eni)));
            }
            for e in &enis {
                if s.eni(&e.id).is_some() {
                    s.set_attachment(&e.id, e.attachment_id.clone());
                    let mut r = s.add_ips(&e.id, &e.secondary_ips).unwrap_or_default();
                    for p in &e.prefixes {
                        if let Err(err) = s.add_prefix(&e.id, *p) {
                            r.push(err);
                        }
                    }
                    refused.push((e.id.clone(), r));
                }
            }
        }
        // Every describe repeats what EC2 lists: said once at start-up or when new, then quiet.
        for (id, r) in refused {
            self.note_refused(&id, &r, false);
        }
        self.force_remove(&before, &enis).await;
        self.tag_managed_enis(&inst.meta.instance_id, &enis).await;
        self.reconciler.lock().unwrap().last_reconcile = Some(Instant::now());
        self.metrics.reconciled("nodeIPPoolReconcile");
        self.addresses_added.notify_waiters();
        let t_store = t0.elapsed();
        self.host_side_pass().await;
        debug!(
            "reconcile: IMDS {t_imds:?}, describe {:?}, store {:?}, host {:?}",
            t_describe - t_imds,
            t_store - t_describe,
            t0.elapsed() - t_store
        );
    }

    /// What every reconcile pass does on the host, EC2 asked or not.
    async fn host_side_pass(&self) {
        self.converge_host().await;
        self.reclaim_stale().await;
        self.adopt_routed_free().await;
    }

    /// Drops what EC2 no longer has (an address unassigned or an ENI detached by someone
    /// else): what the datastore held before the describe and two describes in a row did
    /// not show. Never an address a pod holds: that is logged, and kept.
    async fn force_remove(
        &self,
        before: &[(String, bool, Vec<Ipv4Addr>, Vec<Ipv4Net>)],
        enis: &[EniInfo],
    ) {
        let mut absent = BTreeSet::new();
        for (id, primary, ips, prefixes) in before {
            match enis.iter().find(|e| &e.id == id) {
                Some(e) => {
                    absent.extend(
                        ips.iter()
                            .filter(|ip| !e.secondary_ips.contains(ip))
                            .map(|ip| Lost::Ip(id.clone(), *ip)),
                    );
                    absent.extend(
                        prefixes
                            .iter()
                            .filter(|p| !e.prefixes.contains(p))
                            .map(|p| Lost::Prefix(id.clone(), *p)),
                    );
                }
                None if !primary => {
                    absent.insert(Lost::Eni(id.clone()));
                }
                None => {}
            }
        }
        let confirmed: Vec<Lost> = {
            let mut rt = self.reconciler.lock().unwrap();
            let c = absent.intersection(&rt.missing).cloned().collect();
            rt.missing = absent;
            c
        };
        let mut gone = Vec::new();
        {
            let mut s = self.store.lock().unwrap();
            for lost in &confirmed {
                // Still as we saw it? (Our own pool loop may have changed it since.)
                let result = match lost {
                    Lost::Eni(id) if s.eni(id).is_some() => s.remove_eni(id).map(|e| {
                        gone.push(e);
                        0
                    }),
                    Lost::Ip(id, ip) if s.eni(id).is_some_and(|e| e.ips.contains(ip)) => {
                        s.remove_ips(id, &[*ip]).map(|()| 1)
                    }
                    Lost::Prefix(id, p) if s.eni(id).is_some_and(|e| e.prefixes.contains(p)) => s
                        .remove_prefix(id, *p)
                        .map(|()| p.addresses().count() as u64),
                    _ => continue,
                };
                match (lost, result) {
                    (Lost::Eni(id), Ok(_)) => {
                        self.metrics
                            .force_removed_enis
                            .fetch_add(1, Ordering::Relaxed);
                        warn!("{id} is no longer attached in EC2: forgotten");
                    }
                    (_, Ok(n)) => {
                        self.metrics
                            .force_removed_ips
                            .fetch_add(n, Ordering::Relaxed);
                        warn!("{lost} in EC2: forgotten");
                    }
                    (_, Err(e)) => warn!("{lost} in EC2, but kept: {e}"),
                }
            }
        }
        for eni in gone {
            if let Err(e) = self.host.teardown_eni(&self.eni_net(&eni)).await {
                warn!("undoing the host side of {}: {e}", eni.id);
            }
        }
    }

    /// Releases assignments whose pod has no interface on the host (no /32 route to the
    /// address through one of our veths) and that are older than `reclaim_after`: the
    /// runtime deleted the pod while ipamd could not be reached (the plugin's DEL then
    /// succeeds from local state), or forgot a sandbox whose setup failed. Without this,
    /// such an address would stay assigned forever.
    pub async fn reclaim_stale(&self) -> usize {
        let grace = self.timing.reclaim_after;
        if grace.is_zero() {
            return 0;
        }
        let routes = match self.host.pod_routes().await {
            Ok(r) => r,
            Err(e) => {
                // Never guess: an unreadable host is not a host without pods.
                debug!("reclaim: cannot read the host's pod routes: {e}");
                return 0;
            }
        };
        let live: BTreeSet<Ipv4Addr> = routes.iter().map(|(ip, _)| *ip).collect();
        let now = now_ns();
        let grace_ns = grace.as_nanos() as u64;
        let pending = self.release_where(|a| {
            !live.contains(&a.ip) && now.saturating_sub(a.assigned_at_ns) >= grace_ns
        });
        let n = pending.len();
        for (p, a) in pending {
            match p.durable().await {
                Ok(()) => {
                    self.metrics.reclaimed_ips.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "released {} of {}/{} (container {}): its pod has no interface on this host (a DEL that never reached ipamd)",
                        a.ip, a.pod.namespace, a.pod.name, a.key.container_id
                    );
                }
                Err(e) => error!("checkpoint while releasing {}: {e}", a.ip),
            }
        }
        if n > 0 {
            self.wake_pool.notify_one();
        }
        n
    }

    /// A free address a pod route through one of our veths points at belongs to that pod
    /// (a DEL that released it but left the datapath, a client of ours that is not): it
    /// is taken for the pod, as at start-up, when two passes in a row see the route, so
    /// no new pod gets it. (One pass could be a DEL between its release and its teardown.)
    pub async fn adopt_routed_free(&self) -> usize {
        let Ok(routes) = self.host.pod_routes().await else {
            return 0;
        };
        let free: Vec<(Ipv4Addr, String)> = {
            let s = self.store.lock().unwrap();
            routes
                .into_iter()
                .filter(|(ip, _)| s.is_free(*ip))
                .collect()
        };
        let now: BTreeSet<Ipv4Addr> = free.iter().map(|(ip, _)| *ip).collect();
        let before = std::mem::replace(&mut self.reconciler.lock().unwrap().routed_free, now);
        let mut n = 0;
        for (ip, veth) in free.into_iter().filter(|(ip, _)| before.contains(ip)) {
            let pending = {
                let mut s = self.store.lock().unwrap();
                if !s.is_free(ip) {
                    continue;
                }
                // Keyed by the veth, as at start-up; a second address routed to the same
                // veth gets a key of its own (reclaimed once its route goes).
                let mut a = super::startup::recovered(ip, &veth);
                if s.restore(a.clone()).is_err() {
                    a.key.container_id = format!("{RECOVERED_PREFIX}{veth}/{ip}");
                    if s.restore(a.clone()).is_err() {
                        continue;
                    }
                }
                self.journal.record_add(&a)
            };
            if self.checkpointed(pending.durable().await).is_ok() {
                n += 1;
                warn!(
                    "{ip} was free but a pod route on this host points at it (via {veth}): kept for that pod"
                );
            }
        }
        n
    }

    pub(super) async fn housekeeping(&self) {
        let (reconcile, sweep) = {
            let mut rt = self.reconciler.lock().unwrap();
            let now = Instant::now();
            // Nothing said an ENI may have leaked (`note_possible_leak`): the first sweep
            // a sweep interval after start (the hourly one catches what no sign showed,
            // e.g. a crash before attach followed by a reboot that emptied /var/run).
            let next = *rt
                .next_sweep
                .get_or_insert_with(|| now + self.timing.leaked_sweep_interval);
            (
                rt.last_reconcile
                    .is_none_or(|t| t.elapsed() >= self.timing.reconcile_interval),
                !self.cfg.disable_leaked_eni_cleanup && now >= next,
            )
        };
        if reconcile {
            self.reconcile().await;
        }
        if sweep {
            self.reconciler.lock().unwrap().next_sweep =
                Some(Instant::now() + self.timing.leaked_sweep_interval);
            self.sweep_leaked_enis().await;
        }
    }

    /// An ENI of this instance may be left unattached (an earlier ipamd ran here, or a
    /// create's answer was lost, or a delete failed): the sweep runs once such an ENI is
    /// old enough to be swept, if not due sooner.
    pub(super) fn note_possible_leak(&self) {
        let at = Instant::now() + self.timing.leaked_min_age;
        let mut rt = self.reconciler.lock().unwrap();
        rt.next_sweep = Some(rt.next_sweep.map_or(at, |n| n.min(at)));
    }

    /// Deletes ENIs this instance created that are left unattached (a crash between
    /// create and attach, or detach and delete): older than the minimum age.
    pub async fn sweep_leaked_enis(&self) -> usize {
        let Some(inst) = self.identity() else {
            return 0;
        };
        // One attempt: a sweep EC2 throttles is tried again a reconcile interval later.
        let listed = budget::at_most(
            1,
            self.ec2
                .unattached_enis_tagged(TAG_INSTANCE_ID, &inst.meta.instance_id),
        )
        .await;
        let enis = match listed {
            Ok(e) => e,
            Err(e) => {
                self.metrics.error("leakedENISweepFailed");
                warn!("leaked-ENI sweep: {e}");
                self.reconciler.lock().unwrap().next_sweep =
                    Some(Instant::now() + self.timing.reconcile_interval);
                return 0;
            }
        };
        let mut n = 0;
        for e in enis {
            let created = e
                .tags
                .iter()
                .find(|(k, _)| k == TAG_CREATED_AT)
                .and_then(|(_, v)| parse_rfc3339(v));
            let old = created
                .is_none_or(|t| t.elapsed().unwrap_or_default() >= self.timing.leaked_min_age);
            if e.status == "available" && old {
                match self.ec2.delete_eni(&e.id).await {
                    Ok(()) => {
                        info!("deleted leaked ENI {}", e.id);
                        // One kept for an attach the pool never needed again.
                        let mut pool = self.pool.lock().unwrap();
                        if pool
                            .created_unattached
                            .as_ref()
                            .is_some_and(|(c, _)| c.id == e.id)
                        {
                            pool.created_unattached = None;
                        }
                        drop(pool);
                        self.metrics
                            .leaked_enis_deleted
                            .fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    Err(err) => warn!("deleting leaked ENI {}: {err}", e.id),
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::datastore::{PodRef, SandboxKey};
    use crate::node::fakes::{FakeImds, LiveHost, NoEc2};
    use crate::node::{AddOutcome, Timing};

    /// Issue 19: a fresh node's first leaked-ENI sweep waits the sweep interval (nothing
    /// of this instance can have leaked); a restart (a checkpoint on disk) or a sign of a
    /// leak in this run brings it to the minimum age.
    #[tokio::test]
    async fn the_first_sweep_waits_for_a_sign_of_a_leak() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::config::from_env(|_| None).unwrap();
        cfg.backing_store = dir.path().join("ipam.json").display().to_string();
        let timing = Timing::default();
        let start = || {
            Node::start(
                cfg.clone(),
                Arc::new(NoEc2),
                Arc::new(FakeImds),
                LiveHost::with(vec![]),
                timing.clone(),
            )
        };
        let next = |n: &Node| {
            let at = n.reconciler.lock().unwrap().next_sweep.unwrap();
            at.duration_since(Instant::now()).as_secs_f64()
        };
        let about = |got: f64, want: Duration| (got - want.as_secs_f64()).abs() < 2.0;
        let node = start().await.unwrap();
        node.housekeeping().await;
        let n = next(&node);
        assert!(about(n, timing.leaked_sweep_interval), "a fresh node: {n}");
        node.note_possible_leak();
        let n = next(&node);
        assert!(about(n, timing.leaked_min_age), "a sign of a leak: {n}");
        drop(node);
        // An ipamd ran here before: what it may have left is swept at the minimum age.
        let node = start().await.unwrap();
        node.housekeeping().await;
        let first = next(&node);
        assert!(
            about(first, timing.leaked_min_age),
            "after a restart: {first}"
        );
        // A sweep that is due sooner is not put off.
        tokio::time::sleep(Duration::from_millis(50)).await;
        node.note_possible_leak();
        assert!(next(&node) <= first);
    }

    #[tokio::test]
    async fn a_free_address_a_pod_route_points_at_is_kept_for_that_pod() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::config::from_env(|_| None).unwrap();
        cfg.backing_store = dir.path().join("ipam.json").display().to_string();
        cfg.ip_cooldown = Duration::ZERO;
        cfg.add_wait = Duration::from_millis(100);
        let host = LiveHost::with(vec![]);
        let node = Node::start(
            cfg,
            Arc::new(NoEc2),
            Arc::new(FakeImds),
            host.clone(),
            Timing::default(),
        )
        .await
        .unwrap();
        // A DEL released 10.0.0.6 but its datapath stayed: the route is still there.
        *host.0.lock().unwrap() =
            Some(vec![("10.0.0.6".parse().unwrap(), "enic440f455693".into())]);
        assert_eq!(
            node.adopt_routed_free().await,
            0,
            "one pass could be a DEL in flight"
        );
        assert_eq!(node.adopt_routed_free().await, 1);
        for c in ["a", "b"] {
            let key = SandboxKey {
                network: "aws-cni".into(),
                container_id: c.into(),
                if_name: "eth0".into(),
            };
            let AddOutcome::Assigned(a) = node.add(key, PodRef::default()).await.unwrap() else {
                panic!("no address")
            };
            assert_ne!(a.ip.to_string(), "10.0.0.6");
        }
        let held = node.assignments();
        assert!(
            held.iter()
                .any(|a| a.key.container_id == "recovered:enic440f455693")
        );
    }

    #[tokio::test]
    async fn assignments_without_a_pod_interface_are_reclaimed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::config::from_env(|_| None).unwrap();
        cfg.backing_store = dir.path().join("ipam.json").display().to_string();
        cfg.ip_cooldown = Duration::ZERO;
        cfg.add_wait = Duration::from_millis(100);
        let host = LiveHost::with(vec![]);
        let timing = Timing {
            reclaim_after: Duration::from_millis(300),
            ..Timing::default()
        };
        let start = |cfg: Config, host: Arc<LiveHost>| {
            let timing = timing.clone();
            async move {
                Node::start(cfg, Arc::new(NoEc2), Arc::new(FakeImds), host, timing)
                    .await
                    .unwrap()
            }
        };
        let node = start(cfg.clone(), host.clone()).await;
        let mut ips = Vec::new();
        for c in ["kept", "gone"] {
            let key = SandboxKey {
                network: "aws-cni".into(),
                container_id: c.into(),
                if_name: "eth0".into(),
            };
            let AddOutcome::Assigned(a) = node.add(key, PodRef::default()).await.unwrap() else {
                panic!("no address")
            };
            ips.push(a.ip);
        }
        // Only the first pod's interface exists (the second's DEL never reached ipamd).
        *host.0.lock().unwrap() = Some(vec![(ips[0], "eni1".into())]);
        assert_eq!(
            node.reclaim_stale().await,
            0,
            "too young: an ADD may be in flight"
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        *host.0.lock().unwrap() = None;
        assert_eq!(
            node.reclaim_stale().await,
            0,
            "an unreadable host proves nothing"
        );
        *host.0.lock().unwrap() = Some(vec![(ips[0], "eni1".into())]);
        assert_eq!(node.reclaim_stale().await, 1);
        let held: Vec<Ipv4Addr> = node.assignments().iter().map(|a| a.ip).collect();
        assert_eq!(held, vec![ips[0]]);
        assert_eq!(node.metrics.reclaimed_ips.load(Ordering::Relaxed), 1);
        // Durable: a restarted ipamd holds only the live pod's address.
        drop(node);
        let node = start(cfg, host).await;
        let held: Vec<Ipv4Addr> = node.assignments().iter().map(|a| a.ip).collect();
        assert_eq!(held, vec![ips[0]]);
    }
}
