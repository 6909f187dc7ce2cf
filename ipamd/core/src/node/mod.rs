//! The node: the state every job of ipamd's engine shares (the datastore with its
//! journal, the EC2 / IMDS / host edges, the limits, the knobs), and nothing else.
//!
//! Each job is a room of its own: `startup` (restore from IMDS, the checkpoint and the
//! host, before any EC2 call), `serving` (what happens when a pod asks: AddNetwork with
//! its bounded wait, DelNetwork, GC, health), `pool_loop` (the warm-pool policy's
//! decisions carried out: assign and release addresses), `enis` (attach and free ENIs),
//! `reconcile` (how ipamd, EC2 and the host come to agree: forced removal, reclaim, the
//! leaked-ENI sweep) and `cordon` (the node's schedulability, from the Kubernetes API).

mod cordon;
mod custom;
mod enis;
#[cfg(test)]
mod fakes;
mod pool_loop;
mod reconcile;
mod serving;
mod startup;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::checkpoint::{Journal, Pending};
use crate::cloud::{CloudError, Ec2, EniInfo, Imds};
use crate::config::{Config, ConfigError};
use crate::datastore::{Assignment, Datastore, Eni, SandboxKey, StoreError};
use crate::hostnet::{EniNet, HostNetwork, NodeNet};
use crate::metrics::Metrics;
use crate::net::Ipv4Net;
use crate::pool::Limits;

pub use crate::clock::{now_ns, rfc3339};
pub use cordon::Schedule;
pub use custom::{EniConfig, EniConfigState};
pub use enis::{TAG_CLUSTER, TAG_CREATED_AT, TAG_INSTANCE_ID, pick_subnet};
pub use pool_loop::DecisionRecord;
pub use serving::AddOutcome;
pub use startup::{Identity, RECOVERED_PREFIX, StartError};
pub use vpc_cni_proto::host_veth_name;

/// Pacing. Defaults are upstream's; tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    pub pool_interval: Duration,
    pub shrink_interval: Duration,
    pub eni_min_age: Duration,
    /// How long a shortfall of the warm target alone (no pod waiting, more than half of
    /// it still free) must last before an ENI is attached for it. Zero: at once.
    pub warm_grace: Duration,
    /// How long a surplus must last before an ENI (or, with IP targets, an address) is
    /// given back: a pool that churns keeps what it will need again. Zero: at once.
    pub shrink_grace: Duration,
    pub reconcile_interval: Duration,
    /// A reconcile pass asks EC2 only when IMDS disagrees with the datastore (or IMDS
    /// cannot answer, or a removal awaits its confirming describe), and at least this often.
    pub ec2_reconcile_interval: Duration,
    pub subnet_full_backoff: Duration,
    pub leaked_sweep_interval: Duration,
    pub leaked_min_age: Duration,
    pub detach_timeout: Duration,
    pub compact_every_ops: u64,
    pub checkpoint_fsync: bool,
    /// How long a newly attached ENI's link may take to appear on the host.
    pub eni_link_wait: Duration,
    /// An assignment whose pod has had no interface on the host for this long is
    /// released (a DEL that never reached ipamd). Zero: never.
    pub reclaim_after: Duration,
    /// With the Kubernetes API watched, how long ENIs are left alone at start-up while the
    /// first answer on whether the node is cordoned is awaited (then: as if schedulable).
    pub schedule_wait: Duration,
    /// How long the daemon retries IMDS at start-up before it gives up (and exits).
    pub imds_wait: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            pool_interval: Duration::from_secs(5),
            shrink_interval: Duration::from_secs(30),
            eni_min_age: Duration::from_secs(60),
            warm_grace: Duration::from_secs(5),
            shrink_grace: Duration::from_secs(300),
            reconcile_interval: Duration::from_secs(60),
            ec2_reconcile_interval: Duration::from_secs(300),
            subnet_full_backoff: Duration::from_secs(120),
            leaked_sweep_interval: Duration::from_secs(3600),
            leaked_min_age: Duration::from_secs(300),
            detach_timeout: Duration::from_secs(30),
            compact_every_ops: 2000,
            checkpoint_fsync: true,
            eni_link_wait: Duration::from_secs(60),
            reclaim_after: Duration::from_secs(60),
            schedule_wait: Duration::from_secs(10),
            imds_wait: Duration::from_secs(120),
        }
    }
}

/// The pacing knobs beyond upstream's (`IPAMD_*_MS`), each with a floor: a pool loop
/// or a reconcile at 0 ms would spin on EC2 describes.
pub fn timing_from_env(get: impl Fn(&str) -> Option<String>) -> Result<Timing, ConfigError> {
    let mut t = Timing::default();
    let ms = |var: &str, floor_ms: u64, zero_ok: bool, into: &mut Duration| {
        let Some(v) = get(var).filter(|v| !v.trim().is_empty()) else {
            return Ok(());
        };
        let bad = |expected: String| ConfigError {
            var: var.to_string(),
            value: v.clone(),
            expected,
        };
        let n: u64 = v
            .trim()
            .parse()
            .map_err(|_| bad("a number of milliseconds".into()))?;
        if n < floor_ms && !(zero_ok && n == 0) {
            return Err(bad(format!(
                "at least {floor_ms} ms{}",
                if zero_ok { " (or 0: off)" } else { "" }
            )));
        }
        *into = Duration::from_millis(n);
        Ok(())
    };
    ms("IPAMD_POOL_INTERVAL_MS", 100, false, &mut t.pool_interval)?;
    ms(
        "IPAMD_SHRINK_INTERVAL_MS",
        100,
        false,
        &mut t.shrink_interval,
    )?;
    ms("IPAMD_ENI_MIN_AGE_MS", 0, true, &mut t.eni_min_age)?;
    ms("IPAMD_WARM_GRACE_MS", 0, true, &mut t.warm_grace)?;
    ms("IPAMD_SHRINK_GRACE_MS", 0, true, &mut t.shrink_grace)?;
    ms(
        "IPAMD_RECONCILE_INTERVAL_MS",
        1000,
        false,
        &mut t.reconcile_interval,
    )?;
    ms(
        "IPAMD_EC2_RECONCILE_INTERVAL_MS",
        1000,
        false,
        &mut t.ec2_reconcile_interval,
    )?;
    ms(
        "IPAMD_SUBNET_FULL_BACKOFF_MS",
        1000,
        false,
        &mut t.subnet_full_backoff,
    )?;
    ms(
        "IPAMD_LEAKED_ENI_SWEEP_MS",
        10_000,
        false,
        &mut t.leaked_sweep_interval,
    )?;
    ms(
        "IPAMD_LEAKED_ENI_MIN_AGE_MS",
        0,
        true,
        &mut t.leaked_min_age,
    )?;
    ms("IPAMD_ENI_LINK_WAIT_MS", 0, true, &mut t.eni_link_wait)?;
    ms("IPAMD_RECLAIM_AFTER_MS", 1000, true, &mut t.reclaim_after)?;
    ms("IPAMD_SCHEDULE_WAIT_MS", 0, true, &mut t.schedule_wait)?;
    ms("IPAMD_IMDS_WAIT_MS", 0, true, &mut t.imds_wait)?;
    if let Some(v) = get("IPAMD_CHECKPOINT_FSYNC") {
        t.checkpoint_fsync = match v.as_str() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(ConfigError {
                    var: "IPAMD_CHECKPOINT_FSYNC".into(),
                    value: v,
                    expected: "true or false".into(),
                });
            }
        };
    }
    Ok(t)
}

/// The datastore as copied at one instant.
#[derive(Debug, Clone)]
pub struct StoreView {
    /// By device number.
    pub enis: Vec<Eni>,
    pub assignments: Vec<Assignment>,
    /// (address, released at ns) of every address cooling down.
    pub cooldowns: Vec<(Ipv4Addr, u64)>,
    /// Per subnet: (addresses held for pods, assigned).
    pub subnets: std::collections::BTreeMap<String, (u32, u32)>,
    pub total: u32,
    pub assigned: u32,
    pub cooldown: u32,
    /// Assignable now.
    pub free: u32,
}

pub struct Node {
    pub cfg: Config,
    /// The instance as IMDS describes it: known once IMDS has answered (`learn_instance`).
    identity: OnceLock<Identity>,
    vpc_cidrs: RwLock<Vec<Ipv4Net>>,
    imds: Arc<dyn Imds>,
    host: Arc<dyn HostNetwork>,
    store: Mutex<Datastore>,
    journal: Journal,
    ops_since_compact: AtomicU64,
    /// Why the last checkpoint write failed, until one succeeds (health says NOT_SERVING).
    checkpoint_fault: Mutex<Option<String>>,
    ec2: Arc<dyn Ec2>,
    limits: RwLock<Option<Limits>>,
    /// Wakes the pool loop: a pod waits, or the policy has work after a change.
    wake_pool: Notify,
    /// Wakes AddNetwork calls waiting for an address.
    addresses_added: Notify,
    /// An ENI attach is under way (it runs beside the pool loop).
    attaching: AtomicBool,
    /// AddNetwork calls waiting for an address now.
    waiting: AtomicU32,
    /// The node's schedulability and since when.
    schedule: Mutex<(Schedule, Instant)>,
    /// Custom networking: the node's ENIConfig, and every one the API holds.
    eni_config: Mutex<EniConfigState>,
    eni_configs_seen: Mutex<Vec<EniConfig>>,
    /// Wakes the Kubernetes side when the ENIConfig in use or its problem changed (the
    /// node's CNINode and event follow it).
    eni_config_changed: Notify,
    /// The primary ENI's security groups as IMDS last said them, and the groups ipamd last
    /// gave each secondary ENI (not asked again while IMDS lags).
    primary_sgs: RwLock<Vec<String>>,
    sgs_given: Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    /// ANNOTATE_POD_IP: where a pod's address (or its release) is sent to be written on the
    /// pod; never awaited on a pod's path.
    pod_ip_sink: Mutex<Option<tokio::sync::mpsc::UnboundedSender<PodIpNote>>>,
    /// kubelet's `status.capacity.pods` (0: not known).
    kubelet_max_pods: AtomicU32,
    pool: Mutex<pool_loop::LoopState>,
    reconciler: Mutex<reconcile::ReconcileState>,
    pub timing: Timing,
    checkpoint_path: PathBuf,
    pub metrics: Metrics,
}

/// A pod's address to write on it (`None`: released).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIpNote {
    pub pod: crate::datastore::PodRef,
    pub ip: Option<Ipv4Addr>,
}

impl Node {
    /// ANNOTATE_POD_IP: pods' addresses go to `tx` from now on.
    pub fn set_pod_ip_sink(&self, tx: tokio::sync::mpsc::UnboundedSender<PodIpNote>) {
        *self.pod_ip_sink.lock().unwrap() = Some(tx);
    }

    pub(super) fn note_pod_ip(&self, pod: &crate::datastore::PodRef, ip: Option<Ipv4Addr>) {
        if pod.name.is_empty() {
            return;
        }
        if let Some(tx) = &*self.pod_ip_sink.lock().unwrap() {
            let _ = tx.send(PodIpNote {
                pod: pod.clone(),
                ip,
            });
        }
    }
}

pub(super) fn store_eni(e: &EniInfo, is_primary: bool) -> Eni {
    Eni {
        id: e.id.clone(),
        mac: e.mac.clone(),
        device_number: e.device_number,
        is_primary,
        subnet_id: e.subnet_id.clone(),
        subnet_cidr: e.subnet_cidr,
        primary_ip: e.primary_ip,
        attachment_id: e.attachment_id.clone(),
        first_seen: Instant::now(),
        ips: e.secondary_ips.iter().copied().collect(),
        prefixes: e.prefixes.iter().copied().collect(),
    }
}

impl Node {
    pub fn vpc_cidrs(&self) -> Vec<Ipv4Net> {
        self.vpc_cidrs.read().unwrap().clone()
    }

    /// The instance, once IMDS has answered.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.get()
    }

    /// The instance, for work that needs it (EC2 calls): an error before IMDS answered.
    pub(super) fn known(&self) -> Result<&Identity, CloudError> {
        self.identity().ok_or_else(|| {
            CloudError::new(
                "ipamd",
                "InstanceNotKnown",
                "the instance metadata (IMDS) has not described the node yet",
            )
        })
    }

    /// The node-wide host state these knobs and this VPC call for (once the instance is known).
    pub fn node_net(&self) -> Option<NodeNet> {
        let id = self.identity()?;
        Some(NodeNet::new(
            &self.cfg,
            &id.meta.primary_mac,
            id.meta.primary_ip,
            &self.vpc_cidrs(),
        ))
    }

    pub(super) fn eni_net(&self, e: &Eni) -> EniNet {
        EniNet {
            id: e.id.clone(),
            mac: e.mac.clone(),
            device_number: e.device_number,
            primary_ip: e.primary_ip,
            subnet_cidr: e.subnet_cidr,
            mtu: self.cfg.eni_mtu,
        }
    }

    /// Converges the host: the node-wide rules and iptables, then every secondary ENI
    /// in the datastore (repairing whatever someone changed since).
    pub async fn converge_host(&self) {
        let Some(node_net) = self.node_net() else {
            return;
        };
        if let Err(e) = self.host.setup_node(&node_net).await {
            self.metrics.error("setupHostNetworkFailed");
            error!("host network setup: {e}");
        }
        let enis: Vec<EniNet> = {
            let s = self.store.lock().unwrap();
            s.enis()
                .filter(|e| !e.is_primary)
                .map(|e| self.eni_net(e))
                .collect()
        };
        for e in enis {
            if let Err(err) = self.host.setup_eni(&e, Duration::ZERO).await {
                warn!("host side of {} (device {}): {err}", e.id, e.device_number);
            }
        }
    }

    pub fn limits(&self) -> Option<Limits> {
        *self.limits.read().unwrap()
    }

    pub(super) fn compact_every_n_ops(&self) {
        if self.ops_since_compact.fetch_add(1, Ordering::Relaxed) + 1
            >= self.timing.compact_every_ops
        {
            self.ops_since_compact.store(0, Ordering::Relaxed);
            let s = self.store.lock().unwrap();
            // Not awaited: ordered after every line already queued.
            drop(self.journal.compact(s.assignments(), s.cooldowns()));
        }
    }

    /// Writes a snapshot of the current state (on shutdown, so upstream can read it).
    pub async fn compact(&self) -> std::io::Result<()> {
        let p = {
            let s = self.store.lock().unwrap();
            self.journal.compact(s.assignments(), s.cooldowns())
        };
        self.checkpointed(p.durable().await)
    }

    /// Notes how a checkpoint write went: a failure makes health NOT_SERVING (an answer
    /// that cannot be made durable must not be given) until a write succeeds again.
    pub(super) fn checkpointed(&self, r: std::io::Result<()>) -> std::io::Result<()> {
        let mut fault = self.checkpoint_fault.lock().unwrap();
        match &r {
            Ok(()) => {
                if fault.take().is_some() {
                    info!(
                        "checkpoint {} is writable again",
                        self.checkpoint_path.display()
                    );
                }
            }
            Err(e) => {
                if fault.is_none() {
                    error!(
                        "checkpoint {} cannot be written: {e}",
                        self.checkpoint_path.display()
                    );
                }
                *fault = Some(e.to_string());
            }
        }
        r
    }

    /// Why the checkpoint cannot be written now, if it cannot.
    pub fn checkpoint_fault(&self) -> Option<String> {
        self.checkpoint_fault.lock().unwrap().clone()
    }

    /// Releases every assignment `stale` picks and records each release in the journal
    /// (in the datastore's order); the caller awaits each before reporting it.
    pub(super) fn release_where(
        &self,
        stale: impl Fn(&Assignment) -> bool,
    ) -> Vec<(Pending, Assignment)> {
        let mut s = self.store.lock().unwrap();
        let now = now_ns();
        let keys: Vec<SandboxKey> = s
            .assignments()
            .into_iter()
            .filter(|a| stale(a))
            .map(|a| a.key)
            .collect();
        keys.iter()
            .filter_map(|k| s.release(k, now))
            .map(|a| (self.journal.record_del(&a, now), a))
            .collect()
    }

    /// Logs (and counts) addresses EC2 or IMDS listed for an ENI that no pod may get: an
    /// ENI's own primary address, or one another ENI holds. `loud`: new from EC2 just now.
    pub(super) fn note_refused(&self, eni: &str, refused: &[StoreError], loud: bool) {
        for e in refused {
            if loud {
                self.metrics.error("addressRefused");
                warn!("{eni}: not handed to pods: {e}");
            } else {
                debug!("{eni}: not handed to pods: {e}");
            }
        }
    }

    pub fn assignments(&self) -> Vec<Assignment> {
        self.store.lock().unwrap().assignments()
    }

    /// A consistent copy of the datastore for introspection and metrics.
    pub fn view(&self) -> StoreView {
        let mut s = self.store.lock().unwrap();
        let (total, assigned, cooldown, free) = s.counts(now_ns());
        let mut enis: Vec<Eni> = s.enis().cloned().collect();
        enis.sort_by_key(|e| e.device_number);
        StoreView {
            enis,
            assignments: s.assignments(),
            cooldowns: s.cooldowns(),
            subnets: s.subnet_counts(),
            total,
            assigned,
            cooldown,
            free,
        }
    }

    pub fn checkpoint_path(&self) -> &std::path::Path {
        &self.checkpoint_path
    }
}
