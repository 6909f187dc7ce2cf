//! What happens when a pod asks: AddNetwork (with its bounded wait for the pool to
//! refill), DelNetwork, CNI GC, and whether ipamd can serve at all (gRPC health).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use super::{Node, RECOVERED_PREFIX, now_ns};
use crate::datastore::{Assignment, PodRef, SandboxKey};
use vpc_cni_proto::pod_veth_name;

pub enum AddOutcome {
    Assigned(Assignment),
    /// No address within the bounded wait.
    NoAddress,
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

impl Node {
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
                        let wake = self.pool_has_work(&mut s);
                        // A repeated ADD is recorded again on purpose: the first one's line
                        // may still be queued, and ours, behind it, answers only once both
                        // are written.
                        Some((self.journal.record_add(&a), a, new, wake))
                    }
                    Err(_) => None,
                }
            };
            if let Some((pending, a, new, wake)) = got {
                if let Err(e) = self.checkpointed(pending.durable().await) {
                    if new {
                        self.store.lock().unwrap().release(&key, now_ns());
                    }
                    return Err(e);
                }
                self.compact_every_n_ops();
                // Keep the pool ahead of demand.
                if wake {
                    self.wake_pool.notify_one();
                }
                self.note_pod_ip(&pod, Some(a.ip));
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
            // An address leaving cooldown notifies nobody: look again when the next one
            // does (and every 2 s whatever happens), not on a fixed short poll (a node full
            // of waiting pods woke 4 times a second each).
            let cooled = self.store.lock().unwrap().next_cooled_ns().map(|t| {
                Duration::from_nanos(t.saturating_sub(now_ns())) + Duration::from_millis(1)
            });
            let recheck = cooled.map_or(Duration::from_secs(2), |c| c.min(Duration::from_secs(2)));
            let _ = tokio::time::timeout(left.min(recheck), added).await;
        }
    }

    pub async fn del(&self, key: SandboxKey, pod: &PodRef) -> std::io::Result<Option<Assignment>> {
        let (pending, released, wake) = {
            let mut s = self.store.lock().unwrap();
            let now = now_ns();
            let released = s.release(&key, now).or_else(|| {
                // An assignment rebuilt from host routes is keyed by the pod's host veth.
                if pod.name.is_empty() {
                    return None;
                }
                let veth = pod_veth_name(
                    &self.cfg.veth_prefix,
                    &pod.namespace,
                    &pod.name,
                    &key.if_name,
                );
                s.release(
                    &SandboxKey {
                        network: key.network.clone(),
                        container_id: format!("{RECOVERED_PREFIX}{veth}"),
                        if_name: "eth0".into(),
                    },
                    now,
                )
            });
            let wake = self.pool_has_work(&mut s);
            match &released {
                Some(a) => (self.journal.record_del(a, now), released, wake),
                // Nothing held: a concurrent DelNetwork may have released it a moment ago,
                // its line not yet durable. "Released" is answered only once it is: after
                // every line queued before this one.
                None => (self.journal.barrier(), None, false),
            }
        };
        self.checkpointed(pending.durable().await)?;
        let Some(a) = released else {
            return Ok(None);
        };
        self.compact_every_n_ops();
        if wake {
            self.wake_pool.notify_one();
        }
        let owner = if a.pod.name.is_empty() { pod } else { &a.pod };
        self.note_pod_ip(owner, None);
        Ok(Some(a))
    }

    /// Releases every assignment of `network` not in `valid` (CNI GC).
    pub async fn garbage_collect(
        &self,
        network: &str,
        valid: &BTreeSet<(String, String)>,
    ) -> std::io::Result<Vec<Assignment>> {
        let pending = self.release_where(|a| {
            a.key.network == network
                && !valid.contains(&(a.key.container_id.clone(), a.key.if_name.clone()))
        });
        let mut out = Vec::new();
        for (p, a) in pending {
            self.checkpointed(p.durable().await)?;
            out.push(a);
        }
        self.wake_pool.notify_one();
        Ok(out)
    }

    /// Whether ipamd can serve its API (gRPC health): `Err` says why not. Only while the
    /// instance is not known yet (IMDS has not answered) or the checkpoint cannot be
    /// written. A node with no free address is healthy: that is a full node, its normal
    /// state at max pods (`/v1/pool`, `awscni_pool_exhausted` and AddNetwork's answer say so).
    pub fn health(&self) -> Result<(), String> {
        if self.identity().is_none() {
            return Err("waiting for the instance metadata (IMDS) to describe the node".into());
        }
        if let Some(f) = self.checkpoint_fault() {
            return Err(format!(
                "checkpoint {} cannot be written: {f}",
                self.checkpoint_path.display()
            ));
        }
        Ok(())
    }
}
