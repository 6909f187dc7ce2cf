//! An IPv6 node's pod addresses: /128s handed out from the /80 prefix delegated to the
//! primary ENI (upstream's IPv6 mode: one prefix, no warm pool, no other ENIs).
//!
//! A /80 holds 2^48 addresses, so nothing here ever walks the space: a cursor hands out
//! the next offset and moves on, and a released address is not handed out again until
//! the cursor has gone round the whole prefix (a cooldown of 2^48 assignments). Only
//! when it wraps does it skip what is held or still cooling, which is at most as many
//! steps as there are pods. Assign and release are O(1).
//!
//! Across a restart the cursor resumes past every address the checkpoint names: the
//! held ones and, through `cooldowns()`, the last one handed out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::Ipv6Addr;

use crate::datastore::{Assignment, EniId, PodRef, SandboxKey};
use crate::net::Ipv6Net;

pub type Assignment6 = Assignment<Ipv6Addr>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Store6Error {
    #[error("{ip} is held by both {first} and {second}")]
    Conflict {
        ip: Ipv6Addr,
        first: String,
        second: String,
    },
}

#[derive(Debug)]
pub struct Prefix6Store {
    eni: EniId,
    /// Every prefix of the ENI; new addresses come from the first.
    prefixes: Vec<Ipv6Net>,
    /// The next offset to hand out in `prefixes[0]` (0, the prefix's own address, never is).
    cursor: u128,
    /// The last address handed out, and when (what `cooldowns()` reports so a restart
    /// resumes the cursor past it).
    last_issued: Option<(Ipv6Addr, u64)>,
    by_key: HashMap<SandboxKey, Assignment6>,
    held: HashMap<Ipv6Addr, SandboxKey>,
    /// Released addresses still cooling, oldest first.
    cooling: VecDeque<(Ipv6Addr, u64)>,
    cooling_set: HashSet<Ipv6Addr>,
    cooldown_ns: u64,
}

impl Prefix6Store {
    pub fn new(cooldown: std::time::Duration) -> Self {
        Prefix6Store {
            eni: String::new(),
            prefixes: Vec::new(),
            cursor: 1,
            last_issued: None,
            by_key: HashMap::new(),
            held: HashMap::new(),
            cooling: VecDeque::new(),
            cooling_set: HashSet::new(),
            cooldown_ns: cooldown.as_nanos() as u64,
        }
    }

    /// The ENI and its delegated prefixes (from IMDS or EC2). Pods restored before this
    /// keep their addresses; the cursor moves past every address already named.
    pub fn set_prefixes(&mut self, eni: &str, prefixes: Vec<Ipv6Net>) {
        self.eni = eni.to_string();
        for a in self.by_key.values_mut() {
            a.eni = eni.to_string();
        }
        self.prefixes = prefixes;
        let named: Vec<Ipv6Addr> = self
            .held
            .keys()
            .copied()
            .chain(self.cooling.iter().map(|(ip, _)| *ip))
            .chain(self.last_issued.map(|(ip, _)| ip))
            .collect();
        for ip in named {
            self.resume_past(ip);
        }
    }

    pub fn prefixes(&self) -> &[Ipv6Net] {
        &self.prefixes
    }

    pub fn eni(&self) -> &str {
        &self.eni
    }

    fn serving(&self) -> Option<Ipv6Net> {
        self.prefixes.first().copied()
    }

    /// The largest offset of the serving prefix.
    fn max_offset(p: Ipv6Net) -> u128 {
        if p.len == 0 {
            u128::MAX
        } else {
            (1u128 << (128 - p.len as u32)) - 1
        }
    }

    fn resume_past(&mut self, ip: Ipv6Addr) {
        if let Some(p) = self.serving()
            && let Some(off) = p.offset_of(ip)
            && off >= self.cursor
        {
            self.cursor = off.saturating_add(1);
        }
    }

    /// Whether any prefix of the ENI holds `ip`.
    pub fn covers(&self, ip: Ipv6Addr) -> bool {
        self.prefixes.iter().any(|p| p.contains(ip))
    }

    pub fn get(&self, key: &SandboxKey) -> Option<&Assignment6> {
        self.by_key.get(key)
    }

    /// The sandbox's address: the one it holds already (ADD is retried), else the next
    /// free one. `None` when there is no prefix yet, or every address is held or cooling.
    pub fn assign(&mut self, key: SandboxKey, pod: PodRef, now_ns: u64) -> Option<Assignment6> {
        if let Some(a) = self.by_key.get(&key) {
            return Some(a.clone());
        }
        self.expire(now_ns);
        let p = self.serving()?;
        let max = Self::max_offset(p);
        // Skips happen only for held or cooling addresses; one more round than there are
        // of those, or the whole prefix if it is smaller, finds a free one if any is.
        let mut budget = (self.held.len() + self.cooling.len() + 1) as u128;
        budget = budget.min(max);
        while budget > 0 {
            if self.cursor == 0 || self.cursor > max {
                self.cursor = 1;
            }
            let ip = p.nth(self.cursor).expect("offset within the prefix");
            self.cursor += 1;
            if self.held.contains_key(&ip) || self.cooling_set.contains(&ip) {
                budget -= 1;
                continue;
            }
            let a = Assignment {
                key: key.clone(),
                ip,
                eni: self.eni.clone(),
                device_number: 0,
                assigned_at_ns: now_ns,
                pod,
            };
            self.held.insert(ip, key.clone());
            self.by_key.insert(key, a.clone());
            self.last_issued = Some((ip, now_ns));
            return Some(a);
        }
        None
    }

    /// Frees the sandbox's address (it cools before it could be handed out again).
    pub fn release(&mut self, key: &SandboxKey, now_ns: u64) -> Option<Assignment6> {
        let a = self.by_key.remove(key)?;
        self.held.remove(&a.ip);
        if self.cooling_set.insert(a.ip) {
            self.cooling.push_back((a.ip, now_ns));
        }
        self.expire(now_ns);
        Some(a)
    }

    fn expire(&mut self, now_ns: u64) {
        while let Some(&(ip, at)) = self.cooling.front() {
            if now_ns.saturating_sub(at) < self.cooldown_ns {
                break;
            }
            self.cooling.pop_front();
            self.cooling_set.remove(&ip);
        }
    }

    /// Puts back an assignment from the checkpoint.
    pub fn restore(&mut self, mut a: Assignment6) -> Result<(), Store6Error> {
        if let Some(other) = self.held.get(&a.ip)
            && other != &a.key
        {
            return Err(Store6Error::Conflict {
                ip: a.ip,
                first: other.container_id.clone(),
                second: a.key.container_id.clone(),
            });
        }
        if let Some(old) = self.by_key.remove(&a.key) {
            self.held.remove(&old.ip);
        }
        if self.cooling_set.remove(&a.ip) {
            self.cooling.retain(|(ip, _)| *ip != a.ip);
        }
        a.eni = self.eni.clone();
        a.device_number = 0;
        self.held.insert(a.ip, a.key.clone());
        self.resume_past(a.ip);
        self.by_key.insert(a.key.clone(), a);
        Ok(())
    }

    /// Puts back a cooling address from the checkpoint (also where the cursor resumes).
    pub fn restore_cooldown(&mut self, ip: Ipv6Addr, released_ns: u64) {
        if !self.held.contains_key(&ip) && self.cooling_set.insert(ip) {
            // Kept in release order: the checkpoint lists them sorted by address.
            let at = self.cooling.partition_point(|(_, t)| *t <= released_ns);
            self.cooling.insert(at, (ip, released_ns));
        }
        self.resume_past(ip);
    }

    pub fn assignments(&self) -> Vec<Assignment6> {
        let mut v: Vec<_> = self.by_key.values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// What the checkpoint keeps besides the assignments: the addresses still cooling,
    /// and the last one handed out (so a restart's cursor resumes past it).
    pub fn cooldowns(&self) -> Vec<(Ipv6Addr, u64)> {
        let mut v: Vec<_> = self.cooling.iter().copied().collect();
        if let Some((ip, at)) = self.last_issued
            && !self.held.contains_key(&ip)
            && !self.cooling_set.contains(&ip)
        {
            v.push((ip, at));
        }
        v
    }

    pub fn assigned(&self) -> usize {
        self.by_key.len()
    }

    /// Addresses the prefixes hold for pods (2^48 per /80), saturating.
    pub fn capacity(&self) -> u64 {
        self.prefixes
            .iter()
            .map(|p| u64::try_from(Self::max_offset(*p)).unwrap_or(u64::MAX))
            .fold(0u64, |a, b| a.saturating_add(b))
    }

    pub fn cooling(&self) -> usize {
        self.cooling.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::net::parse_cidr6;

    fn key(c: &str) -> SandboxKey {
        SandboxKey {
            network: "aws-cni".into(),
            container_id: c.into(),
            if_name: "eth0".into(),
        }
    }

    fn store(prefix: &str) -> Prefix6Store {
        let mut s = Prefix6Store::new(Duration::from_secs(30));
        s.set_prefixes("eni-1", vec![parse_cidr6(prefix).unwrap()]);
        s
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn table() {
        // (prefix, steps, expected addresses / None): "+c" assigns c, "-c" releases it,
        // "@t" moves the clock to t seconds.
        struct Case {
            name: &'static str,
            prefix: &'static str,
            steps: &'static [&'static str],
            want: &'static [Option<&'static str>],
        }
        let cases = [
            Case {
                name: "addresses come in order from offset 1",
                prefix: "2600:1f14:0:100:1::/80",
                steps: &["+a", "+b", "+c"],
                want: &[
                    Some("2600:1f14:0:100:1::1"),
                    Some("2600:1f14:0:100:1::2"),
                    Some("2600:1f14:0:100:1::3"),
                ],
            },
            Case {
                name: "a retried ADD gets the address it holds",
                prefix: "2600:1f14:0:100:1::/80",
                steps: &["+a", "+a"],
                want: &[Some("2600:1f14:0:100:1::1"), Some("2600:1f14:0:100:1::1")],
            },
            Case {
                name: "a released address is not handed out again before the cursor wraps",
                prefix: "2600:1f14:0:100:1::/80",
                steps: &["+a", "-a", "@100", "+b"],
                want: &[Some("2600:1f14:0:100:1::1"), Some("2600:1f14:0:100:1::2")],
            },
            Case {
                name: "after wrapping, held and cooling addresses are skipped",
                prefix: "2600::/126", // offsets 1..3
                steps: &["+a", "+b", "+c", "-b", "+d", "@31", "+d"],
                want: &[
                    Some("2600::1"),
                    Some("2600::2"),
                    Some("2600::3"),
                    None, // ::1, ::3 held, ::2 cooling
                    Some("2600::2"),
                ],
            },
            Case {
                name: "a full prefix answers none, and serves again once one cooled",
                prefix: "2600::/127", // offset 1 only
                steps: &["+a", "+b", "-a", "+b", "@30", "+b"],
                want: &[Some("2600::1"), None, None, Some("2600::1")],
            },
        ];
        for c in cases {
            let mut s = store(c.prefix);
            let mut now = 0;
            let mut got = Vec::new();
            for step in c.steps {
                let (op, arg) = step.split_at(1);
                match op {
                    "+" => got.push(
                        s.assign(key(arg), PodRef::default(), now)
                            .map(|a| a.ip.to_string()),
                    ),
                    "-" => {
                        s.release(&key(arg), now).expect("held");
                    }
                    "@" => now = arg.parse::<u64>().unwrap() * SEC,
                    _ => unreachable!(),
                }
            }
            let want: Vec<Option<String>> = c.want.iter().map(|w| w.map(str::to_string)).collect();
            assert_eq!(got, want, "{}", c.name);
        }
    }

    #[test]
    fn no_prefix_no_address() {
        let mut s = Prefix6Store::new(Duration::from_secs(30));
        assert!(s.assign(key("a"), PodRef::default(), 0).is_none());
    }

    #[test]
    fn a_80_is_never_walked() {
        // 10,000 pods come and go: each assign takes one step, the space is 2^48.
        let mut s = store("2600:1f14:0:100:1::/80");
        assert_eq!(s.capacity(), (1 << 48) - 1);
        for i in 0..10_000u64 {
            let k = key(&format!("c{i}"));
            let a = s.assign(k.clone(), PodRef::default(), i).unwrap();
            assert_eq!(
                a.ip,
                "2600:1f14:0:100:1::"
                    .parse::<Ipv6Addr>()
                    .map(|b| { Ipv6Addr::from(u128::from(b) + i as u128 + 1) })
                    .unwrap()
            );
            if i % 2 == 0 {
                s.release(&k, i);
            }
        }
        assert_eq!(s.assigned(), 5_000);
    }

    #[test]
    fn restart_resumes_past_every_address_named() {
        let mut s = store("2600:1f14:0:100:1::/80");
        for c in ["a", "b", "c"] {
            s.assign(key(c), PodRef::default(), 0).unwrap();
        }
        s.release(&key("c"), 5 * SEC);
        s.assign(key("d"), PodRef::default(), 6 * SEC).unwrap(); // ::4
        s.release(&key("d"), 7 * SEC);
        let (held, cool) = (s.assignments(), s.cooldowns());
        // A restart: the checkpoint is read before IMDS names the prefix.
        let mut r = Prefix6Store::new(Duration::from_secs(30));
        for a in held.clone() {
            r.restore(a).unwrap();
        }
        for (ip, t) in cool {
            r.restore_cooldown(ip, t);
        }
        r.set_prefixes(
            "eni-1",
            vec![parse_cidr6("2600:1f14:0:100:1::/80").unwrap()],
        );
        assert_eq!(r.assignments(), held);
        let next = r.assign(key("e"), PodRef::default(), 8 * SEC).unwrap();
        assert_eq!(next.ip.to_string(), "2600:1f14:0:100:1::5");
        // The last one handed out is reported even after its cooldown ended.
        r.release(&key("e"), 9 * SEC);
        r.release(&key("b"), 100 * SEC);
        let later = r.cooldowns();
        assert_eq!(r.cooling(), 1, "{later:?}");
        assert!(
            later.iter().any(|(ip, _)| ip.to_string().ends_with("::5")),
            "{later:?}"
        );
    }

    #[test]
    fn restore_refuses_one_address_for_two_sandboxes() {
        let mut s = store("2600::/80");
        let a = s.assign(key("a"), PodRef::default(), 0).unwrap();
        let mut b = a.clone();
        b.key = key("b");
        assert!(matches!(s.restore(b), Err(Store6Error::Conflict { .. })));
        s.restore(a).unwrap(); // the same sandbox again is fine
    }
}
