//! An IPv6 node (ENABLE_IPv6 with prefix delegation), as upstream runs one: every pod
//! gets a /128 from the /80 prefix delegated to the primary ENI. There is no warm pool
//! and no other ENI: the prefix is obtained once and never given back while ipamd runs
//! (a /80 outlasts any number of pods the node can hold).
//!
//! Start-up mirrors the IPv4 node's: `restore` reads the checkpoint (its `ipv6` entries)
//! before anything answers, so DelNetwork and health are served at once; `learn_instance`
//! reads IMDS; `ensure_prefix` finds the ENI's prefix (IMDS, then one describe in case
//! IMDS lags a prefix an earlier run obtained) and asks EC2 for one only when the ENI has
//! none. A restart therefore makes no EC2 call.

use std::collections::BTreeSet;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::checkpoint::{self, Journal, LoadError};
use crate::cloud::{CloudError, Ec2, EniInfo, Imds, InstanceMeta};
use crate::config::Config;
use crate::datastore::{PodRef, SandboxKey};
use crate::metrics::Metrics;
use crate::net::Ipv6Net;
use crate::node::{StartError, Timing, now_ns};
use crate::prefix6::{Assignment6, Prefix6Store};

/// The instance and its primary ENI's IPv6 side, as IMDS describes them.
#[derive(Debug, Clone)]
pub struct Identity6 {
    pub meta: InstanceMeta,
    pub primary_eni: String,
    /// The node's own IPv6 address (the primary ENI's first), if it has one.
    pub primary_ipv6: Option<Ipv6Addr>,
    pub subnet_cidr: Option<Ipv6Net>,
    pub vpc_cidrs: Vec<Ipv6Net>,
}

pub enum AddOutcome6 {
    Assigned(Assignment6),
    /// No address within the bounded wait: no prefix yet (EC2 has not given one).
    NoAddress,
}

/// A copy of the store for introspection and metrics.
#[derive(Debug, Clone)]
pub struct View6 {
    pub eni: String,
    pub prefixes: Vec<Ipv6Net>,
    pub assignments: Vec<Assignment6>,
    pub cooling: usize,
    pub capacity: u64,
    /// Why there is no prefix yet, if there is none.
    pub prefix_fault: Option<String>,
}

pub struct Node6 {
    pub cfg: Config,
    pub timing: Timing,
    pub metrics: Metrics,
    imds: Arc<dyn Imds>,
    ec2: Arc<dyn Ec2>,
    identity: OnceLock<Identity6>,
    store: Mutex<Prefix6Store>,
    journal: Journal,
    ops_since_compact: AtomicU64,
    checkpoint_fault: Mutex<Option<String>>,
    checkpoint_path: PathBuf,
    /// Notified once the ENI's prefix is known.
    prefix_ready: Notify,
    prefix_fault: Mutex<Option<String>>,
}

impl Node6 {
    /// Builds the node and learns the instance from IMDS once (tests; the daemon retries
    /// `learn_instance` itself).
    pub async fn start(
        cfg: Config,
        ec2: Arc<dyn Ec2>,
        imds: Arc<dyn Imds>,
        timing: Timing,
    ) -> Result<Arc<Node6>, StartError> {
        let node = Node6::restore(cfg, ec2, imds, timing).await?;
        node.learn_instance().await.map_err(StartError::Imds)?;
        Ok(node)
    }

    /// Restores every assignment from the checkpoint (an unusable one is set aside and
    /// named) and writes one fresh snapshot: no IMDS, no EC2.
    pub async fn restore(
        cfg: Config,
        ec2: Arc<dyn Ec2>,
        imds: Arc<dyn Imds>,
        timing: Timing,
    ) -> Result<Arc<Node6>, StartError> {
        let mut store = Prefix6Store::new(cfg.ip_cooldown);
        let path = PathBuf::from(&cfg.backing_store);
        match checkpoint::load_family::<Ipv6Addr>(&path) {
            Ok(l) => {
                info!(
                    assignments = l.assignments.len(),
                    journal_ops = l.journal_ops,
                    "restored IPv6 checkpoint {}",
                    path.display()
                );
                if l.snapshot_missing {
                    warn!(
                        "{} is missing but its journal is there: only the pods the journal names are restored",
                        path.display()
                    );
                }
                for a in l.assignments {
                    // (A loaded checkpoint holds each key and address once.)
                    let _ = store.restore(a);
                }
                for (ip, t) in l.cooldowns {
                    store.restore_cooldown(ip, t);
                }
            }
            Err(LoadError::Missing(_)) => {
                info!("no checkpoint at {}: no pods to restore", path.display())
            }
            Err(e @ LoadError::Corrupt { .. }) => {
                let aside = checkpoint::set_aside(&path).map_err(|io| {
                    StartError::Checkpoint(format!("{e}; and setting it aside failed: {io}"))
                })?;
                error!(
                    "{e}; moved it to {} and starting without its pods",
                    aside.display()
                );
            }
            Err(e @ LoadError::Io { .. }) => return Err(StartError::Checkpoint(e.to_string())),
        }
        let journal = Journal::start(&path, timing.checkpoint_fsync)
            .map_err(|e| StartError::Checkpoint(format!("{}: {e}", path.display())))?;
        journal
            .compact(store.assignments(), store.cooldowns())
            .durable()
            .await
            .map_err(|e| StartError::Checkpoint(format!("{}: {e}", path.display())))?;
        Ok(Arc::new(Node6 {
            cfg,
            timing,
            metrics: Metrics::default(),
            imds,
            ec2,
            identity: OnceLock::new(),
            store: Mutex::new(store),
            journal,
            ops_since_compact: AtomicU64::new(0),
            checkpoint_fault: Mutex::new(None),
            checkpoint_path: path,
            prefix_ready: Notify::new(),
            prefix_fault: Mutex::new(Some("the instance metadata has not been read".into())),
        }))
    }

    /// Reads the instance and its primary ENI from IMDS; a prefix IMDS already shows is
    /// served from at once.
    pub async fn learn_instance(&self) -> Result<(), CloudError> {
        if self.identity.get().is_some() {
            return Ok(());
        }
        let meta = self.imds.instance().await?;
        let enis = self.imds.enis().await?;
        let primary = primary_of(&meta, &enis)?;
        let id = Identity6 {
            primary_eni: primary.id.clone(),
            primary_ipv6: primary.ipv6.addresses.first().copied(),
            subnet_cidr: primary.ipv6.subnet_cidr,
            vpc_cidrs: primary.ipv6.vpc_cidrs.clone(),
            meta,
        };
        if id.subnet_cidr.is_none() {
            warn!(
                eni = %id.primary_eni,
                "the primary ENI's subnet has no IPv6 block in IMDS: EC2 will refuse it a prefix"
            );
        }
        let prefixes = primary.ipv6.prefixes.clone();
        let _ = self.identity.set(id);
        if !prefixes.is_empty() {
            self.use_prefixes(prefixes, "IMDS");
        }
        Ok(())
    }

    pub fn identity(&self) -> Option<&Identity6> {
        self.identity.get()
    }

    fn use_prefixes(&self, prefixes: Vec<Ipv6Net>, from: &str) {
        let eni = self
            .identity()
            .map(|i| i.primary_eni.clone())
            .unwrap_or_default();
        let mut s = self.store.lock().unwrap();
        let strays = s
            .assignments()
            .into_iter()
            .filter(|a| !prefixes.iter().any(|p| p.contains(a.ip)))
            .count();
        info!(%eni, prefixes = ?prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "serving IPv6 pods from the prefix ({from})");
        s.set_prefixes(&eni, prefixes);
        drop(s);
        if strays > 0 {
            warn!(
                "{strays} restored pods hold addresses outside the ENI's prefixes: kept until they are deleted"
            );
        }
        *self.prefix_fault.lock().unwrap() = None;
        self.prefix_ready.notify_waiters();
    }

    pub fn has_prefix(&self) -> bool {
        !self.store.lock().unwrap().prefixes().is_empty()
    }

    /// Makes sure the primary ENI has a /80: IMDS's (read in `learn_instance`), else one
    /// EC2 already gave it (a describe, for IMDS lagging an earlier run's prefix), else a
    /// new one from AssignIpv6Addresses. Retries until it has one; returns then.
    pub async fn ensure_prefix(&self) {
        let mut delay = Duration::from_secs(1);
        while !self.has_prefix() {
            match self.obtain_prefix().await {
                Ok(()) => return,
                Err(e) => {
                    self.metrics.error("assignIPv6PrefixFailed");
                    let pause = if e.is_subnet_full() {
                        self.timing.subnet_full_backoff
                    } else {
                        delay
                    };
                    warn!("no IPv6 prefix for the primary ENI yet, retrying in {pause:?}: {e}");
                    *self.prefix_fault.lock().unwrap() = Some(e.to_string());
                    tokio::time::sleep(pause).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn obtain_prefix(&self) -> Result<(), CloudError> {
        let id = self.identity().cloned().ok_or_else(|| {
            CloudError::new(
                "ipamd",
                "InstanceNotKnown",
                "the instance metadata (IMDS) has not described the node yet",
            )
        })?;
        let enis = self.ec2.instance_enis(&id.meta.instance_id).await?;
        if let Some(e) = enis.iter().find(|e| e.id == id.primary_eni)
            && !e.ipv6.prefixes.is_empty()
        {
            self.use_prefixes(e.ipv6.prefixes.clone(), "EC2, not yet in IMDS");
            return Ok(());
        }
        let got = self.ec2.assign_ipv6_prefixes(&id.primary_eni, 1).await?;
        if got.is_empty() {
            return Err(CloudError::new(
                "AssignIpv6Addresses",
                "NoPrefix",
                "EC2 answered without a prefix",
            ));
        }
        self.use_prefixes(got, "AssignIpv6Addresses");
        Ok(())
    }

    /// AddNetwork: the sandbox's address (the same one again for a retried ADD), made
    /// durable before it is answered. Waits up to ADD_WAIT for the prefix at start-up.
    pub async fn add(&self, key: SandboxKey, pod: PodRef) -> std::io::Result<AddOutcome6> {
        let deadline = Instant::now() + self.cfg.add_wait;
        loop {
            let ready = self.prefix_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let got = {
                let mut s = self.store.lock().unwrap();
                let held = s.get(&key).is_some();
                s.assign(key.clone(), pod.clone(), now_ns())
                    .map(|a| (self.journal.record_add(&a), a, !held))
            };
            if let Some((pending, a, new)) = got {
                if let Err(e) = self.checkpointed(pending.durable().await) {
                    if new {
                        self.store.lock().unwrap().release(&key, now_ns());
                    }
                    return Err(e);
                }
                self.compact_every_n_ops();
                return Ok(AddOutcome6::Assigned(a));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(AddOutcome6::NoAddress);
            }
            // A full prefix (every address held or cooling) frees up as addresses cool.
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), ready).await;
        }
    }

    /// DelNetwork: releases the sandbox's address; answered once that is durable (also
    /// when nothing was held: after every change recorded before).
    pub async fn del(&self, key: SandboxKey) -> std::io::Result<Option<Assignment6>> {
        let (pending, released) = {
            let mut s = self.store.lock().unwrap();
            let now = now_ns();
            match s.release(&key, now) {
                Some(a) => (self.journal.record_del(&a, now), Some(a)),
                None => (self.journal.barrier(), None),
            }
        };
        self.checkpointed(pending.durable().await)?;
        if released.is_some() {
            self.compact_every_n_ops();
        }
        Ok(released)
    }

    /// Releases every assignment of `network` not in `valid` (CNI GC).
    pub async fn garbage_collect(
        &self,
        network: &str,
        valid: &BTreeSet<(String, String)>,
    ) -> std::io::Result<Vec<Assignment6>> {
        let pending: Vec<_> = {
            let mut s = self.store.lock().unwrap();
            let now = now_ns();
            let stale: Vec<SandboxKey> = s
                .assignments()
                .into_iter()
                .filter(|a| {
                    a.key.network == network
                        && !valid.contains(&(a.key.container_id.clone(), a.key.if_name.clone()))
                })
                .map(|a| a.key)
                .collect();
            stale
                .iter()
                .filter_map(|k| s.release(k, now))
                .map(|a| (self.journal.record_del(&a, now), a))
                .collect()
        };
        let mut out = Vec::new();
        for (p, a) in pending {
            self.checkpointed(p.durable().await)?;
            out.push(a);
        }
        Ok(out)
    }

    /// gRPC health, as the IPv4 node's: NOT_SERVING only before IMDS has answered or
    /// while the checkpoint cannot be written.
    pub fn health(&self) -> Result<(), String> {
        if self.identity().is_none() {
            return Err("waiting for the instance metadata (IMDS) to describe the node".into());
        }
        if let Some(f) = self.checkpoint_fault.lock().unwrap().clone() {
            return Err(format!(
                "checkpoint {} cannot be written: {f}",
                self.checkpoint_path.display()
            ));
        }
        Ok(())
    }

    pub fn vpc_cidrs(&self) -> Vec<Ipv6Net> {
        self.identity()
            .map(|i| i.vpc_cidrs.clone())
            .unwrap_or_default()
    }

    pub fn assignments(&self) -> Vec<Assignment6> {
        self.store.lock().unwrap().assignments()
    }

    pub fn view(&self) -> View6 {
        let s = self.store.lock().unwrap();
        View6 {
            eni: s.eni().to_string(),
            prefixes: s.prefixes().to_vec(),
            assignments: s.assignments(),
            cooling: s.cooling(),
            capacity: s.capacity(),
            prefix_fault: self.prefix_fault.lock().unwrap().clone(),
        }
    }

    pub fn checkpoint_path(&self) -> &std::path::Path {
        &self.checkpoint_path
    }

    fn compact_every_n_ops(&self) {
        if self.ops_since_compact.fetch_add(1, Ordering::Relaxed) + 1
            >= self.timing.compact_every_ops
        {
            self.ops_since_compact.store(0, Ordering::Relaxed);
            let s = self.store.lock().unwrap();
            drop(self.journal.compact(s.assignments(), s.cooldowns()));
        }
    }

    /// Writes a snapshot of the current state (on shutdown).
    pub async fn compact(&self) -> std::io::Result<()> {
        let p = {
            let s = self.store.lock().unwrap();
            self.journal.compact(s.assignments(), s.cooldowns())
        };
        self.checkpointed(p.durable().await)
    }

    fn checkpointed(&self, r: std::io::Result<()>) -> std::io::Result<()> {
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
}

fn primary_of<'a>(meta: &InstanceMeta, enis: &'a [EniInfo]) -> Result<&'a EniInfo, CloudError> {
    enis.iter()
        .find(|e| e.mac == meta.primary_mac)
        .or_else(|| enis.iter().find(|e| e.device_number == 0))
        .ok_or_else(|| {
            CloudError::new(
                "IMDS",
                "BadValue",
                format!("no ENI with the primary MAC {}", meta.primary_mac),
            )
        })
}
