//! The node's schedulability, as the Kubernetes API reports it (`kube.rs` watches the
//! Node object), and what it means for ENIs: AWS_MANAGE_ENIS_NON_SCHEDULABLE=false holds
//! them on a cordoned node, as upstream.

use tokio::time::Instant;

use tracing::{info, warn};

use super::Node;

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

impl Node {
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::Config;
    use crate::node::Timing;
    use crate::node::fakes::{FakeImds, LiveHost, NoEc2};

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
}
