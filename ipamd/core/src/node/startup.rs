//! How ipamd starts: the instance from IMDS, the assignments from the checkpoint (or,
//! when it is unusable, from the host's pod routes), one fresh snapshot; no EC2 call, so
//! pods are served before EC2 answers.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::{Node, Schedule, Timing, now_ns, store_eni};
use crate::checkpoint::{self, Journal, LoadError};
use crate::cloud::{CloudError, Ec2, EniInfo, Imds};
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
            pool: Mutex::new(Default::default()),
            reconciler: Mutex::new(Default::default()),
            timing,
            checkpoint_path: path,
            metrics: Metrics::default(),
        }))
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
