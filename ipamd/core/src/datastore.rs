//! The datastore: the node's ENIs, the secondary IPs and /28 prefixes they hold for
//! pods, and which sandbox holds which address. Assign and release are O(1); the
//! caller holds its lock only around these calls, never across I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::time::Instant;

use serde::{Deserialize, Serialize};

use crate::net::Ipv4Net;

pub type EniId = String;

/// An assignment's key, as upstream keys it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SandboxKey {
    pub network: String,
    pub container_id: String,
    pub if_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// A sandbox's address: IPv4 in the datastore's pools, IPv6 in an IPv6 node's prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment<A = Ipv4Addr> {
    pub key: SandboxKey,
    pub ip: A,
    pub eni: EniId,
    pub device_number: u32,
    /// Nanoseconds since the Unix epoch.
    pub assigned_at_ns: u64,
    pub pod: PodRef,
}

#[derive(Clone, Debug)]
pub struct Eni {
    pub id: EniId,
    pub mac: String,
    pub device_number: u32,
    pub is_primary: bool,
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Net,
    pub primary_ip: Ipv4Addr,
    /// Known from our attach or a describe: detaching needs no describe then.
    pub attachment_id: Option<String>,
    pub first_seen: Instant,
    /// Secondary IPs held for pods.
    pub ips: BTreeSet<Ipv4Addr>,
    /// /28 prefixes held for pods (prefix delegation).
    pub prefixes: BTreeSet<Ipv4Net>,
}

impl Eni {
    /// Address slots the ENI uses for pods (a prefix takes one slot).
    pub fn slots_used(&self) -> u32 {
        (self.ips.len() + self.prefixes.len()) as u32
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    Assigned {
        key: SandboxKey,
        at_ns: u64,
        pod: PodRef,
    },
    Cooldown {
        released_ns: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("no free address on this node")]
    NoFreeAddress,
    #[error("unknown ENI {0}")]
    UnknownEni(EniId),
    #[error("{0} is assigned to a pod")]
    InUse(String),
    #[error("{0} is already held by ENI {1}")]
    Duplicate(Ipv4Addr, EniId),
    #[error("{0} is the primary address of ENI {1}, never a pod's")]
    EniPrimary(Ipv4Addr, EniId),
    #[error("{0} is assigned to a pod, but no ENI holds it yet")]
    NotPlaced(String),
}

/// Free addresses with O(1) pop and O(1) removal of a given one.
#[derive(Default, Debug)]
struct FreeList {
    items: Vec<Ipv4Addr>,
    pos: HashMap<Ipv4Addr, usize>,
}

impl FreeList {
    fn push(&mut self, ip: Ipv4Addr) {
        if self.pos.contains_key(&ip) {
            return;
        }
        self.pos.insert(ip, self.items.len());
        self.items.push(ip);
    }

    fn pop(&mut self) -> Option<Ipv4Addr> {
        let ip = self.items.pop()?;
        self.pos.remove(&ip);
        Some(ip)
    }

    fn remove(&mut self, ip: Ipv4Addr) -> bool {
        let Some(i) = self.pos.remove(&ip) else {
            return false;
        };
        let last = self.items.pop().expect("non-empty");
        if i < self.items.len() {
            self.items[i] = last;
            self.pos.insert(last, i);
        }
        true
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

/// Which ENIs give addresses to new pods (custom networking: not the primary ENI, and
/// only ENIs of the subnet the node's ENIConfig names). An ENI outside the rule keeps its
/// pods; its free addresses are neither handed out nor counted for the pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Serving {
    pub skip_primary: bool,
    pub only_subnet: Option<String>,
}

impl Serving {
    pub fn serves(&self, e: &Eni) -> bool {
        !(self.skip_primary && e.is_primary)
            && self.only_subnet.as_ref().is_none_or(|s| *s == e.subnet_id)
    }
}

#[derive(Debug)]
pub struct Datastore {
    enis: BTreeMap<EniId, Eni>,
    serving: Serving,
    addrs: HashMap<Ipv4Addr, (EniId, Slot)>,
    by_key: HashMap<SandboxKey, Ipv4Addr>,
    /// Free addresses per ENI, lowest device number first: pods fill the primary ENI
    /// before the others, so the highest ENIs drain and can be freed.
    free: BTreeMap<(u32, EniId), FreeList>,
    free_count: usize,
    cooldown: VecDeque<(u64, Ipv4Addr)>,
    cooldown_ns: u64,
    in_cooldown: u32,
    /// Assignments restored from a checkpoint whose address no ENI holds (yet).
    orphans: HashMap<SandboxKey, Assignment>,
    /// Cooldowns restored for addresses no ENI holds (yet): applied when one does.
    unplaced_cooldowns: HashMap<Ipv4Addr, u64>,
}

impl Datastore {
    pub fn new(cooldown: Duration) -> Self {
        Datastore {
            enis: BTreeMap::new(),
            serving: Serving::default(),
            addrs: HashMap::new(),
            by_key: HashMap::new(),
            free: BTreeMap::new(),
            free_count: 0,
            cooldown: VecDeque::new(),
            cooldown_ns: cooldown.as_nanos() as u64,
            in_cooldown: 0,
            orphans: HashMap::new(),
            unplaced_cooldowns: HashMap::new(),
        }
    }

    fn free_key(&self, ip: Ipv4Addr) -> Option<(u32, EniId)> {
        let (eni, _) = self.addrs.get(&ip)?;
        let dev = self
            .enis
            .get(eni)
            .map(|e| e.device_number)
            .unwrap_or(u32::MAX);
        Some((dev, eni.clone()))
    }

    /// Makes `ip` assignable. An ENI's own address never is (one a pod held when its ENI
    /// appeared goes once the pod lets go of it): it is forgotten instead.
    fn free_push(&mut self, ip: Ipv4Addr) {
        if self.enis.values().any(|e| e.primary_ip == ip) {
            if let Some((owner, _)) = self.addrs.remove(&ip)
                && let Some(e) = self.enis.get_mut(&owner)
            {
                e.ips.remove(&ip);
            }
            return;
        }
        if let Some(k) = self.free_key(ip) {
            let list = self.free.entry(k).or_default();
            let before = list.len();
            list.push(ip);
            self.free_count += list.len() - before;
        }
    }

    fn free_remove(&mut self, ip: Ipv4Addr) {
        if let Some(k) = self.free_key(ip)
            && let Some(list) = self.free.get_mut(&k)
            && list.remove(ip)
        {
            self.free_count -= 1;
        }
    }

    fn free_pop(&mut self) -> Option<Ipv4Addr> {
        let (enis, serving) = (&self.enis, &self.serving);
        let ip = self
            .free
            .iter_mut()
            .find(|((_, id), l)| l.len() > 0 && enis.get(id).is_some_and(|e| serving.serves(e)))?
            .1
            .pop()?;
        self.free_count -= 1;
        Some(ip)
    }

    /// Adds an ENI with the addresses it holds; returns those it refused (see `add_ips`).
    pub fn add_eni(&mut self, eni: Eni) -> Vec<StoreError> {
        let id = eni.id.clone();
        let ips: Vec<_> = eni.ips.iter().copied().collect();
        let prefixes: Vec<_> = eni.prefixes.iter().copied().collect();
        let mut bare = eni;
        bare.ips.clear();
        bare.prefixes.clear();
        let primary = bare.primary_ip;
        let mut refused = Vec::new();
        // Its own address held as another ENI's free secondary (EC2 cannot mean both):
        // it is the new ENI's now, never a pod's. One a pod holds already stays the pod's.
        if let Some((owner, slot)) = self.addrs.get(&primary)
            && owner != &id
        {
            let owner = owner.clone();
            if matches!(slot, Slot::Free) {
                self.drop_addr(primary);
                if let Some(e) = self.enis.get_mut(&owner) {
                    e.ips.remove(&primary);
                }
            }
            refused.push(StoreError::Duplicate(primary, owner));
        }
        self.enis.entry(id.clone()).or_insert(bare);
        refused.extend(self.add_ips(&id, &ips).unwrap_or_default());
        for p in prefixes {
            if let Err(e) = self.add_prefix(&id, p) {
                refused.push(e);
            }
        }
        refused
    }

    pub fn eni(&self, id: &str) -> Option<&Eni> {
        self.enis.get(id)
    }

    pub fn set_attachment(&mut self, id: &str, attachment: Option<String>) {
        if let (Some(e), Some(a)) = (self.enis.get_mut(id), attachment) {
            e.attachment_id = Some(a);
        }
    }

    pub fn enis(&self) -> impl Iterator<Item = &Eni> {
        self.enis.values()
    }

    fn insert_addr(&mut self, eni: &str, ip: Ipv4Addr) -> Result<(), StoreError> {
        // EC2 (or an emulator, or IMDS) may list an ENI's own address among its
        // secondaries: the node or the ENI answers on it, so no pod may ever get it.
        if let Some(e) = self.enis.values().find(|e| e.primary_ip == ip) {
            return Err(StoreError::EniPrimary(ip, e.id.clone()));
        }
        if let Some((owner, _)) = self.addrs.get(&ip) {
            if owner == eni {
                return Ok(());
            }
            return Err(StoreError::Duplicate(ip, owner.clone()));
        }
        // An assignment restored before its ENI was known is adopted here.
        let adopt = self
            .orphans
            .iter()
            .find(|(_, a)| a.ip == ip)
            .map(|(k, _)| k.clone());
        if let Some(k) = adopt {
            let a = self.orphans.remove(&k).expect("present");
            self.addrs.insert(
                ip,
                (
                    eni.to_string(),
                    Slot::Assigned {
                        key: k.clone(),
                        at_ns: a.assigned_at_ns,
                        pod: a.pod,
                    },
                ),
            );
            self.by_key.insert(k, ip);
        } else if let Some(released_ns) = self.unplaced_cooldowns.remove(&ip) {
            self.addrs
                .insert(ip, (eni.to_string(), Slot::Cooldown { released_ns }));
            self.in_cooldown += 1;
            let pos = self.cooldown.partition_point(|(t, _)| *t <= released_ns);
            self.cooldown.insert(pos, (released_ns, ip));
        } else {
            self.addrs.insert(ip, (eni.to_string(), Slot::Free));
            self.free_push(ip);
        }
        Ok(())
    }

    /// Adds secondary IPs to `eni`. An address that cannot be a pod's (another ENI holds
    /// it, or it is an ENI's primary) is refused, and returned, without hiding the rest:
    /// every other address is added. Err only for an unknown ENI.
    pub fn add_ips(&mut self, eni: &str, ips: &[Ipv4Addr]) -> Result<Vec<StoreError>, StoreError> {
        if !self.enis.contains_key(eni) {
            return Err(StoreError::UnknownEni(eni.to_string()));
        }
        let mut refused = Vec::new();
        for ip in ips {
            match self.insert_addr(eni, *ip) {
                Ok(()) => {
                    self.enis.get_mut(eni).expect("checked").ips.insert(*ip);
                }
                Err(e) => refused.push(e),
            }
        }
        Ok(refused)
    }

    /// Adds a /28. All or nothing: a prefix any of whose addresses another ENI holds, or
    /// that holds an ENI's primary address, is refused whole.
    pub fn add_prefix(&mut self, eni: &str, prefix: Ipv4Net) -> Result<(), StoreError> {
        if !self.enis.contains_key(eni) {
            return Err(StoreError::UnknownEni(eni.to_string()));
        }
        if self
            .enis
            .get(eni)
            .is_some_and(|e| e.prefixes.contains(&prefix))
        {
            return Ok(());
        }
        for ip in prefix.addresses() {
            if let Some(e) = self.enis.values().find(|e| e.primary_ip == ip) {
                return Err(StoreError::EniPrimary(ip, e.id.clone()));
            }
            if let Some((owner, _)) = self.addrs.get(&ip)
                && owner != eni
            {
                return Err(StoreError::Duplicate(ip, owner.clone()));
            }
        }
        for ip in prefix.addresses() {
            self.insert_addr(eni, ip)?;
        }
        self.enis
            .get_mut(eni)
            .expect("checked")
            .prefixes
            .insert(prefix);
        Ok(())
    }

    fn ensure_unused(&self, ip: Ipv4Addr) -> Result<(), StoreError> {
        match self.addrs.get(&ip) {
            Some((_, Slot::Assigned { key, .. })) => {
                Err(StoreError::InUse(format!("{ip} ({})", key.container_id)))
            }
            Some((_, Slot::Cooldown { .. })) => {
                Err(StoreError::InUse(format!("{ip} (cooling down)")))
            }
            _ => Ok(()),
        }
    }

    fn drop_addr(&mut self, ip: Ipv4Addr) {
        self.free_remove(ip);
        self.addrs.remove(&ip);
    }

    /// Removes free secondary IPs (before they go back to EC2). Fails, removing nothing,
    /// if any is assigned or cooling down.
    pub fn remove_ips(&mut self, eni: &str, ips: &[Ipv4Addr]) -> Result<(), StoreError> {
        for ip in ips {
            self.ensure_unused(*ip)?;
        }
        for ip in ips {
            self.drop_addr(*ip);
            if let Some(e) = self.enis.get_mut(eni) {
                e.ips.remove(ip);
            }
        }
        Ok(())
    }

    pub fn remove_prefix(&mut self, eni: &str, prefix: Ipv4Net) -> Result<(), StoreError> {
        for ip in prefix.addresses() {
            self.ensure_unused(ip)?;
        }
        for ip in prefix.addresses() {
            self.drop_addr(ip);
        }
        if let Some(e) = self.enis.get_mut(eni) {
            e.prefixes.remove(&prefix);
        }
        Ok(())
    }

    /// Forgets an ENI whose addresses are all unused (before it is detached).
    pub fn remove_eni(&mut self, eni: &str) -> Result<Eni, StoreError> {
        let e = self
            .enis
            .get(eni)
            .ok_or_else(|| StoreError::UnknownEni(eni.to_string()))?;
        let all: Vec<Ipv4Addr> = e
            .ips
            .iter()
            .copied()
            .chain(e.prefixes.iter().flat_map(|p| p.addresses()))
            .collect();
        for ip in &all {
            self.ensure_unused(*ip)?;
        }
        for ip in all {
            self.drop_addr(ip);
        }
        Ok(self.enis.remove(eni).expect("checked"))
    }

    /// Moves addresses whose cooldown has passed back to the free list.
    /// When the address that has been cooling down longest becomes free (ns), if any.
    pub fn next_cooled_ns(&self) -> Option<u64> {
        self.cooldown
            .front()
            .map(|(at, _)| at.saturating_add(self.cooldown_ns))
    }

    fn promote_cooled(&mut self, now_ns: u64) {
        let cooldown_ns = self.cooldown_ns;
        self.unplaced_cooldowns
            .retain(|_, at| at.saturating_add(cooldown_ns) > now_ns);
        while let Some(&(at, ip)) = self.cooldown.front() {
            if at.saturating_add(self.cooldown_ns) > now_ns {
                break;
            }
            self.cooldown.pop_front();
            if let Some((_, slot)) = self.addrs.get_mut(&ip)
                && matches!(slot, Slot::Cooldown { released_ns } if *released_ns == at)
            {
                *slot = Slot::Free;
                self.in_cooldown -= 1;
                self.free_push(ip);
            }
        }
    }

    fn assignment_of(&self, ip: Ipv4Addr) -> Option<Assignment> {
        let (eni, slot) = self.addrs.get(&ip)?;
        let Slot::Assigned { key, at_ns, pod } = slot else {
            return None;
        };
        Some(Assignment {
            key: key.clone(),
            ip,
            eni: eni.clone(),
            device_number: self.enis.get(eni).map(|e| e.device_number).unwrap_or(0),
            assigned_at_ns: *at_ns,
            pod: pod.clone(),
        })
    }

    pub fn get(&self, key: &SandboxKey) -> Option<Assignment> {
        self.assignment_of(*self.by_key.get(key)?)
    }

    /// Gives `key` an address. A key that already has one gets the same one back
    /// (the runtime may repeat ADD). Second return: whether this was a new assignment.
    pub fn assign(
        &mut self,
        key: &SandboxKey,
        pod: &PodRef,
        now_ns: u64,
    ) -> Result<(Assignment, bool), StoreError> {
        if let Some(a) = self.get(key) {
            return Ok((a, false));
        }
        // Restored, but its ENI is not known yet: the same address once it is, never a new one.
        if let Some(a) = self.orphans.get(key) {
            return Err(StoreError::NotPlaced(a.ip.to_string()));
        }
        self.promote_cooled(now_ns);
        let ip = self.free_pop().ok_or(StoreError::NoFreeAddress)?;
        let (_, slot) = self.addrs.get_mut(&ip).expect("free addresses are known");
        *slot = Slot::Assigned {
            key: key.clone(),
            at_ns: now_ns,
            pod: pod.clone(),
        };
        self.by_key.insert(key.clone(), ip);
        Ok((self.assignment_of(ip).expect("just assigned"), true))
    }

    /// Releases `key`'s address into cooldown. `None` if the key holds nothing.
    pub fn release(&mut self, key: &SandboxKey, now_ns: u64) -> Option<Assignment> {
        if let Some(orphan) = self.orphans.remove(key) {
            return Some(orphan);
        }
        let ip = self.by_key.remove(key)?;
        let a = self.assignment_of(ip)?;
        let (_, slot) = self
            .addrs
            .get_mut(&ip)
            .expect("assigned addresses are known");
        *slot = Slot::Cooldown {
            released_ns: now_ns,
        };
        self.in_cooldown += 1;
        self.cooldown.push_back((now_ns, ip));
        Some(a)
    }

    /// Restores an assignment from a checkpoint or the host (address maybe not on a
    /// known ENI yet). Refused if the key, or the address, is held already.
    pub fn restore(&mut self, a: Assignment) -> Result<(), StoreError> {
        // One address per key, one key per address: a restore never overwrites either.
        if self.by_key.contains_key(&a.key) || self.orphans.contains_key(&a.key) {
            return Err(StoreError::InUse(format!(
                "{} (already restored)",
                a.key.container_id
            )));
        }
        if matches!(self.addrs.get(&a.ip), Some((_, Slot::Assigned { .. })))
            || self.orphans.values().any(|o| o.ip == a.ip)
        {
            return Err(StoreError::InUse(a.ip.to_string()));
        }
        if let Some((_, Slot::Free)) = self.addrs.get(&a.ip) {
            self.free_remove(a.ip);
        }
        if let Some((_, slot)) = self.addrs.get_mut(&a.ip) {
            if matches!(slot, Slot::Cooldown { .. }) {
                self.in_cooldown -= 1;
            }
            *slot = Slot::Assigned {
                key: a.key.clone(),
                at_ns: a.assigned_at_ns,
                pod: a.pod.clone(),
            };
            self.by_key.insert(a.key, a.ip);
        } else {
            self.orphans.insert(a.key.clone(), a);
        }
        Ok(())
    }

    /// Restores a persisted cooldown (restart keeps released addresses out of use).
    pub fn restore_cooldown(&mut self, ip: Ipv4Addr, released_ns: u64) {
        if !self.addrs.contains_key(&ip) {
            if !self.orphans.values().any(|a| a.ip == ip) {
                self.unplaced_cooldowns.insert(ip, released_ns);
            }
            return;
        }
        if !matches!(self.addrs.get(&ip), Some((_, Slot::Free))) {
            return;
        }
        self.free_remove(ip);
        if let Some((_, slot)) = self.addrs.get_mut(&ip) {
            *slot = Slot::Cooldown { released_ns };
            self.in_cooldown += 1;
            let pos = self.cooldown.partition_point(|(t, _)| *t <= released_ns);
            self.cooldown.insert(pos, (released_ns, ip));
        }
    }

    pub fn assignments(&self) -> Vec<Assignment> {
        let mut v: Vec<Assignment> = self
            .by_key
            .values()
            .filter_map(|ip| self.assignment_of(*ip))
            .chain(self.orphans.values().cloned())
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// (ip, released_ns) of every address cooling down.
    pub fn cooldowns(&self) -> Vec<(Ipv4Addr, u64)> {
        self.addrs
            .iter()
            .filter_map(|(ip, (_, s))| match s {
                Slot::Cooldown { released_ns } => Some((*ip, *released_ns)),
                _ => None,
            })
            .chain(self.unplaced_cooldowns.iter().map(|(ip, t)| (*ip, *t)))
            .collect()
    }

    /// Whether `ip` is held for a pod (assigned, restored on no ENI yet, or cooling down).
    pub fn holds_for_a_pod(&self, ip: Ipv4Addr) -> bool {
        matches!(
            self.addrs.get(&ip),
            Some((_, Slot::Assigned { .. } | Slot::Cooldown { .. }))
        ) || self.orphans.values().any(|a| a.ip == ip)
    }

    /// Whether `ip` is on an ENI and free to assign now.
    pub fn is_free(&self, ip: Ipv4Addr) -> bool {
        matches!(self.addrs.get(&ip), Some((_, Slot::Free)))
    }

    pub fn orphan_count(&self) -> usize {
        self.orphans.len()
    }

    /// The restored assignments no ENI holds, oldest first.
    pub fn orphans(&self) -> Vec<Assignment> {
        let mut v: Vec<Assignment> = self.orphans.values().cloned().collect();
        v.sort_by_key(|a| (a.assigned_at_ns, a.key.clone()));
        v
    }

    /// Sets which ENIs serve new pods.
    pub fn set_serving(&mut self, serving: Serving) {
        self.serving = serving;
    }

    pub fn serving(&self) -> &Serving {
        &self.serving
    }

    /// Whether the ENI gives addresses to new pods.
    pub fn serves(&self, e: &Eni) -> bool {
        self.serving.serves(e)
    }

    /// Free addresses on ENIs that serve no new pod.
    fn closed_free(&self) -> usize {
        if self.serving == Serving::default() {
            return 0;
        }
        self.free
            .iter()
            .filter(|((_, id), _)| self.enis.get(id).is_none_or(|e| !self.serving.serves(e)))
            .map(|(_, l)| l.len())
            .sum()
    }

    /// (total, assigned, cooldown, assignable now) over addresses held for pods; the
    /// free addresses of ENIs that serve no new pod are not counted.
    pub fn counts(&mut self, now_ns: u64) -> (u32, u32, u32, u32) {
        self.promote_cooled(now_ns);
        let closed = self.closed_free();
        (
            (self.addrs.len() - closed) as u32,
            self.by_key.len() as u32,
            self.in_cooldown,
            (self.free_count - closed) as u32,
        )
    }

    /// Per ENI: (addresses held for pods, assigned).
    pub fn eni_counts(&self) -> BTreeMap<EniId, (u32, u32)> {
        let mut out: BTreeMap<EniId, (u32, u32)> =
            self.enis.keys().map(|k| (k.clone(), (0, 0))).collect();
        for (eni, slot) in self.addrs.values() {
            let c = out.entry(eni.clone()).or_default();
            c.0 += 1;
            if matches!(slot, Slot::Assigned { .. }) {
                c.1 += 1;
            }
        }
        out
    }

    /// Per subnet: (addresses held for pods, assigned).
    pub fn subnet_counts(&self) -> BTreeMap<String, (u32, u32)> {
        let mut out: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for (eni, (total, assigned)) in self.eni_counts() {
            if let Some(e) = self.enis.get(&eni) {
                let c = out.entry(e.subnet_id.clone()).or_default();
                c.0 += total;
                c.1 += assigned;
            }
        }
        out
    }

    /// Up to `n` free secondary IPs to hand back to EC2, from the highest device numbers first.
    pub fn releasable_ips(&self, n: u32) -> Vec<(EniId, Ipv4Addr)> {
        let mut out = Vec::new();
        let mut enis: Vec<&Eni> = self.enis.values().collect();
        enis.sort_by_key(|e| std::cmp::Reverse(e.device_number));
        for e in enis {
            for ip in &e.ips {
                if out.len() as u32 >= n {
                    return out;
                }
                if matches!(self.addrs.get(ip), Some((_, Slot::Free))) {
                    out.push((e.id.clone(), *ip));
                }
            }
        }
        out
    }

    /// The free secondary IPs of ENIs that serve no new pod and cannot be freed whole (the
    /// primary ENI under custom networking): addresses of the node's subnet held for nothing.
    pub fn idle_ips_on_closed_primary(&self) -> Vec<(EniId, Ipv4Addr)> {
        self.enis
            .values()
            .filter(|e| e.is_primary && !self.serving.serves(e))
            .flat_map(|e| e.ips.iter().map(move |ip| (e.id.clone(), *ip)))
            .filter(|(_, ip)| matches!(self.addrs.get(ip), Some((_, Slot::Free))))
            .collect()
    }

    /// Up to `n` prefixes none of whose addresses is in use.
    pub fn releasable_prefixes(&self, n: u32) -> Vec<(EniId, Ipv4Net)> {
        let mut out = Vec::new();
        for e in self.enis.values().rev() {
            for p in &e.prefixes {
                if out.len() as u32 >= n {
                    return out;
                }
                if p.addresses()
                    .all(|ip| matches!(self.addrs.get(&ip), Some((_, Slot::Free))))
                {
                    out.push((e.id.clone(), *p));
                }
            }
        }
        out
    }

    /// An ENI that may be freed: not primary, seen at least `min_age` ago, and none of
    /// its addresses assigned or cooling down.
    pub fn freeable_eni(&self, min_age: Duration, now: Instant) -> Option<EniId> {
        self.freeable(|e| now.duration_since(e.first_seen) >= min_age)
    }

    /// An ENI outside the serving rule with none of its addresses in use.
    pub fn freeable_drained_eni(&self) -> Option<EniId> {
        self.freeable(|e| !self.serving.serves(e))
    }

    fn freeable(&self, also: impl Fn(&Eni) -> bool) -> Option<EniId> {
        self.enis
            .values()
            .rev()
            .find(|e| {
                !e.is_primary
                    && also(e)
                    && e.ips
                        .iter()
                        .copied()
                        .chain(e.prefixes.iter().flat_map(|p| p.addresses()))
                        .all(|ip| matches!(self.addrs.get(&ip), Some((_, Slot::Free)) | None))
            })
            .map(|e| e.id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::parse_cidr;

    fn eni(id: &str, dev: u32, ips: &[&str]) -> Eni {
        Eni {
            id: id.into(),
            mac: format!("02:00:00:00:00:{dev:02x}"),
            device_number: dev,
            is_primary: dev == 0,
            subnet_id: "subnet-1".into(),
            subnet_cidr: parse_cidr("10.0.0.0/24").unwrap(),
            primary_ip: format!("10.0.0.{}", 100 + dev).parse().unwrap(),
            attachment_id: None,
            first_seen: Instant::now(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            prefixes: BTreeSet::new(),
        }
    }

    fn key(c: &str) -> SandboxKey {
        SandboxKey {
            network: "aws-cni".into(),
            container_id: c.into(),
            if_name: "eth0".into(),
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn assign_is_idempotent_and_unique() {
        let mut d = Datastore::new(Duration::from_secs(30));
        d.add_eni(eni("eni-0", 0, &["10.0.0.1", "10.0.0.2"]));
        let (a, new) = d.assign(&key("c1"), &PodRef::default(), S).unwrap();
        assert!(new);
        let (again, new2) = d.assign(&key("c1"), &PodRef::default(), 2 * S).unwrap();
        assert!(!new2);
        assert_eq!(a.ip, again.ip);
        let (b, _) = d.assign(&key("c2"), &PodRef::default(), S).unwrap();
        assert_ne!(a.ip, b.ip);
        assert_eq!(
            d.assign(&key("c3"), &PodRef::default(), S),
            Err(StoreError::NoFreeAddress)
        );
    }

    #[test]
    fn cooldown_keeps_a_released_address_out_of_use() {
        let mut d = Datastore::new(Duration::from_secs(30));
        d.add_eni(eni("eni-0", 0, &["10.0.0.1"]));
        let (a, _) = d.assign(&key("c1"), &PodRef::default(), 0).unwrap();
        assert_eq!(d.release(&key("c1"), 10 * S).map(|r| r.ip), Some(a.ip));
        assert!(
            d.release(&key("c1"), 10 * S).is_none(),
            "second release holds nothing"
        );
        assert_eq!(d.counts(11 * S), (1, 0, 1, 0));
        assert_eq!(
            d.assign(&key("c2"), &PodRef::default(), 39 * S),
            Err(StoreError::NoFreeAddress)
        );
        let (b, _) = d.assign(&key("c2"), &PodRef::default(), 40 * S).unwrap();
        assert_eq!(b.ip, a.ip);
    }

    #[test]
    fn restore_and_orphans() {
        let mut d = Datastore::new(Duration::from_secs(30));
        let a = Assignment {
            key: key("c1"),
            ip: "10.0.0.9".parse().unwrap(),
            eni: String::new(),
            device_number: 0,
            assigned_at_ns: 5,
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
            },
        };
        d.restore(a.clone()).unwrap();
        assert_eq!(d.orphan_count(), 1);
        // The ENI shows up later with the address: the assignment is adopted, not freed.
        d.add_eni(eni("eni-1", 1, &["10.0.0.9", "10.0.0.10"]));
        assert_eq!(d.orphan_count(), 0);
        let got = d.get(&key("c1")).unwrap();
        assert_eq!(
            (got.ip, got.device_number, got.pod.name.as_str()),
            (a.ip, 1, "p")
        );
        let (b, _) = d.assign(&key("c2"), &PodRef::default(), S).unwrap();
        assert_eq!(b.ip.to_string(), "10.0.0.10");
        d.restore_cooldown("10.0.0.10".parse().unwrap(), 0);
    }

    #[test]
    fn removal_refuses_addresses_in_use() {
        let mut d = Datastore::new(Duration::from_secs(30));
        d.add_eni(eni("eni-0", 0, &[]));
        d.add_eni(eni("eni-1", 1, &["10.0.0.1", "10.0.0.2"]));
        let (a, _) = d.assign(&key("c1"), &PodRef::default(), 0).unwrap();
        assert!(matches!(
            d.remove_ips("eni-1", &[a.ip]),
            Err(StoreError::InUse(_))
        ));
        assert!(d.remove_eni("eni-1").is_err());
        assert_eq!(d.freeable_eni(Duration::ZERO, Instant::now()), None);
        let other = d.releasable_ips(5);
        assert_eq!(other.len(), 1);
        assert_ne!(other[0].1, a.ip);
        d.release(&key("c1"), 0);
        assert!(d.remove_eni("eni-1").is_err(), "cooling down");
        d.counts(31 * S);
        assert_eq!(
            d.freeable_eni(Duration::ZERO, Instant::now()),
            Some("eni-1".to_string())
        );
        d.remove_eni("eni-1").unwrap();
        assert_eq!(d.counts(31 * S).0, 0);
    }

    #[test]
    fn enis_outside_the_serving_rule_keep_their_pods_and_serve_no_new_one() {
        let mut d = Datastore::new(Duration::ZERO);
        d.add_eni(eni("eni-0", 0, &["10.0.0.1", "10.0.0.2"]));
        let (old, _) = d.assign(&key("old"), &PodRef::default(), 0).unwrap();
        let mut other = eni("eni-1", 1, &["100.64.0.5", "100.64.0.6"]);
        other.subnet_id = "subnet-pods".into();
        d.add_eni(other);
        // Custom networking: not the primary ENI; the ENIConfig names subnet-pods.
        d.set_serving(Serving {
            skip_primary: true,
            only_subnet: Some("subnet-pods".into()),
        });
        // eni-0's pod stays; its free address is neither served nor counted.
        assert_eq!(d.counts(0), (3, 1, 0, 2));
        for c in ["a", "b"] {
            let (a, _) = d.assign(&key(c), &PodRef::default(), 0).unwrap();
            assert_eq!(a.eni, "eni-1", "{a:?}");
        }
        assert_eq!(
            d.assign(&key("c"), &PodRef::default(), 0).unwrap_err(),
            StoreError::NoFreeAddress,
            "the primary ENI's free address is not a pod's"
        );
        assert_eq!(d.get(&key("old")).unwrap().ip, old.ip);
        let idle: Ipv4Addr = if old.ip.to_string() == "10.0.0.1" {
            "10.0.0.2".parse().unwrap()
        } else {
            "10.0.0.1".parse().unwrap()
        };
        assert_eq!(
            d.idle_ips_on_closed_primary(),
            vec![("eni-0".to_string(), idle)],
            "the primary's free address may go back to EC2; its pod's stays"
        );
        // The config moves on: eni-1 drains, the primary's free address still is not served.
        d.set_serving(Serving {
            skip_primary: true,
            only_subnet: Some("subnet-new".into()),
        });
        d.release(&key("a"), 0);
        assert_eq!(d.counts(1), (2, 2, 0, 0));
        // Back to the default: everything serves.
        d.set_serving(Serving::default());
        assert_eq!(d.counts(1), (4, 2, 0, 2));
    }

    #[test]
    fn prefixes_hold_16_addresses() {
        let mut d = Datastore::new(Duration::ZERO);
        d.add_eni(eni("eni-0", 0, &[]));
        let p = parse_cidr("10.0.0.16/28").unwrap();
        d.add_prefix("eni-0", p).unwrap();
        assert_eq!(d.counts(0).0, 16);
        let (a, _) = d.assign(&key("c1"), &PodRef::default(), 0).unwrap();
        assert!(p.contains(a.ip));
        assert!(d.releasable_prefixes(1).is_empty());
        assert!(d.remove_prefix("eni-0", p).is_err());
        d.release(&key("c1"), 0);
        d.counts(1);
        assert_eq!(d.releasable_prefixes(1), vec![("eni-0".to_string(), p)]);
        d.remove_prefix("eni-0", p).unwrap();
        assert_eq!(d.counts(1).0, 0);
    }

    #[test]
    fn pods_fill_the_lowest_device_number_first() {
        let mut d = Datastore::new(Duration::ZERO);
        d.add_eni(eni("eni-2", 2, &["10.0.0.21", "10.0.0.22"]));
        d.add_eni(eni("eni-0", 0, &["10.0.0.1"]));
        d.add_eni(eni("eni-1", 1, &["10.0.0.11"]));
        let order: Vec<u32> = ["a", "b", "c", "d"]
            .iter()
            .map(|c| {
                d.assign(&key(c), &PodRef::default(), 0)
                    .unwrap()
                    .0
                    .device_number
            })
            .collect();
        assert_eq!(order, vec![0, 1, 2, 2]);
        assert_eq!(d.counts(0), (4, 4, 0, 0));
        assert_eq!(d.eni_counts().get("eni-2"), Some(&(2, 2)));
        assert_eq!(d.subnet_counts().get("subnet-1"), Some(&(4, 4)));
    }

    #[test]
    fn an_address_is_held_by_one_eni_only() {
        let mut d = Datastore::new(Duration::ZERO);
        d.add_eni(eni("eni-0", 0, &["10.0.0.1"]));
        d.add_eni(eni("eni-1", 1, &[]));
        assert!(matches!(
            d.add_ips("eni-1", &["10.0.0.1".parse().unwrap()]).unwrap()[..],
            [StoreError::Duplicate(..)]
        ));
    }

    #[test]
    fn an_unusable_address_is_refused_without_hiding_the_rest() {
        let mut d = Datastore::new(Duration::ZERO);
        d.add_eni(eni("eni-0", 0, &["10.0.0.1"]));
        // EC2's answer lists eni-0's own address (10.0.0.100) and a duplicate first.
        let refused = d.add_eni(eni(
            "eni-1",
            1,
            &[
                "10.0.0.1",
                "10.0.0.100",
                "10.0.0.101",
                "10.0.0.2",
                "10.0.0.3",
            ],
        ));
        assert_eq!(
            refused,
            vec![
                StoreError::Duplicate("10.0.0.1".parse().unwrap(), "eni-0".into()),
                StoreError::EniPrimary("10.0.0.100".parse().unwrap(), "eni-0".into()),
                StoreError::EniPrimary("10.0.0.101".parse().unwrap(), "eni-1".into()),
            ]
        );
        assert_eq!(
            d.counts(0),
            (3, 0, 0, 3),
            "10.0.0.1 (eni-0), .2 and .3 (eni-1)"
        );
        let mut got = Vec::new();
        while let Ok((a, _)) = d.assign(&key(&format!("c{}", got.len())), &PodRef::default(), 0) {
            got.push(a.ip.to_string());
        }
        got.sort();
        assert_eq!(got, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        // A /28 holding an ENI's primary address is refused whole.
        let p = crate::net::parse_cidr("10.0.0.96/28").unwrap();
        assert!(matches!(
            d.add_prefix("eni-1", p),
            Err(StoreError::EniPrimary(..))
        ));
    }

    /// Found by the fuzzer (fuzz/ipamd_requests): an ENI whose own address another ENI
    /// listed as a free secondary left that address free for a pod.
    #[test]
    fn an_enis_own_address_listed_free_elsewhere_is_not_a_pods() {
        let mut d = Datastore::new(Duration::ZERO);
        d.add_eni(eni("eni-0", 0, &["10.0.0.1", "10.0.0.2"]));
        let mut second = eni("eni-1", 1, &["10.0.0.3"]);
        second.primary_ip = "10.0.0.2".parse().unwrap();
        let refused = d.add_eni(second);
        assert_eq!(
            refused,
            vec![StoreError::Duplicate(
                "10.0.0.2".parse().unwrap(),
                "eni-0".into()
            )]
        );
        assert!(!d.is_free("10.0.0.2".parse().unwrap()));
        let mut got = Vec::new();
        while let Ok((a, _)) = d.assign(&key(&format!("c{}", got.len())), &PodRef::default(), 0) {
            got.push(a.ip.to_string());
        }
        got.sort();
        assert_eq!(got, ["10.0.0.1", "10.0.0.3"]);
    }

    #[test]
    fn a_restored_pod_whose_eni_is_not_known_gets_no_new_address() {
        let mut d = Datastore::new(Duration::ZERO);
        d.add_eni(eni("eni-0", 0, &["10.0.0.1"]));
        d.restore(Assignment {
            key: key("c1"),
            ip: "10.0.0.9".parse().unwrap(),
            eni: String::new(),
            device_number: 0,
            assigned_at_ns: 5,
            pod: PodRef::default(),
        })
        .unwrap();
        // The same key or the same address again is refused, changing nothing.
        let again = |ip: &str, c: &str| Assignment {
            key: key(c),
            ip: ip.parse().unwrap(),
            eni: String::new(),
            device_number: 0,
            assigned_at_ns: 6,
            pod: PodRef::default(),
        };
        assert!(
            d.restore(again("10.0.0.20", "c1")).is_err(),
            "found by the fuzzer"
        );
        assert!(d.restore(again("10.0.0.9", "c2")).is_err());
        assert_eq!(d.assignments().len(), 1);
        assert_eq!(
            d.assign(&key("c1"), &PodRef::default(), S),
            Err(StoreError::NotPlaced("10.0.0.9".into()))
        );
        assert_eq!(d.counts(S).3, 1, "10.0.0.1 is still free");
    }
}
