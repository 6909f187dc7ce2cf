//! Custom networking (AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG): pods take addresses from the
//! subnet and security groups of the node's ENIConfig, never from the primary ENI.
//!
//! The Kubernetes side (`ipamd::kube`) says which ENIConfig the node names and what it
//! holds; here that becomes the datastore's serving rule and the subnet new ENIs go in:
//! - the primary ENI serves no pod (its pods from before keep their addresses);
//! - with an ENIConfig found, only ENIs in its subnet serve new pods: after a change, ENIs
//!   of the old subnet keep their pods, and are freed once the last one is gone (upstream
//!   keeps them until the node is replaced);
//! - with none found yet (API not answered, no such object, a subnet EC2 does not know or
//!   in another AZ), pods are served from the ENIs there are, no ENI is attached, and
//!   `/v1/pool`, `awscni_eni_config_missing` and the node's event say why.

use std::sync::atomic::Ordering;

use tracing::{info, warn};

use super::Node;
use crate::cloud::SubnetInfo;
use crate::datastore::Serving;

/// What is known of the node's ENIConfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EniConfigState {
    /// Not read from the API yet.
    Pending,
    /// The node names `name`; it cannot be used, and why.
    Missing { name: String, why: String },
    /// The node's ENIConfig as read.
    Found(EniConfig),
}

/// An ENIConfig's name and spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniConfig {
    pub name: String,
    pub subnet: String,
    /// Empty: the primary ENI's.
    pub security_groups: Vec<String>,
}

impl Node {
    /// kubelet's max-pods for this node (`status.capacity.pods`), when the API says it.
    pub fn set_kubelet_max_pods(&self, n: Option<u32>) {
        let n = n.unwrap_or(0);
        if self.kubelet_max_pods.swap(n, Ordering::Relaxed) != n {
            info!("kubelet's capacity for pods on this node: {n} (0: not known)");
            self.wake_pool.notify_one();
        }
    }

    /// The ENIConfig as the API last described it (custom networking only).
    pub fn eni_config(&self) -> EniConfigState {
        self.eni_config.lock().unwrap().clone()
    }

    /// Every ENIConfig the API holds, by name (for `/v1/eni-configs`).
    pub fn eni_configs_known(&self) -> Vec<EniConfig> {
        self.eni_configs_seen.lock().unwrap().clone()
    }

    /// Notes every ENIConfig the API holds (introspection only).
    pub fn set_eni_configs_known(&self, all: Vec<EniConfig>) {
        *self.eni_configs_seen.lock().unwrap() = all;
    }

    /// The node's ENIConfig changed (or was first read): applies to ENIs attached from now;
    /// ENIs of another subnet drain.
    pub fn set_eni_config(&self, state: EniConfigState) {
        if !self.cfg.custom_network_cfg {
            return;
        }
        {
            let mut cur = self.eni_config.lock().unwrap();
            if *cur == state {
                return;
            }
            match &state {
                EniConfigState::Found(c) => info!(
                    "ENIConfig {}: subnet {}, security groups {:?}",
                    c.name, c.subnet, c.security_groups
                ),
                EniConfigState::Missing { name, why } => {
                    warn!("ENIConfig {name:?} cannot be used: {why}")
                }
                EniConfigState::Pending => {}
            }
            *cur = state;
        }
        // A new config is looked at afresh.
        self.pool.lock().unwrap().subnet_problem = None;
        self.apply_serving();
        self.wake_pool.notify_one();
        self.eni_config_changed.notify_one();
    }

    /// Returns once the ENIConfig in use or what is wrong with it may have changed since the
    /// last call (one waiter: the Kubernetes side that writes the CNINode and the event).
    pub async fn eni_config_changes(&self) {
        self.eni_config_changed.notified().await
    }

    /// The datastore's serving rule from the knobs and the ENIConfig.
    pub(super) fn serving_rule(&self) -> Serving {
        if !self.cfg.custom_network_cfg {
            return Serving::default();
        }
        // A config that cannot be used closes nothing: pods go on being served from
        // the ENIs there are.
        let subnet = match &*self.eni_config.lock().unwrap() {
            EniConfigState::Found(c) => {
                let bad = self
                    .pool
                    .lock()
                    .unwrap()
                    .subnet_problem
                    .as_ref()
                    .map(|(id, _)| id.clone());
                (bad.as_ref() != Some(&c.subnet)).then(|| c.subnet.clone())
            }
            _ => None,
        };
        Serving {
            skip_primary: true,
            only_subnet: subnet,
        }
    }

    pub(super) fn apply_serving(&self) {
        let rule = self.serving_rule();
        self.store.lock().unwrap().set_serving(rule);
    }

    /// Why no ENI may be attached now (custom networking without a usable ENIConfig).
    pub fn eni_config_problem(&self) -> Option<String> {
        if !self.cfg.custom_network_cfg {
            return None;
        }
        match &*self.eni_config.lock().unwrap() {
            EniConfigState::Pending => {
                Some("custom networking: the node's ENIConfig has not been read yet".into())
            }
            EniConfigState::Missing { name, why } => {
                Some(format!("custom networking: ENIConfig {name:?}: {why}"))
            }
            EniConfigState::Found(c) => {
                self.pool
                    .lock()
                    .unwrap()
                    .subnet_problem
                    .as_ref()
                    .and_then(|(id, why)| {
                        (*id == c.subnet)
                            .then(|| format!("custom networking: ENIConfig {:?}: {why}", c.name))
                    })
            }
        }
    }

    /// The ENIConfig's subnet, once EC2 has described it and it is in this node's AZ.
    fn usable_subnet(&self, id: &str) -> Option<SubnetInfo> {
        self.pool.lock().unwrap().custom_subnets.get(id).cloned()
    }

    /// The subnet and security groups a new ENI takes in custom networking: the ENIConfig's
    /// (its subnet described once; the primary ENI's groups when it names none). An error
    /// says why none can be attached.
    pub(super) async fn custom_target(&self) -> Result<(SubnetInfo, Vec<String>), String> {
        let cfg = match self.eni_config() {
            EniConfigState::Found(c) => c,
            _ => return Err(self.eni_config_problem().unwrap_or_default()),
        };
        let id = self.known().map_err(|e| e.to_string())?;
        let sgs = if cfg.security_groups.is_empty() {
            self.primary_sgs()
        } else {
            cfg.security_groups.clone()
        };
        if let Some(s) = self.usable_subnet(&cfg.subnet) {
            return Ok((s, sgs));
        }
        if let Some(why) = self.eni_config_problem() {
            return Err(why);
        }
        let described = self.ec2.describe_subnet(&cfg.subnet).await;
        let why = match described {
            Ok(s) if s.availability_zone != id.meta.availability_zone => format!(
                "subnet {} is in {}, this node in {}",
                s.id, s.availability_zone, id.meta.availability_zone
            ),
            Ok(s) => {
                self.pool
                    .lock()
                    .unwrap()
                    .custom_subnets
                    .insert(s.id.clone(), s.clone());
                return Ok((s, sgs));
            }
            Err(e) if e.code == "InvalidSubnetID.NotFound" || e.code == "NotFound" => {
                format!("subnet {} does not exist ({e})", cfg.subnet)
            }
            // Transient (throttled, EC2 away): asked again on the next attempt.
            Err(e) => return Err(format!("describing subnet {}: {e}", cfg.subnet)),
        };
        warn!("ENIConfig {:?} cannot be used: {why}", cfg.name);
        self.metrics.error("eniConfigInvalid");
        self.pool.lock().unwrap().subnet_problem = Some((cfg.subnet.clone(), why.clone()));
        self.apply_serving();
        self.eni_config_changed.notify_one();
        Err(format!(
            "custom networking: ENIConfig {:?}: {why}",
            cfg.name
        ))
    }
}
