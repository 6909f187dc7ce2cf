//! The node: the datastore with its checkpoint, and the warm pool driven over EC2.
//!
//! Start-up serves from IMDS and the checkpoint before any EC2 round trip. AddNetwork
//! never fails just because the pool is refilling: it wakes the pool and waits (bounded)
//! for an address. The pool loop applies `pool::Policy` one step at a time; attaching an
//! ENI runs beside it, so addresses on ENIs already present keep flowing meanwhile.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::checkpoint::{self, Journal, LoadError};
use crate::cloud::{CloudError, Ec2, EniInfo, Imds, InstanceMeta, NewEni, SubnetInfo};
use crate::config::Config;
use crate::datastore::{Assignment, Datastore, Eni, PodRef, SandboxKey};
use crate::hostnet::{EniNet, HostNetwork, NodeNet};
use crate::metrics::Metrics;
use crate::net::Ipv4Net;
use crate::pool::{Decision, Limits, Mode, Policy, PoolState};

pub const TAG_INSTANCE_ID: &str = "node.k8s.amazonaws.com/instance_id";
pub const TAG_CREATED_AT: &str = "node.k8s.amazonaws.com/createdAt";
pub const TAG_CLUSTER: &str = "cluster.k8s.amazonaws.com/name";
/// Assignments rebuilt from host routes are keyed by the host veth's name.
pub const RECOVERED_PREFIX: &str = "recovered:";

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

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("instance metadata: {0}")]
    Imds(CloudError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
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

/// A decision of the pool loop and why, for introspection and logs.
#[derive(Debug, Clone)]
pub struct DecisionRecord {
    pub at: SystemTime,
    pub state: PoolState,
    pub decision: Decision,
    pub outcome: String,
}

#[derive(Debug, Default)]
struct PoolRuntime {
    last_shrink: Option<Instant>,
    subnet_full_until: Option<Instant>,
    prefix_fallback: bool,
    last_reconcile: Option<Instant>,
    last_sweep: Option<Instant>,
    decisions: Vec<DecisionRecord>,
    /// What the datastore held that EC2's last describe did not show: removed only when
    /// two describes in a row agree (describes can lag behind a change).
    missing: BTreeSet<Lost>,
}

/// What the Kubernetes API says of this node, for AWS_MANAGE_ENIS_NON_SCHEDULABLE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Not read: no Kubernetes API configured, or AWS_MANAGE_ENIS_NON_SCHEDULABLE=true.
    NotWatched,
    /// Watched, no answer yet.
    Pending,
    Schedulable,
    /// Cordoned: `spec.unschedulable`, or the `node.kubernetes.io/unschedulable:NoSchedule`
    /// taint (upstream reads only the taint, which the node controller adds after a cordon).
    Unschedulable,
    /// The API has no node of that name.
    NotFound,
}

impl Schedule {
    pub fn name(self) -> &'static str {
        match self {
            Schedule::NotWatched => "not watched",
            Schedule::Pending => "pending",
            Schedule::Schedulable => "schedulable",
            Schedule::Unschedulable => "unschedulable",
            Schedule::NotFound => "not found",
        }
    }
}

/// Counts the AddNetwork calls waiting for an address while alive.
struct Waiting<'a>(&'a AtomicU32);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicU32) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
    ec2: Arc<dyn Ec2>,
    limits: RwLock<Option<Limits>>,
    wake_pool: Notify,
    addresses_added: Notify,
    attaching: AtomicBool,
    /// AddNetwork calls waiting for an address now.
    waiting: AtomicU32,
    /// The node's schedulability and since when.
    schedule: Mutex<(Schedule, Instant)>,
    ops_since_compact: AtomicU64,
    runtime: Mutex<PoolRuntime>,
    pub timing: Timing,
    checkpoint_path: PathBuf,
    pub metrics: Metrics,
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn store_eni(e: &EniInfo, is_primary: bool) -> Eni {
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

pub use vpc_cni_proto::host_veth_name;

pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    (secs >= 0).then(|| UNIX_EPOCH + Duration::from_secs(secs as u64))
}

/// The tagged subnet in `az` with the most free addresses; the primary's subnet if it
/// is among them with more, or if none is tagged.
pub fn pick_subnet(tagged: &[SubnetInfo], az: &str, primary: SubnetInfo) -> SubnetInfo {
    tagged
        .iter()
        .filter(|s| s.availability_zone == az && s.available_addresses > 0)
        .max_by_key(|s| (s.available_addresses, s.id == primary.id))
        .cloned()
        .unwrap_or(primary)
}

pub enum AddOutcome {
    Assigned(Assignment),
    /// No address within the bounded wait.
    NoAddress,
}

impl Node {
    /// Builds the node from IMDS and the checkpoint: no EC2 call.
    pub async fn start(
        cfg: Config,
        ec2: Arc<dyn Ec2>,
        imds: Arc<dyn Imds>,
        host: Arc<dyn HostNetwork>,
        timing: Timing,
    ) -> Result<Arc<Node>, StartError> {
        let meta = imds.instance().await.map_err(StartError::Imds)?;
        let enis = imds.enis().await.map_err(StartError::Imds)?;
        let primary = enis
            .iter()
            .find(|e| e.mac == meta.primary_mac || e.device_number == 0)
            .cloned();
        let mut store = Datastore::new(cfg.ip_cooldown);
        for e in &enis {
            store.add_eni(store_eni(e, Some(&e.id) == primary.as_ref().map(|p| &p.id)));
        }
        let path = PathBuf::from(&cfg.backing_store);
        match checkpoint::load(&path) {
            Ok(l) => {
                info!(
                    assignments = l.assignments.len(),
                    cooldowns = l.cooldowns.len(),
                    journal_ops = l.journal_ops,
                    "restored checkpoint {}",
                    path.display()
                );
                for a in l.assignments {
                    store.restore(a);
                }
                for (ip, t) in l.cooldowns {
                    store.restore_cooldown(ip, t);
                }
            }
            Err(LoadError::Missing(_)) => {
                info!("no checkpoint at {}: starting empty", path.display())
            }
            Err(e @ LoadError::Corrupt { .. }) => {
                let aside = checkpoint::set_aside(&path).map_err(|io| {
                    StartError::Checkpoint(format!("{e}; and setting it aside failed: {io}"))
                })?;
                let routes = host.pod_routes().await.unwrap_or_else(|e| {
                    error!("reading the host's pod routes: {e}");
                    vec![]
                });
                error!(
                    "{e}; moved it to {} and rebuilt {} assignments from the host's pod routes",
                    aside.display(),
                    routes.len()
                );
                for (ip, veth) in routes {
                    store.restore(Assignment {
                        key: SandboxKey {
                            network: "aws-cni".into(),
                            container_id: format!("{RECOVERED_PREFIX}{veth}"),
                            if_name: "eth0".into(),
                        },
                        ip,
                        eni: String::new(),
                        device_number: 0,
                        assigned_at_ns: now_ns(),
                        pod: PodRef::default(),
                    });
                }
            }
            Err(e @ LoadError::Io { .. }) => return Err(StartError::Checkpoint(e.to_string())),
        }
        if store.orphan_count() > 0 {
            warn!(
                orphans = store.orphan_count(),
                "checkpointed addresses not on any ENI IMDS lists yet; kept reserved until EC2 confirms"
            );
        }
        let journal = Journal::start(&path, timing.checkpoint_fsync).map_err(|e| {
            StartError::Checkpoint(format!(
                "cannot open the journal of {}: {e}",
                path.display()
            ))
        })?;
        // Start every run from one snapshot of what was restored.
        journal
            .compact(store.assignments(), store.cooldowns())
            .durable()
            .await
            .map_err(|e| StartError::Checkpoint(format!("cannot write {}: {e}", path.display())))?;
        let primary = primary.unwrap_or_else(|| EniInfo {
            id: String::new(),
            mac: meta.primary_mac.clone(),
            device_number: 0,
            subnet_id: String::new(),
            subnet_cidr: Ipv4Net {
                addr: Ipv4Addr::UNSPECIFIED,
                len: 0,
            },
            vpc_id: String::new(),
            vpc_cidrs: vec![],
            security_groups: vec![],
            primary_ip: meta.primary_ip,
            secondary_ips: vec![],
            prefixes: vec![],
            attachment_id: None,
            tags: vec![],
            status: String::new(),
        });
        Ok(Arc::new(Node {
            vpc_cidrs: RwLock::new(primary.vpc_cidrs.clone()),
            imds,
            host,
            primary_subnet: primary.subnet_id.clone(),
            primary_subnet_cidr: primary.subnet_cidr,
            vpc_id: primary.vpc_id.clone(),
            primary_sgs: primary.security_groups.clone(),
            cfg,
            meta,
            store: Mutex::new(store),
            journal,
            ec2,
            limits: RwLock::new(None),
            wake_pool: Notify::new(),
            addresses_added: Notify::new(),
            attaching: AtomicBool::new(false),
            waiting: AtomicU32::new(0),
            schedule: Mutex::new((Schedule::NotWatched, Instant::now())),
            ops_since_compact: AtomicU64::new(0),
            runtime: Mutex::new(PoolRuntime::default()),
            timing,
            checkpoint_path: path,
            metrics: Metrics::default(),
        }))
    }

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

    fn eni_net(&self, e: &Eni) -> EniNet {
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

    fn after_op(&self) {
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

    pub async fn add(&self, key: SandboxKey, pod: PodRef) -> std::io::Result<AddOutcome> {
        let deadline = Instant::now() + self.cfg.add_wait;
        let mut waiting = None;
        loop {
            let added = self.addresses_added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            let got = {
                let mut s = self.store.lock().unwrap();
                match s.assign(&key, &pod, now_ns()) {
                    Ok((a, new)) => {
                        let wake = self.wants_pool(&mut s);
                        // A repeated ADD is recorded again on purpose: the first one's line
                        // may still be queued, and ours, behind it, answers only once both
                        // are written.
                        Some((self.journal.record_add(&a), a, new, wake))
                    }
                    Err(_) => None,
                }
            };
            if let Some((pending, a, new, wake)) = got {
                if let Err(e) = pending.durable().await {
                    if new {
                        self.store.lock().unwrap().release(&key, now_ns());
                    }
                    return Err(e);
                }
                self.after_op();
                // Keep the pool ahead of demand.
                if wake {
                    self.wake_pool.notify_one();
                }
                return Ok(AddOutcome::Assigned(a));
            }
            // Counted before the pool is woken: it sizes what it fetches for waiting pods
            // on a cordoned node by this.
            waiting.get_or_insert_with(|| Waiting::new(&self.waiting));
            self.wake_pool.notify_one();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(AddOutcome::NoAddress);
            }
            // Also re-check now and then: an address may leave cooldown without a notification.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), added).await;
        }
    }

    pub async fn del(&self, key: SandboxKey, pod: &PodRef) -> std::io::Result<Option<Assignment>> {
        let got = {
            let mut s = self.store.lock().unwrap();
            let now = now_ns();
            let released = s.release(&key, now).or_else(|| {
                // An assignment rebuilt from host routes is keyed by the pod's host veth.
                if pod.name.is_empty() {
                    return None;
                }
                let veth = host_veth_name(&self.cfg.veth_prefix, &pod.namespace, &pod.name);
                s.release(
                    &SandboxKey {
                        network: key.network.clone(),
                        container_id: format!("{RECOVERED_PREFIX}{veth}"),
                        if_name: "eth0".into(),
                    },
                    now,
                )
            });
            let wake = self.wants_pool(&mut s);
            released.map(|a| (self.journal.record_del(&a, now), a, wake))
        };
        let Some((pending, a, wake)) = got else {
            return Ok(None);
        };
        pending.durable().await?;
        self.after_op();
        if wake {
            self.wake_pool.notify_one();
        }
        Ok(Some(a))
    }

    /// Releases every assignment of `network` not in `valid` (CNI GC).
    pub async fn garbage_collect(
        &self,
        network: &str,
        valid: &BTreeSet<(String, String)>,
    ) -> std::io::Result<Vec<Assignment>> {
        let pending: Vec<_> = {
            let mut s = self.store.lock().unwrap();
            let now = now_ns();
            let stale: Vec<SandboxKey> = s
                .assignments()
                .into_iter()
                .map(|a| a.key)
                .filter(|k| {
                    k.network == network
                        && !valid.contains(&(k.container_id.clone(), k.if_name.clone()))
                })
                .collect();
            stale
                .iter()
                .filter_map(|k| s.release(k, now))
                .map(|a| (self.journal.record_del(&a, now), a))
                .collect()
        };
        let mut out = Vec::new();
        for (p, a) in pending {
            p.durable().await?;
            out.push(a);
        }
        self.wake_pool.notify_one();
        Ok(out)
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

    pub fn decisions(&self) -> Vec<DecisionRecord> {
        self.runtime.lock().unwrap().decisions.clone()
    }

    /// What the Kubernetes API last said of this node, and since when.
    pub fn schedule(&self) -> (Schedule, Instant) {
        *self.schedule.lock().unwrap()
    }

    /// Records what the Kubernetes API says of this node (from its watcher).
    pub fn set_schedule(&self, now: Schedule) {
        let before = {
            let mut s = self.schedule.lock().unwrap();
            let before = s.0;
            if before != now {
                *s = (now, Instant::now());
            }
            before
        };
        if before == now {
            return;
        }
        let manage = self.cfg.manage_enis_non_schedulable;
        match now {
            Schedule::Unschedulable if !manage => info!(
                "node {} is cordoned: no ENI is attached or freed and the warm pool is not grown while it is (AWS_MANAGE_ENIS_NON_SCHEDULABLE=false); pods that ask still get addresses on the ENIs attached",
                self.cfg.node_name
            ),
            Schedule::NotFound => warn!(
                "the Kubernetes API has no node named {:?} (MY_NODE_NAME): managing ENIs as on a schedulable node",
                self.cfg.node_name
            ),
            _ => info!(
                "node {}: {} (was {})",
                self.cfg.node_name,
                now.name(),
                before.name()
            ),
        }
        self.wake_pool.notify_one();
    }

    /// Why ENIs must be left alone now (AWS_MANAGE_ENIS_NON_SCHEDULABLE=false on a
    /// cordoned node, as upstream), or None.
    pub fn eni_hold(&self) -> Option<&'static str> {
        if self.cfg.manage_enis_non_schedulable {
            return None;
        }
        match self.schedule() {
            (Schedule::Unschedulable, _) => Some("node is cordoned"),
            (Schedule::Pending, since) if since.elapsed() < self.timing.schedule_wait => {
                Some("waiting for the Kubernetes API to say whether the node is cordoned")
            }
            _ => None,
        }
    }

    /// Can an AddNetwork be answered now, or soon by growing the pool? (health)
    pub fn can_serve(&self) -> bool {
        let free = self.store.lock().unwrap().counts(now_ns()).3;
        if free > 0 {
            return true;
        }
        match self.limits() {
            Some(l) => self.policy(l).decide(&self.pool_state(l)) != Decision::AtCapacity,
            None => true,
        }
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
        }
    }

    pub fn pool_state(&self, limits: Limits) -> PoolState {
        let mut s = self.store.lock().unwrap();
        Self::state_of(&mut s, limits)
    }

    fn state_of(s: &mut Datastore, limits: Limits) -> PoolState {
        let (total, assigned, cooldown, _) = s.counts(now_ns());
        let per = limits.slots_per_eni();
        let (mut enis, mut free_slots, mut prefixes) = (0, 0, 0);
        for e in s.enis() {
            enis += 1;
            free_slots += per.saturating_sub(e.slots_used());
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
    fn wants_pool(&self, s: &mut Datastore) -> bool {
        match self.limits() {
            Some(l) => self.policy(l).decide(&Self::state_of(s, l)) != Decision::Steady,
            None => true,
        }
    }

    /// The pool loop. Runs until the task is dropped.
    pub async fn run_pool(self: Arc<Self>) {
        self.converge_host().await;
        loop {
            if self.limits().is_none() {
                match self
                    .ec2
                    .instance_type_limits(&self.meta.instance_type)
                    .await
                {
                    Ok(l) => {
                        info!(
                            ?l,
                            max_pods = l.max_pods(),
                            "limits of {}",
                            self.meta.instance_type
                        );
                        *self.limits.write().unwrap() = Some(l);
                        self.reconcile().await;
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
                tokio::select! {
                    _ = tokio::time::sleep(self.timing.pool_interval) => {}
                    _ = self.wake_pool.notified() => {}
                }
            }
        }
    }

    fn record(&self, state: PoolState, decision: &Decision, outcome: impl Into<String>) {
        let outcome = outcome.into();
        debug!(?state, ?decision, %outcome, "pool");
        let mut rt = self.runtime.lock().unwrap();
        // The same decision held back for the same reason, pass after pass: one record.
        if let Some(last) = rt.decisions.last_mut()
            && last.decision == *decision
            && last.outcome == outcome
            && last.state == state
        {
            last.at = SystemTime::now();
            return;
        }
        rt.decisions.push(DecisionRecord {
            at: SystemTime::now(),
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
        let policy = self.policy(limits);
        let state = self.pool_state(limits);
        let mut decision = policy.decide(&state);
        let prefix_mode = matches!(policy.mode, Mode::Prefix { .. });
        let hold = self.eni_hold();
        if let Some(why) = hold {
            match decision {
                Decision::AttachEni | Decision::FreeEni => {
                    self.record(state, &decision, format!("held: {why}"));
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
                        self.record(state, &decision, format!("held: {why}"));
                        return false;
                    }
                    decision = Decision::Assign {
                        count: count.min(want),
                    };
                }
                _ => {}
            }
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
                if empty && self.shrink_allowed() {
                    self.free_eni(state, &Decision::FreeEni).await
                } else {
                    false
                }
            }
            Decision::Steady | Decision::AtCapacity => false,
            Decision::Assign { count } => {
                if let Some(until) = self.runtime.lock().unwrap().subnet_full_until
                    && Instant::now() < until
                {
                    return false;
                }
                let fallback = self.runtime.lock().unwrap().prefix_fallback;
                let per = limits.slots_per_eni();
                // Fill an existing ENI (lowest device number first) before attaching one.
                let target = {
                    let s = self.store.lock().unwrap();
                    let mut enis: Vec<&Eni> = s.enis().filter(|e| e.slots_used() < per).collect();
                    enis.sort_by_key(|e| e.device_number);
                    enis.first().map(|e| (e.id.clone(), per - e.slots_used()))
                };
                let Some((eni, room)) = target else {
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
                            if let Err(e) = s.add_ips(&eni, &ips) {
                                warn!("adding {ips:?} to {eni}: {e}");
                            }
                            for p in &prefixes {
                                if let Err(e) = s.add_prefix(&eni, *p) {
                                    warn!("adding {p} to {eni}: {e}");
                                }
                            }
                        }
                        self.addresses_added.notify_waiters();
                        self.record(
                            state,
                            &decision,
                            format!("{eni}: +{} IPs, +{} prefixes", ips.len(), prefixes.len()),
                        );
                        true
                    }
                    Err(e) if e.code == "InsufficientCidrBlocks" && prefix_mode => {
                        warn!("no free /28 in the subnet: falling back to single IPs ({e})");
                        self.runtime.lock().unwrap().prefix_fallback = true;
                        self.record(state, &decision, format!("fallback to /32: {e}"));
                        true
                    }
                    Err(e) if e.is_subnet_full() => {
                        self.metrics.error("increaseIPPoolSubnetFull");
                        warn!(
                            "subnet is out of addresses, backing off {:?}: {e}",
                            self.timing.subnet_full_backoff
                        );
                        self.runtime.lock().unwrap().subnet_full_until =
                            Some(Instant::now() + self.timing.subnet_full_backoff);
                        self.record(state, &decision, e.to_string());
                        false
                    }
                    Err(e) if e.code == "PrivateIpAddressLimitExceeded" => {
                        // Our view of the ENI was stale: learn the truth from EC2.
                        warn!("{e}; reconciling");
                        self.reconcile().await;
                        true
                    }
                    Err(e) => {
                        self.metrics.error("increaseIPPoolAllocIPAddressesFailed");
                        warn!("assigning addresses to {eni} failed: {e}");
                        self.record(state, &decision, e.to_string());
                        false
                    }
                }
            }
            Decision::AttachEni => {
                if let Some(until) = self.runtime.lock().unwrap().subnet_full_until
                    && Instant::now() < until
                {
                    return false;
                }
                if self.attaching.swap(true, Ordering::SeqCst) {
                    return false;
                }
                let me = self.clone();
                let short = policy.shortfall(&state);
                tokio::spawn(async move {
                    let r = me.attach_new_eni(limits, short).await;
                    me.attaching.store(false, Ordering::SeqCst);
                    match r {
                        Ok(id) => {
                            me.record(state, &Decision::AttachEni, format!("attached {id}"));
                            me.addresses_added.notify_waiters();
                            me.wake_pool.notify_one();
                        }
                        Err(e) => {
                            if e.is_subnet_full() {
                                me.runtime.lock().unwrap().subnet_full_until =
                                    Some(Instant::now() + me.timing.subnet_full_backoff);
                            }
                            me.metrics.error("increaseIPPoolAllocENI");
                            warn!("attaching an ENI failed: {e}");
                            me.record(state, &Decision::AttachEni, e.to_string());
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

    fn shrink_allowed(&self) -> bool {
        let mut rt = self.runtime.lock().unwrap();
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
            self.record(
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
        self.record(state, decision, format!("released {} IPs", picked.len()));
        !picked.is_empty()
    }

    async fn free_eni(&self, state: PoolState, decision: &Decision) -> bool {
        let eni = {
            let mut s = self.store.lock().unwrap();
            match s.freeable_eni(self.timing.eni_min_age, Instant::now()) {
                Some(id) => s.remove_eni(&id).ok(),
                None => None,
            }
        };
        let Some(eni) = eni else {
            self.record(state, decision, "no ENI old enough and empty");
            return false;
        };
        if let Err(e) = self.host.teardown_eni(&self.eni_net(&eni)).await {
            warn!("undoing the host side of {}: {e}", eni.id);
        }
        match self
            .detach_and_delete(&eni.id, eni.attachment_id.clone())
            .await
        {
            Ok(()) => {
                info!("freed {} (device {})", eni.id, eni.device_number);
                self.record(state, decision, format!("freed {}", eni.id));
                true
            }
            Err(e) => {
                self.metrics.error("decreaseIPPoolFreeENIFailed");
                warn!("freeing {} failed, keeping it: {e}", eni.id);
                let mut s = self.store.lock().unwrap();
                s.add_eni(eni);
                false
            }
        }
    }

    /// Detach, wait until EC2 lets go, delete. A failure after the detach leaves an
    /// unattached tagged ENI that the leaked-ENI sweep removes.
    async fn detach_and_delete(
        &self,
        eni_id: &str,
        known: Option<String>,
    ) -> Result<(), CloudError> {
        // The attachment id is cached from our attach or the last reconcile; describe only
        // when it is not known.
        let attachment = match known {
            Some(a) => Some(a),
            None => self
                .ec2
                .instance_enis(&self.meta.instance_id)
                .await?
                .into_iter()
                .find(|e| e.id == eni_id)
                .and_then(|e| e.attachment_id),
        };
        if let Some(att) = attachment {
            self.ec2.detach_eni(&att).await?;
        }
        let deadline = Instant::now() + self.timing.detach_timeout;
        let mut wait = Duration::from_millis(100);
        loop {
            match self.ec2.delete_eni(eni_id).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.code == "InvalidNetworkInterface.InUse" && Instant::now() < deadline =>
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) if e.code == "InvalidNetworkInterfaceID.NotFound" => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    async fn attach_new_eni(&self, limits: Limits, short: u32) -> Result<String, CloudError> {
        let per = limits.slots_per_eni();
        let (used, prefix_mode, fallback) = {
            let s = self.store.lock().unwrap();
            let used: BTreeSet<u32> = s.enis().map(|e| e.device_number).collect();
            let policy = self.policy(limits);
            (
                used,
                matches!(policy.mode, Mode::Prefix { .. }),
                self.runtime.lock().unwrap().prefix_fallback,
            )
        };
        let device = (1..limits.max_enis.max(2) + 16)
            .find(|d| !used.contains(d))
            .unwrap_or(1);
        let (secondary, prefixes) = if prefix_mode && !fallback {
            (0, short.div_ceil(16).clamp(1, per))
        } else if matches!(self.policy(limits).mode, Mode::Eni { .. }) {
            (per, 0)
        } else {
            (short.clamp(1, per), 0)
        };
        let mut tags = vec![
            (TAG_INSTANCE_ID.to_string(), self.meta.instance_id.clone()),
            (TAG_CREATED_AT.to_string(), rfc3339(SystemTime::now())),
        ];
        if !self.cfg.cluster_name.is_empty() {
            tags.push((TAG_CLUSTER.to_string(), self.cfg.cluster_name.clone()));
        }
        tags.extend(
            self.cfg
                .additional_eni_tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let subnet = self.subnet_for_new_eni().await;
        let created = self
            .ec2
            .create_eni(&NewEni {
                subnet_id: subnet.id.clone(),
                security_groups: self.primary_sgs.clone(),
                description: format!("aws-K8S-{}", self.meta.instance_id),
                tags,
                secondary_ips: secondary,
                prefixes,
            })
            .await?;
        let attachment = match self
            .ec2
            .attach_eni(&created.id, &self.meta.instance_id, device)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                // Never leave a created ENI behind.
                if let Err(d) = self.ec2.delete_eni(&created.id).await {
                    warn!(
                        "could not delete {} after a failed attach (the sweep will): {d}",
                        created.id
                    );
                }
                return Err(e);
            }
        };
        if let Err(e) = self
            .ec2
            .set_delete_on_termination(&created.id, &attachment)
            .await
        {
            warn!("DeleteOnTermination on {} failed: {e}", created.id);
        }
        let mut info = created;
        info.device_number = device;
        info.subnet_cidr = subnet.cidr;
        info.attachment_id = Some(attachment);
        let id = info.id.clone();
        // Its addresses are handed out only once the host can route them.
        let eni = store_eni(&info, false);
        if let Err(e) = self
            .host
            .setup_eni(&self.eni_net(&eni), self.timing.eni_link_wait)
            .await
        {
            return Err(CloudError::new(
                "HostNetwork",
                "EniSetup",
                format!("{id} is attached but its host side is not ready (reconcile retries): {e}"),
            ));
        }
        self.store.lock().unwrap().add_eni(eni);
        info!(
            "attached {id} at device {device} with {} IPs, {} prefixes",
            info.secondary_ips.len(),
            info.prefixes.len()
        );
        Ok(id)
    }

    /// Subnet discovery: the subnet tagged kubernetes.io/role/cni in this VPC and AZ with
    /// the most free addresses (the primary ENI's subnet competes too); without the knob,
    /// or when EC2 cannot say, the primary ENI's subnet.
    async fn subnet_for_new_eni(&self) -> SubnetInfo {
        let primary = SubnetInfo {
            id: self.primary_subnet.clone(),
            cidr: self.primary_subnet_cidr,
            availability_zone: self.meta.availability_zone.clone(),
            available_addresses: 0,
        };
        if !self.cfg.enable_subnet_discovery || self.vpc_id.is_empty() {
            return primary;
        }
        match self.ec2.cni_subnets(&self.vpc_id).await {
            Ok(subnets) => pick_subnet(&subnets, &self.meta.availability_zone, primary),
            Err(e) => {
                warn!("subnet discovery failed, using the primary ENI's subnet: {e}");
                primary
            }
        }
    }

    /// Learns from EC2 what IMDS had not shown yet (or lost): ENIs and addresses.
    pub async fn reconcile(&self) {
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
        let enis = match self.ec2.instance_enis(&self.meta.instance_id).await {
            Ok(e) => e,
            Err(e) => {
                self.metrics.error("nodeIPPoolReconcileDescribeFailed");
                warn!("reconcile: {e}");
                return;
            }
        };
        let t_describe = t0.elapsed();
        // IMDS knows what EC2's describe lacks: subnet CIDRs, and the VPC's CIDRs.
        let imds_enis = self.imds.enis().await.unwrap_or_default();
        let t_imds = t0.elapsed();
        if let Some(p) = imds_enis.iter().find(|e| e.mac == self.meta.primary_mac)
            && !p.vpc_cidrs.is_empty()
            && self.vpc_cidrs() != p.vpc_cidrs
        {
            info!(
                "VPC CIDRs are now {:?}: refreshing the SNAT rules",
                p.vpc_cidrs
            );
            *self.vpc_cidrs.write().unwrap() = p.vpc_cidrs.clone();
        }
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
            } else if e.subnet_id == self.primary_subnet {
                e.subnet_cidr = self.primary_subnet_cidr;
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
        {
            let mut s = self.store.lock().unwrap();
            for eni in ready {
                s.add_eni(eni);
            }
            for e in &enis {
                if s.eni(&e.id).is_some() {
                    s.set_attachment(&e.id, e.attachment_id.clone());
                    let _ = s.add_ips(&e.id, &e.secondary_ips);
                    for p in &e.prefixes {
                        let _ = s.add_prefix(&e.id, *p);
                    }
                }
            }
        }
        self.force_remove(&before, &enis).await;
        self.runtime.lock().unwrap().last_reconcile = Some(Instant::now());
        self.metrics.reconciled("nodeIPPoolReconcile");
        self.addresses_added.notify_waiters();
        let t_store = t0.elapsed();
        self.converge_host().await;
        self.reclaim_stale().await;
        debug!(
            "reconcile: describe {t_describe:?}, IMDS {:?}, store {:?}, host {:?}",
            t_imds - t_describe,
            t_store - t_imds,
            t0.elapsed() - t_store
        );
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
            let mut rt = self.runtime.lock().unwrap();
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
        let pending: Vec<_> = {
            let mut s = self.store.lock().unwrap();
            let stale: Vec<SandboxKey> = s
                .assignments()
                .into_iter()
                .filter(|a| {
                    !live.contains(&a.ip) && now.saturating_sub(a.assigned_at_ns) >= grace_ns
                })
                .map(|a| a.key)
                .collect();
            stale
                .iter()
                .filter_map(|k| s.release(k, now))
                .map(|a| (self.journal.record_del(&a, now), a))
                .collect()
        };
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

    async fn housekeeping(&self) {
        let (reconcile, sweep) = {
            let rt = self.runtime.lock().unwrap();
            (
                rt.last_reconcile
                    .is_none_or(|t| t.elapsed() >= self.timing.reconcile_interval),
                !self.cfg.disable_leaked_eni_cleanup
                    && rt
                        .last_sweep
                        .is_none_or(|t| t.elapsed() >= self.timing.leaked_sweep_interval),
            )
        };
        if reconcile {
            self.reconcile().await;
        }
        if sweep {
            self.runtime.lock().unwrap().last_sweep = Some(Instant::now());
            self.sweep_leaked_enis().await;
        }
    }

    /// Deletes ENIs this instance created that are left unattached (a crash between
    /// create and attach, or detach and delete): older than the minimum age.
    pub async fn sweep_leaked_enis(&self) -> usize {
        let enis = match self
            .ec2
            .unattached_enis_tagged(TAG_INSTANCE_ID, &self.meta.instance_id)
            .await
        {
            Ok(e) => e,
            Err(e) => {
                self.metrics.error("leakedENISweepFailed");
                warn!("leaked-ENI sweep: {e}");
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

    pub fn checkpoint_path(&self) -> &std::path::Path {
        &self.checkpoint_path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::CloudResult;
    use crate::net::parse_cidr;
    use async_trait::async_trait;

    struct FakeImds;

    #[async_trait]
    impl Imds for FakeImds {
        async fn instance(&self) -> CloudResult<InstanceMeta> {
            Ok(InstanceMeta {
                instance_id: "i-1".into(),
                instance_type: "m5.large".into(),
                availability_zone: "us-west-2a".into(),
                primary_mac: "02:00:00:00:00:01".into(),
                primary_ip: "10.0.0.4".parse().unwrap(),
            })
        }
        async fn enis(&self) -> CloudResult<Vec<EniInfo>> {
            Ok(vec![EniInfo {
                id: "eni-1".into(),
                mac: "02:00:00:00:00:01".into(),
                device_number: 0,
                subnet_id: "subnet-1".into(),
                subnet_cidr: parse_cidr("10.0.0.0/24").unwrap(),
                vpc_id: "vpc-1".into(),
                vpc_cidrs: vec![parse_cidr("10.0.0.0/16").unwrap()],
                security_groups: vec![],
                primary_ip: "10.0.0.4".parse().unwrap(),
                secondary_ips: ["10.0.0.5", "10.0.0.6", "10.0.0.7"]
                    .iter()
                    .map(|s| s.parse().unwrap())
                    .collect(),
                prefixes: vec![],
                attachment_id: None,
                tags: vec![],
                status: "in-use".into(),
            }])
        }
    }

    /// EC2 is never needed to start.
    struct NoEc2;

    fn none<T>() -> CloudResult<T> {
        Err(CloudError::new(
            "fake",
            "Unavailable",
            "no EC2 in this test",
        ))
    }

    #[async_trait]
    impl Ec2 for NoEc2 {
        async fn instance_type_limits(&self, _: &str) -> CloudResult<Limits> {
            none()
        }
        async fn instance_enis(&self, _: &str) -> CloudResult<Vec<EniInfo>> {
            none()
        }
        async fn unattached_enis_tagged(&self, _: &str, _: &str) -> CloudResult<Vec<EniInfo>> {
            none()
        }
        async fn cni_subnets(&self, _: &str) -> CloudResult<Vec<SubnetInfo>> {
            none()
        }
        async fn create_eni(&self, _: &NewEni) -> CloudResult<EniInfo> {
            none()
        }
        async fn attach_eni(&self, _: &str, _: &str, _: u32) -> CloudResult<String> {
            none()
        }
        async fn set_delete_on_termination(&self, _: &str, _: &str) -> CloudResult<()> {
            none()
        }
        async fn detach_eni(&self, _: &str) -> CloudResult<()> {
            none()
        }
        async fn delete_eni(&self, _: &str) -> CloudResult<()> {
            none()
        }
        async fn assign_ips(&self, _: &str, _: u32) -> CloudResult<Vec<Ipv4Addr>> {
            none()
        }
        async fn assign_prefixes(&self, _: &str, _: u32) -> CloudResult<Vec<Ipv4Net>> {
            none()
        }
        async fn unassign_ips(&self, _: &str, _: &[Ipv4Addr]) -> CloudResult<()> {
            none()
        }
        async fn unassign_prefixes(&self, _: &str, _: &[Ipv4Net]) -> CloudResult<()> {
            none()
        }
    }

    /// A host whose pod routes the test sets (`None`: they cannot be read); its network
    /// setup succeeds.
    struct LiveHost(std::sync::Mutex<Option<Vec<(Ipv4Addr, String)>>>);

    impl LiveHost {
        fn with(routes: Vec<(Ipv4Addr, String)>) -> Arc<LiveHost> {
            Arc::new(LiveHost(std::sync::Mutex::new(Some(routes))))
        }
    }

    #[async_trait]
    impl HostNetwork for LiveHost {
        async fn setup_node(&self, _: &NodeNet) -> Result<(), String> {
            Ok(())
        }
        async fn setup_eni(&self, _: &EniNet, _: Duration) -> Result<(), String> {
            Ok(())
        }
        async fn teardown_eni(&self, _: &EniNet) -> Result<(), String> {
            Ok(())
        }
        async fn pod_routes(&self) -> Result<Vec<(Ipv4Addr, String)>, String> {
            self.0
                .lock()
                .unwrap()
                .clone()
                .ok_or_else(|| "netlink: busy".into())
        }
    }

    #[tokio::test]
    async fn enis_are_held_on_a_cordoned_node_unless_the_knob_says_manage() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::config::from_env(|_| None).unwrap();
        cfg.backing_store = dir.path().join("ipam.json").display().to_string();
        let timing = Timing {
            schedule_wait: Duration::from_millis(200),
            ..Timing::default()
        };
        let start = |cfg: Config| {
            let timing = timing.clone();
            async move {
                let host = LiveHost::with(vec![]);
                Node::start(cfg, Arc::new(NoEc2), Arc::new(FakeImds), host, timing)
                    .await
                    .unwrap()
            }
        };
        let node = start(cfg.clone()).await;
        // Not watched (no API): never held.
        assert_eq!(node.schedule().0, Schedule::NotWatched);
        assert_eq!(node.eni_hold(), None);
        // Watched, no answer yet: held for the wait, then managed as schedulable.
        node.set_schedule(Schedule::Pending);
        assert!(node.eni_hold().is_some());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(node.eni_hold(), None);
        node.set_schedule(Schedule::Unschedulable);
        assert_eq!(node.eni_hold(), Some("node is cordoned"));
        node.set_schedule(Schedule::Schedulable);
        assert_eq!(node.eni_hold(), None);
        // A node the API does not know is managed (as upstream when its GET fails).
        node.set_schedule(Schedule::NotFound);
        assert_eq!(node.eni_hold(), None);
        // AWS_MANAGE_ENIS_NON_SCHEDULABLE=true: a cordon changes nothing.
        drop(node);
        cfg.manage_enis_non_schedulable = true;
        let node = start(cfg).await;
        node.set_schedule(Schedule::Unschedulable);
        assert_eq!(node.eni_hold(), None);
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

    #[tokio::test]
    async fn corrupt_checkpoint_is_rebuilt_from_host_routes() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("ipam.json");
        std::fs::write(&store, b"not json").unwrap();
        let mut cfg = crate::config::from_env(|_| None).unwrap();
        cfg.backing_store = store.display().to_string();
        cfg.ip_cooldown = Duration::ZERO;
        cfg.add_wait = Duration::from_millis(100);
        // The plugin named default/nginx's veth enic440f455693 and routed 10.0.0.6 to it.
        let host = LiveHost::with(vec![("10.0.0.6".parse().unwrap(), "enic440f455693".into())]);
        let node = Node::start(
            cfg,
            Arc::new(NoEc2),
            Arc::new(FakeImds),
            host,
            Timing::default(),
        )
        .await
        .unwrap();
        let held = node.assignments();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].ip.to_string(), "10.0.0.6");
        assert_eq!(held[0].key.container_id, "recovered:enic440f455693");
        // New pods never get the recovered address.
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
        // The pod's DEL (its real container ID is unknown) finds it by namespace/name.
        let pod = PodRef {
            namespace: "default".into(),
            name: "nginx".into(),
        };
        let key = SandboxKey {
            network: "aws-cni".into(),
            container_id: "the-real-sandbox-id".into(),
            if_name: "eth0".into(),
        };
        let released = node.del(key, &pod).await.unwrap().expect("released");
        assert_eq!(released.ip.to_string(), "10.0.0.6");
        // The bad file was kept aside for a person to read.
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
        assert!(aside);
    }

    #[test]
    fn subnet_discovery_picks_the_most_free_tagged_subnet_in_the_az() {
        let sub = |id: &str, az: &str, free: u32| SubnetInfo {
            id: id.into(),
            cidr: parse_cidr("10.0.0.0/24").unwrap(),
            availability_zone: az.into(),
            available_addresses: free,
        };
        let primary = sub("subnet-p", "us-west-2a", 0);
        let tagged = [
            sub("subnet-a", "us-west-2a", 100),
            sub("subnet-b", "us-west-2a", 4000),
            sub("subnet-c", "us-west-2b", 9000),
        ];
        assert_eq!(
            pick_subnet(&tagged, "us-west-2a", primary.clone()).id,
            "subnet-b"
        );
        assert_eq!(
            pick_subnet(&[], "us-west-2a", primary.clone()).id,
            "subnet-p"
        );
        assert_eq!(
            pick_subnet(
                &[sub("subnet-c", "us-west-2b", 9000)],
                "us-west-2a",
                primary.clone()
            )
            .id,
            "subnet-p"
        );
        assert_eq!(
            pick_subnet(&[sub("subnet-a", "us-west-2a", 0)], "us-west-2a", primary).id,
            "subnet-p",
            "a full subnet is no choice"
        );
    }

    #[test]
    fn rfc3339_round_trip() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        let s = rfc3339(t);
        assert_eq!(s, "2026-11-18T11:06:40Z");
        assert_eq!(super::parse_rfc3339(&s), Some(t));
        assert_eq!(
            super::parse_rfc3339("2024-02-29T00:00:00.123Z").map(|_| ()),
            Some(())
        );
        assert!(super::parse_rfc3339("yesterday").is_none());
    }
}
