//! How ipamd starts. `restore` needs neither IMDS nor EC2: the assignments come from the
//! checkpoint (an unusable one is set aside, never crash-looped on) joined with every pod
//! route on the host, so no address a live pod holds is ever handed out again, whatever
//! happened to the file. `learn_instance` then reads the instance and its ENIs from IMDS
//! (the daemon retries it while IMDS is slow, serving DEL and health meanwhile); pods are
//! served from there on, before EC2 answers anything.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use tokio::time::Instant;

use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::{Node, Schedule, Timing, now_ns, store_eni};
use crate::checkpoint::{self, Journal, LoadError};
use crate::cloud::{CloudError, Ec2, Imds, InstanceMeta};
use crate::config::Config;
use crate::datastore::{Assignment, Datastore, PodRef, SandboxKey};
use crate::hostnet::HostNetwork;
use crate::metrics::Metrics;
use crate::net::Ipv4Net;

/// Assignments rebuilt from host routes are keyed by the host veth's name.
pub const RECOVERED_PREFIX: &str = "recovered:";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("instance metadata: {0}")]
    Imds(CloudError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

/// The instance as IMDS describes it, and what of its primary ENI new ENIs copy.
#[derive(Debug, Clone)]
pub struct Identity {
    pub meta: InstanceMeta,
    pub primary_subnet: String,
    pub primary_subnet_cidr: Ipv4Net,
    pub vpc_id: String,
    pub primary_sgs: Vec<String>,
}

impl Node {
    /// Builds the node and learns the instance from IMDS once (tests, benchmarks; the
    /// daemon retries `learn_instance` itself).
    pub async fn start(
        cfg: Config,
        ec2: Arc<dyn Ec2>,
        imds: Arc<dyn Imds>,
        host: Arc<dyn HostNetwork>,
        timing: Timing,
    ) -> Result<Arc<Node>, StartError> {
        let node = Node::restore(cfg, ec2, imds, host, timing).await?;
        node.learn_instance().await.map_err(StartError::Imds)?;
        Ok(node)
    }

    /// Restores every assignment from the checkpoint and the host, and writes one fresh
    /// snapshot of them: no IMDS, no EC2. Until `learn_instance` succeeds the node
    /// releases (DelNetwork) but assigns nothing, and its health says why.
    pub async fn restore(
        cfg: Config,
        ec2: Arc<dyn Ec2>,
        imds: Arc<dyn Imds>,
        host: Arc<dyn HostNetwork>,
        timing: Timing,
    ) -> Result<Arc<Node>, StartError> {
        let mut store = Datastore::new(cfg.ip_cooldown);
        let path = PathBuf::from(&cfg.backing_store);
        // A checkpoint on disk: an ipamd ran here before, and may have left an ENI
        // unattached (a crash between create and attach, or detach and delete).
        let mut ran_before = true;
        match checkpoint::load(&path) {
            Ok(l) => {
                info!(
                    assignments = l.assignments.len(),
                    cooldowns = l.cooldowns.len(),
                    journal_ops = l.journal_ops,
                    "restored checkpoint {}",
                    path.display()
                );
                if l.snapshot_missing {
                    warn!(
                        "{} is missing but its journal is there: the journal holds only what changed since the last snapshot; the pods from before it are taken from the host's pod routes",
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
                ran_before = false;
                info!(
                    "no checkpoint at {}: the assignments are taken from the host's pod routes",
                    path.display()
                )
            }
            Err(e @ LoadError::Corrupt { .. }) => {
                let aside = checkpoint::set_aside(&path).map_err(|io| {
                    StartError::Checkpoint(format!("{e}; and setting it aside failed: {io}"))
                })?;
                error!(
                    "{e}; moved it to {} and rebuilding the assignments from the host's pod routes",
                    aside.display()
                );
            }
            Err(e @ LoadError::Io { .. }) => return Err(StartError::Checkpoint(e.to_string())),
        }
        // Whatever the file said, a pod route through one of our veths is a live pod's
        // address (a lost file, a journal without its snapshot, a stale copy).
        match host.pod_routes().await {
            Ok(routes) => {
                let mut kept = BTreeSet::new();
                for (ip, veth) in routes {
                    if store.holds_for_a_pod(ip) || !kept.insert(ip) {
                        continue;
                    }
                    let _ = store.restore(recovered(ip, &veth));
                }
                if !kept.is_empty() {
                    warn!(
                        "{} addresses have a pod route on this host but no assignment in the checkpoint: kept for those pods ({:?})",
                        kept.len(),
                        kept
                    );
                }
            }
            Err(e) => error!(
                "reading the host's pod routes: {e}; assignments are only what the checkpoint holds"
            ),
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
        let node = Arc::new(Node {
            vpc_cidrs: RwLock::new(vec![]),
            identity: OnceLock::new(),
            imds,
            host,
            cfg,
            store: Mutex::new(store),
            journal,
            checkpoint_fault: Mutex::new(None),
            ec2,
            limits: RwLock::new(None),
            wake_pool: Notify::new(),
            addresses_added: Notify::new(),
            attaching: AtomicBool::new(false),
            waiting: AtomicU32::new(0),
            schedule: Mutex::new((Schedule::NotWatched, Instant::now())),
            eni_config: Mutex::new(super::EniConfigState::Pending),
            eni_configs_seen: Mutex::new(vec![]),
            eni_config_changed: Notify::new(),
            kubelet_max_pods: AtomicU32::new(0),
            pod_ip_sink: Mutex::new(None),
            primary_sgs: RwLock::new(vec![]),
            sgs_given: Mutex::new(Default::default()),
            ops_since_compact: AtomicU64::new(0),
            pool: Mutex::new(Default::default()),
            reconciler: Mutex::new(Default::default()),
            timing,
            checkpoint_path: path,
            metrics: Metrics::default(),
        });
        if ran_before {
            node.note_possible_leak();
        }
        node.apply_serving();
        Ok(node)
    }

    /// Reads the instance and its ENIs from IMDS (no EC2) and makes their addresses
    /// available; restored assignments are placed on their ENIs. Once only.
    pub async fn learn_instance(&self) -> Result<(), CloudError> {
        if self.identity().is_some() {
            return Ok(());
        }
        let meta = self.imds.instance().await?;
        let enis = self.imds.enis().await?;
        let primary = enis
            .iter()
            .find(|e| e.mac == meta.primary_mac)
            .or_else(|| enis.iter().find(|e| e.device_number == 0));
        let identity = Identity {
            primary_subnet: primary.map(|p| p.subnet_id.clone()).unwrap_or_default(),
            primary_subnet_cidr: primary.map(|p| p.subnet_cidr).unwrap_or(Ipv4Net {
                addr: Ipv4Addr::UNSPECIFIED,
                len: 0,
            }),
            vpc_id: primary.map(|p| p.vpc_id.clone()).unwrap_or_default(),
            primary_sgs: primary
                .map(|p| p.security_groups.clone())
                .unwrap_or_default(),
            meta,
        };
        *self.vpc_cidrs.write().unwrap() = primary.map(|p| p.vpc_cidrs.clone()).unwrap_or_default();
        *self.primary_sgs.write().unwrap() = identity.primary_sgs.clone();
        let primary_id = primary.map(|p| p.id.clone());
        let mut refused = Vec::new();
        let orphans = {
            let mut s = self.store.lock().unwrap();
            for e in &enis {
                refused.push((
                    e.id.clone(),
                    s.add_eni(store_eni(e, Some(&e.id) == primary_id.as_ref())),
                ));
            }
            s.orphan_count()
        };
        for (id, r) in refused {
            self.note_refused(&id, &r, false);
        }
        if orphans > 0 {
            warn!(
                orphans,
                "restored addresses not on any ENI IMDS lists yet; kept reserved until EC2 confirms"
            );
        }
        info!(
            instance = %identity.meta.instance_id,
            r#type = %identity.meta.instance_type,
            enis = enis.len(),
            "instance metadata read"
        );
        let _ = self.identity.set(identity);
        self.addresses_added.notify_waiters();
        self.wake_pool.notify_one();
        Ok(())
    }
}

impl Node {
    /// Once the instance's limits are known: restored assignments on no ENI beyond what
    /// the instance could ever hold for pods are not this node's (a checkpoint from
    /// elsewhere, a bad file). The newest that fit are kept; the rest are written aside
    /// to `<checkpoint>.excess-<time>` (upstream's format) and released.
    pub(super) async fn bound_restored(&self, capacity: u32) {
        let (placed, orphans) = {
            let s = self.store.lock().unwrap();
            let placed = s.assignments().len() - s.orphan_count();
            (placed, s.orphans())
        };
        let room = (capacity as usize).saturating_sub(placed);
        if orphans.len() <= room {
            return;
        }
        let excess: Vec<Assignment> = orphans[..orphans.len() - room].to_vec();
        let stamp = now_ns() / 1_000_000_000;
        let mut aside = self.checkpoint_path.as_os_str().to_owned();
        aside.push(format!(".excess-{stamp}"));
        let aside = PathBuf::from(aside);
        if let Err(e) = checkpoint::write_snapshot(&aside, &excess, &[], false) {
            error!(
                "{} restored assignments are more than this instance can hold ({capacity}) but could not be written aside to {}: kept ({e})",
                excess.len(),
                aside.display()
            );
            return;
        }
        let gone: BTreeSet<SandboxKey> = excess.iter().map(|a| a.key.clone()).collect();
        let pending = self.release_where(|a| gone.contains(&a.key));
        for (p, _) in pending {
            let _ = self.checkpointed(p.durable().await);
        }
        error!(
            "{} restored assignments are on no ENI of this instance and more than it can hold for pods ({capacity}): written to {} and released",
            excess.len(),
            aside.display()
        );
    }
}

/// An assignment for a pod found only by its route on the host: keyed by its host veth,
/// which its DEL names again (by namespace and pod name).
pub(super) fn recovered(ip: Ipv4Addr, veth: &str) -> Assignment {
    Assignment {
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
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::node::AddOutcome;
    use crate::node::fakes::{FakeImds, LiveHost, NoEc2};

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
}
