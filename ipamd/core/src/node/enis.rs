//! ENIs coming and going: create, attach (with DeleteOnTermination) and make ready on the
//! host; free (host side undone, detach, wait, delete); the subnet a new ENI goes in.

use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;

use tracing::{info, warn};

use super::pool_loop::LinkWait;
use super::{Identity, Node, rfc3339, store_eni};
use crate::cloud::{CloudError, NewEni, SubnetInfo};
use crate::pool::{Decision, Limits, Mode, PoolState};

pub const TAG_INSTANCE_ID: &str = "node.k8s.amazonaws.com/instance_id";
pub const TAG_CREATED_AT: &str = "node.k8s.amazonaws.com/createdAt";
pub const TAG_CLUSTER: &str = "cluster.k8s.amazonaws.com/name";

/// How long subnet discovery's answer is used before EC2 is asked again.
const SUBNET_CACHE_TTL: Duration = Duration::from_secs(60);

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

impl Node {
    /// The tags every ENI ipamd manages carries (upstream's): this instance's id, the
    /// cluster's name (CLUSTER_NAME), ADDITIONAL_ENI_TAGS.
    pub(super) fn eni_tags(&self, instance_id: &str) -> Vec<(String, String)> {
        let mut tags = vec![(TAG_INSTANCE_ID.to_string(), instance_id.to_string())];
        if !self.cfg.cluster_name.is_empty() {
            tags.push((TAG_CLUSTER.to_string(), self.cfg.cluster_name.clone()));
        }
        tags.extend(
            self.cfg
                .additional_eni_tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        tags
    }

    /// Gives the ENIs ipamd manages (the primary one included) the tags of
    /// [`Node::eni_tags`] they lack (upstream tags them at start-up). Read from a describe
    /// the reconcile pass makes anyway: no call when nothing lacks, and one CreateTags per
    /// ENI that does, asked once per ENI and tag set in this process (a refusal, e.g. an
    /// IAM policy without CreateTags, is logged once, not repeated each pass).
    pub(super) async fn tag_managed_enis(&self, instance_id: &str, enis: &[crate::cloud::EniInfo]) {
        let want = self.eni_tags(instance_id);
        for e in enis {
            if self.store.lock().unwrap().eni(&e.id).is_none() {
                continue;
            }
            let lacking: Vec<(String, String)> = want
                .iter()
                .filter(|t| !e.tags.contains(t))
                .cloned()
                .collect();
            if lacking.is_empty() {
                continue;
            }
            if !self
                .reconciler
                .lock()
                .unwrap()
                .tags_asked
                .insert((e.id.clone(), lacking.clone()))
            {
                continue;
            }
            match self.ec2.create_tags(&e.id, &lacking).await {
                Ok(()) => info!(
                    "tagged ENI {} with {}",
                    e.id,
                    lacking
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(err) => {
                    self.metrics.error("tagENIFailed");
                    warn!(
                        "tagging ENI {}: {err} (not asked again until ipamd restarts)",
                        e.id
                    );
                }
            }
        }
    }

    pub(super) async fn free_eni(&self, state: PoolState, decision: &Decision) -> bool {
        self.free_eni_of(state, decision, false).await
    }

    /// Custom networking: an ENI of a subnet the node's ENIConfig no longer names, whose
    /// last pod has gone, is freed whatever the warm targets say.
    pub(super) async fn free_drained_eni(&self, state: PoolState) -> bool {
        let any = {
            let s = self.store.lock().unwrap();
            s.enis().any(|e| !e.is_primary && !s.serves(e))
        };
        any && self.free_eni_of(state, &Decision::FreeEni, true).await
    }

    /// Custom networking: the primary ENI's free secondary IPs (from before the knob was
    /// turned on) go back to EC2: the node's subnet is what custom networking spares.
    pub(super) async fn release_idle_primary_ips(&self, state: PoolState) -> bool {
        let picked = {
            let mut s = self.store.lock().unwrap();
            let ips = s.idle_ips_on_closed_primary();
            ips.into_iter()
                .filter(|(e, ip)| s.remove_ips(e, &[*ip]).is_ok())
                .collect::<Vec<_>>()
        };
        let Some(eni) = picked.first().map(|(e, _)| e.clone()) else {
            return false;
        };
        let ips: Vec<_> = picked.iter().map(|(_, ip)| *ip).collect();
        let outcome = match self.ec2.unassign_ips(&eni, &ips).await {
            Ok(()) => {
                info!(
                    "released {} idle addresses of the primary ENI {eni} (custom networking gives it no pods)",
                    ips.len()
                );
                format!("released {} idle IPs of the primary ENI", ips.len())
            }
            Err(e) => {
                self.metrics
                    .error("decreaseIPPoolUnassignIPAddressesFailed");
                warn!("unassigning {ips:?} from {eni} failed, keeping them: {e}");
                let _ = self.store.lock().unwrap().add_ips(&eni, &ips);
                return false;
            }
        };
        self.record_decision(
            state,
            &Decision::Release {
                count: ips.len() as u32,
            },
            outcome,
        );
        true
    }

    async fn free_eni_of(&self, state: PoolState, decision: &Decision, drained: bool) -> bool {
        let eni = {
            let mut s = self.store.lock().unwrap();
            let pick = if drained {
                s.freeable_drained_eni()
            } else {
                s.freeable_eni(self.timing.eni_min_age, Instant::now())
            };
            match pick {
                Some(id) => s.remove_eni(&id).ok(),
                None => None,
            }
        };
        let Some(eni) = eni else {
            if !drained {
                self.record_decision(state, decision, "no ENI old enough and empty");
            }
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
                let why = if drained {
                    " (its subnet is no longer the ENIConfig's, its last pod gone)"
                } else {
                    ""
                };
                info!("freed {} (device {}){why}", eni.id, eni.device_number);
                self.record_decision(state, decision, format!("freed {}{why}", eni.id));
                true
            }
            Err(e) => {
                self.metrics.error("decreaseIPPoolFreeENIFailed");
                warn!("freeing {} failed, keeping it: {e}", eni.id);
                // A failure after the detach leaves it unattached.
                self.note_possible_leak();
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
                .instance_enis(&self.known()?.meta.instance_id)
                .await?
                .into_iter()
                .find(|e| e.id == eni_id)
                .and_then(|e| e.attachment_id),
        };
        let deadline = Instant::now() + self.timing.detach_timeout;
        if let Some(att) = attachment {
            self.ec2.detach_eni(&att).await?;
            // EC2 refuses the delete until the detach completes (seconds): IMDS, which is
            // not metered, says when the ENI has left the instance; one delete then.
            let mut wait = Duration::from_millis(100);
            while Instant::now() < deadline {
                match self.imds.enis().await {
                    Ok(enis) if enis.iter().all(|e| e.id != eni_id) => break,
                    _ => {}
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        }
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

    pub(super) async fn attach_new_eni(
        &self,
        limits: Limits,
        short: u32,
    ) -> Result<String, CloudError> {
        let inst = self.known()?;
        let per = limits.slots_per_eni();
        let (used, prefix_mode, fallback) = {
            let s = self.store.lock().unwrap();
            let mut used: BTreeSet<u32> = s.enis().map(|e| e.device_number).collect();
            used.extend(
                self.pool
                    .lock()
                    .unwrap()
                    .waiting_for_link
                    .values()
                    .map(|w| w.eni.device_number),
            );
            let policy = self.policy(limits);
            (
                used,
                matches!(policy.mode, Mode::Prefix { .. }),
                self.pool.lock().unwrap().prefix_fallback,
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
        let mut tags = self.eni_tags(&inst.meta.instance_id);
        tags.push((
            TAG_CREATED_AT.to_string(),
            rfc3339(crate::clock::wall_now()),
        ));
        // An ENI created by an attempt whose attach EC2 throttled is attached now, not
        // created again (each create and delete spends the account's ENI tokens).
        let kept = self.pool.lock().unwrap().created_unattached.take();
        let (created, subnet_cidr) = match kept {
            Some(k) => k,
            None => {
                let (subnet, security_groups) = if self.cfg.custom_network_cfg {
                    self.custom_target()
                        .await
                        .map_err(|why| CloudError::new("ipamd", "ENIConfig", why))?
                } else {
                    (self.subnet_for_new_eni(inst).await, self.primary_sgs())
                };
                let created = self
                    .ec2
                    .create_eni(&NewEni {
                        subnet_id: subnet.id.clone(),
                        security_groups,
                        description: format!("aws-K8S-{}", inst.meta.instance_id),
                        tags,
                        secondary_ips: secondary,
                        prefixes,
                    })
                    .await
                    .inspect_err(|e| {
                        // An answer lost (nothing answered, EC2 failed inside): EC2 may
                        // have created it all the same.
                        if e.is_transient() && !e.is_throttle() {
                            self.note_possible_leak();
                        }
                    })?;
                (created, subnet.cidr)
            }
        };
        let attachment = match self
            .ec2
            .attach_eni(&created.id, &inst.meta.instance_id, device)
            .await
        {
            Ok(a) => a,
            Err(e) if e.is_transient() => {
                // Kept for the next attempt; the leaked-ENI sweep removes it if ipamd
                // stops first.
                info!(
                    "attaching {} failed ({e}): kept for the next attempt",
                    created.id
                );
                // If no next attempt comes (the pool stops being short), the sweep.
                self.note_possible_leak();
                self.pool.lock().unwrap().created_unattached = Some((created, subnet_cidr));
                return Err(e);
            }
            Err(e) => {
                // Never leave a created ENI behind.
                if let Err(d) = self.ec2.delete_eni(&created.id).await {
                    self.note_possible_leak();
                    warn!(
                        "could not delete {} after a failed attach (the sweep will): {d}",
                        created.id
                    );
                }
                return Err(e);
            }
        };
        let mut info = created;
        info.device_number = device;
        info.subnet_cidr = subnet_cidr;
        info.attachment_id = Some(attachment.clone());
        let id = info.id.clone();
        // Its addresses are handed out only once the host can route them.
        let eni = store_eni(&info, false);
        if let Err(e) = self
            .host
            .setup_eni(&self.eni_net(&eni), self.timing.eni_link_wait)
            .await
        {
            // Kept, not attached again: it counts as an ENI at its device, its addresses
            // wait for the link, and no other ENI is attached meanwhile.
            self.metrics.error("eniLinkMissing");
            warn!(
                "{id} is attached at device {device} but its link (MAC {}) has not appeared on the host within {:?}: waiting for it ({e})",
                eni.mac, self.timing.eni_link_wait
            );
            self.pool.lock().unwrap().waiting_for_link.insert(
                id.clone(),
                LinkWait {
                    eni,
                    since: Instant::now(),
                },
            );
            self.delete_on_termination(&id, &attachment).await;
            return Ok(format!("attached {id}; waiting for its link"));
        }
        let refused = self.store.lock().unwrap().add_eni(eni);
        self.note_refused(&id, &refused, true);
        // Pods waiting get the addresses now; the attribute call is off their path.
        self.addresses_added.notify_waiters();
        self.delete_on_termination(&id, &attachment).await;
        info!(
            "attached {id} at device {device} with {} IPs, {} prefixes",
            info.secondary_ips.len(),
            info.prefixes.len()
        );
        Ok(format!("attached {id}"))
    }

    /// DeleteOnTermination, so terminating the instance deletes the ENI (as upstream).
    async fn delete_on_termination(&self, eni: &str, attachment: &str) {
        if let Err(e) = self.ec2.set_delete_on_termination(eni, attachment).await {
            warn!("DeleteOnTermination on {eni} failed: {e}");
        }
    }

    /// ENIs whose link had not appeared: ready now? Their addresses go to pods then.
    pub(super) async fn retry_waiting_links(&self) {
        let waiting: Vec<LinkWait> = {
            let rt = self.pool.lock().unwrap();
            rt.waiting_for_link.values().cloned().collect()
        };
        for w in waiting {
            let id = w.eni.id.clone();
            // A reconcile may have found it ready first.
            let known = self.store.lock().unwrap().eni(&id).is_some();
            if !known {
                if self
                    .host
                    .setup_eni(&self.eni_net(&w.eni), Duration::ZERO)
                    .await
                    .is_err()
                {
                    continue;
                }
                let refused = self.store.lock().unwrap().add_eni(w.eni);
                self.note_refused(&id, &refused, true);
                info!(
                    "the link of {id} appeared after {:?}: its addresses are served",
                    w.since.elapsed()
                );
            }
            self.pool.lock().unwrap().waiting_for_link.remove(&id);
            self.addresses_added.notify_waiters();
        }
    }

    /// The primary ENI's security groups, as IMDS last said them.
    pub fn primary_sgs(&self) -> Vec<String> {
        self.primary_sgs.read().unwrap().clone()
    }

    /// Outside custom networking, secondary ENIs carry the primary ENI's security groups
    /// (as upstream, which compares them every 30 s): from IMDS, which is not metered, so a
    /// node whose groups do not change spends nothing; a change reaches every secondary
    /// ENI within a reconcile interval, one ModifyNetworkInterfaceAttribute each.
    pub(super) async fn follow_primary_security_groups(&self, imds: &[crate::cloud::EniInfo]) {
        let Some(inst) = self.identity() else {
            return;
        };
        let Some(p) = imds.iter().find(|e| e.mac == inst.meta.primary_mac) else {
            return;
        };
        if p.security_groups.is_empty() {
            return;
        }
        let mut want = p.security_groups.clone();
        want.sort();
        {
            let mut cur = self.primary_sgs.write().unwrap();
            let mut had = cur.clone();
            had.sort();
            if had != want {
                info!("the primary ENI's security groups are now {want:?}");
                *cur = p.security_groups.clone();
            }
        }
        if self.cfg.custom_network_cfg {
            return;
        }
        let ours: std::collections::BTreeSet<String> = self
            .store
            .lock()
            .unwrap()
            .enis()
            .map(|e| e.id.clone())
            .collect();
        for e in imds
            .iter()
            .filter(|e| e.mac != inst.meta.primary_mac && ours.contains(&e.id))
        {
            let mut have = e.security_groups.clone();
            have.sort();
            if have == want || self.sgs_given.lock().unwrap().get(&e.id) == Some(&want) {
                continue;
            }
            match self.ec2.set_security_groups(&e.id, &want).await {
                Ok(()) => {
                    info!(
                        "{}: security groups {have:?} -> {want:?} (the primary ENI's)",
                        e.id
                    );
                    self.sgs_given
                        .lock()
                        .unwrap()
                        .insert(e.id.clone(), want.clone());
                }
                Err(err) => {
                    self.metrics.error("setSecurityGroupsFailed");
                    warn!(
                        "{}: setting the primary ENI's security groups failed: {err}",
                        e.id
                    );
                }
            }
        }
    }

    /// Subnet discovery: the subnet tagged kubernetes.io/role/cni in this VPC and AZ with
    /// the most free addresses (the primary ENI's subnet competes too); without the knob,
    /// or when EC2 cannot say, the primary ENI's subnet.
    async fn subnet_for_new_eni(&self, id: &Identity) -> SubnetInfo {
        let primary = SubnetInfo {
            id: id.primary_subnet.clone(),
            cidr: id.primary_subnet_cidr,
            availability_zone: id.meta.availability_zone.clone(),
            available_addresses: 0,
        };
        if !self.cfg.enable_subnet_discovery || id.vpc_id.is_empty() {
            return primary;
        }
        // One DescribeSubnets a minute at most: ENIs attached in a burst share it.
        let cached = self
            .pool
            .lock()
            .unwrap()
            .subnets
            .as_ref()
            .filter(|(at, _)| at.elapsed() < SUBNET_CACHE_TTL)
            .map(|(_, s)| s.clone());
        if let Some(subnets) = cached {
            return pick_subnet(&subnets, &id.meta.availability_zone, primary);
        }
        match self.ec2.cni_subnets(&id.vpc_id).await {
            Ok(subnets) => {
                self.pool.lock().unwrap().subnets = Some((Instant::now(), subnets.clone()));
                pick_subnet(&subnets, &id.meta.availability_zone, primary)
            }
            Err(e) => {
                warn!("subnet discovery failed, using the primary ENI's subnet: {e}");
                primary
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::parse_cidr;

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
}
