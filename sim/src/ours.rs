//! Our node: ipamd's real engine, as the daemon wires it (the EC2 client behind the
//! budget, IMDS first, the pool loop), on the model's EC2 and IMDS and a host whose
//! network set-up always succeeds.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ipamd_core::budget::{BudgetConfig, Budgeted};
use ipamd_core::datastore::{PodRef, SandboxKey};
use ipamd_core::hostnet::{EniNet, HostNetwork, NodeNet};
use ipamd_core::node::{AddOutcome, Node, timing_from_env};

use crate::PodApi;
use crate::model::NodeCloud;
use crate::scenario::Scenario;

/// The host: links appear at once, pods have no routes (the sim turns the reclaim of
/// route-less assignments off, as ipamd's gRPC-only tests do).
struct Host;

#[async_trait]
impl HostNetwork for Host {
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
        Ok(vec![])
    }
}

pub struct Ours {
    pub node: Arc<Node>,
}

fn key(k: &str) -> (SandboxKey, PodRef) {
    (
        SandboxKey {
            network: "aws-cni".into(),
            container_id: k.into(),
            if_name: "eth0".into(),
        },
        PodRef {
            namespace: "default".into(),
            name: k.into(),
        },
    )
}

#[async_trait]
impl PodApi for Ours {
    async fn add(&self, k: &str) -> bool {
        let (key, pod) = key(k);
        matches!(self.node.add(key, pod).await, Ok(AddOutcome::Assigned(_)))
    }
    async fn del(&self, k: &str) {
        let (key, pod) = key(k);
        let _ = self.node.del(key, &pod).await;
    }
}

/// The environment of one node's ipamd (the scenario's, and what the sim needs).
pub fn env(sc: &Scenario, dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut env = sc.env();
    env.insert(
        "AWS_VPC_K8S_CNI_BACKING_STORE".into(),
        dir.join("ipam.json").display().to_string(),
    );
    env.entry("IPAMD_RECLAIM_AFTER_MS".into())
        .or_insert_with(|| "0".into());
    env.entry("IPAMD_CHECKPOINT_FSYNC".into())
        .or_insert_with(|| "false".into());
    env
}

pub async fn start(sc: &Scenario, cloud: NodeCloud, dir: &Path) -> Arc<dyn PodApi> {
    let env = env(sc, dir);
    let get = |k: &str| env.get(k).cloned();
    let cfg = ipamd_core::config::from_env(get).expect("the scenario's knobs");
    let timing = timing_from_env(get).expect("the scenario's pacing knobs");
    let ec2 = Arc::new(Budgeted::new(cloud.clone(), BudgetConfig::default()));
    let node = Node::start(cfg, ec2, Arc::new(cloud), Arc::new(Host), timing)
        .await
        .expect("the engine starts");
    tokio::spawn(node.clone().run_pool());
    Arc::new(Ours { node })
}
