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
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{error, warn};

use crate::checkpoint::{Journal, Pending};
use crate::cloud::{Ec2, EniInfo, Imds, InstanceMeta};
use crate::config::Config;
use crate::datastore::{Assignment, Datastore, Eni, SandboxKey};
use crate::hostnet::{EniNet, HostNetwork, NodeNet};
use crate::metrics::Metrics;
use crate::net::Ipv4Net;
use crate::pool::Limits;

pub use crate::clock::{now_ns, rfc3339};
pub use cordon::Schedule;
pub use enis::{TAG_CLUSTER, TAG_CREATED_AT, TAG_INSTANCE_ID, pick_subnet};
pub use pool_loop::DecisionRecord;
pub use serving::AddOutcome;
pub use startup::{RECOVERED_PREFIX, StartError};
pub use vpc_cni_proto::host_veth_name;

/// Pacing. Defaults are upstream's; tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    pub pool_interval: Duration,
    pub shrink_interval: Duration,
    pub eni_min_age: Duration,
    pub reconcile_interval: Duration,
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
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            pool_interval: Duration::from_secs(5),
            shrink_interval: Duration::from_secs(30),
            eni_min_age: Duration::from_secs(60),
            reconcile_interval: Duration::from_secs(60),
            subnet_full_backoff: Duration::from_secs(120),
            leaked_sweep_interval: Duration::from_secs(3600),
            leaked_min_age: Duration::from_secs(300),
            detach_timeout: Duration::from_secs(30),
            compact_every_ops: 2000,
            checkpoint_fsync: true,
            eni_link_wait: Duration::from_secs(60),
            reclaim_after: Duration::from_secs(60),
            schedule_wait: Duration::from_secs(10),
        }
    }
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
    pub meta: InstanceMeta,
    vpc_cidrs: RwLock<Vec<Ipv4Net>>,
    imds: Arc<dyn Imds>,
    host: Arc<dyn HostNetwork>,
    primary_subnet: String,
    primary_subnet_cidr: Ipv4Net,
    vpc_id: String,
    primary_sgs: Vec<String>,
    store: Mutex<Datastore>,
    journal: Journal,
    ops_since_compact: AtomicU64,
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
    pool: Mutex<pool_loop::LoopState>,
    reconciler: Mutex<reconcile::ReconcileState>,
    pub timing: Timing,
    checkpoint_path: PathBuf,
    pub metrics: Metrics,
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

    /// The node-wide host state these knobs and this VPC call for.
    pub fn node_net(&self) -> NodeNet {
        NodeNet::new(
            &self.cfg,
            &self.meta.primary_mac,
            self.meta.primary_ip,
            &self.vpc_cidrs(),
        )
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
        if let Err(e) = self.host.setup_node(&self.node_net()).await {
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
        p.durable().await
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
