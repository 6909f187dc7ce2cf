//! EC2 and IMDS as one in-process model of an account: subnets with finite free
//! addresses, instances with their types' ENI limits, ENIs with their addresses and
//! attachments, account-wide token buckets per call family (RequestLimitExceeded when
//! empty, the call not done), and per-call latency from a log-normal distribution. Every
//! call is logged (virtual time, node, action, outcome).
//!
//! It answers as the emulator (`localstack/`) does where ipamd depends on it: only the
//! new addresses from AssignPrivateIpAddresses, PrivateIpAddressLimitExceeded,
//! AttachmentLimitExceeded, InsufficientFreeAddressesInSubnet / InsufficientCidrBlocks,
//! InvalidNetworkInterface.InUse while an ENI is attached or detaching.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ipamd_core::cloud::{
    CNI_SUBNET_TAG, CloudError, CloudResult, Ec2, EniInfo, Imds, InstanceMeta, NewEni, SubnetInfo,
};
use ipamd_core::net::Ipv4Net;
use ipamd_core::pool::Limits;
use serde::Deserialize;
use tokio::time::Instant;

/// A small deterministic generator (splitmix64): runs repeat for a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(1e-12);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The call families EC2 meters separately (each its own bucket).
pub fn family(api: &str) -> &'static str {
    match api {
        "AssignPrivateIpAddresses" | "UnassignPrivateIpAddresses" => "assign-unassign",
        "CreateNetworkInterface"
        | "AttachNetworkInterface"
        | "DetachNetworkInterface"
        | "DeleteNetworkInterface" => "eni-lifecycle",
        a if a.starts_with("Describe") => "describe",
        _ => "mutating",
    }
}

pub const FAMILIES: [&str; 4] = ["describe", "assign-unassign", "eni-lifecycle", "mutating"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketParam {
    pub burst: f64,
    pub per_sec: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyParam {
    pub median_ms: f64,
    pub p99_ms: f64,
}

/// The account's EC2 as a scenario sets it (defaults: compat.md §7's buckets, latencies
/// of the order EC2 shows).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ec2Params {
    pub buckets: BTreeMap<String, BucketParam>,
    pub latency: BTreeMap<String, LatencyParam>,
    /// How long a throttled call takes to come back.
    pub throttle_latency_ms: f64,
    /// How long an ENI stays `detaching` after DetachNetworkInterface.
    pub detach_s: f64,
}

impl Default for Ec2Params {
    fn default() -> Self {
        let b = |burst, per_sec| BucketParam { burst, per_sec };
        let l = |median_ms, p99_ms| LatencyParam { median_ms, p99_ms };
        Ec2Params {
            buckets: [
                ("describe", b(100.0, 20.0)),
                ("assign-unassign", b(100.0, 5.0)),
                ("eni-lifecycle", b(50.0, 5.0)),
                ("mutating", b(200.0, 10.0)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            latency: [
                ("describe", l(120.0, 600.0)),
                ("assign-unassign", l(250.0, 1200.0)),
                ("eni-lifecycle", l(400.0, 2000.0)),
                ("mutating", l(150.0, 800.0)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            throttle_latency_ms: 30.0,
            detach_s: 3.0,
        }
    }
}

/// (ENIs, IPv4 addresses per ENI) of the instance types scenarios use (as EC2 and the
/// emulator give them).
pub fn instance_limits(t: &str) -> Option<Limits> {
    let (max_enis, ipv4_per_eni) = match t {
        "t3.small" => (3, 4),
        "t3.medium" => (3, 6),
        "m5.large" => (3, 10),
        "m5.xlarge" => (4, 15),
        "m5.2xlarge" => (4, 15),
        "m5.4xlarge" => (8, 30),
        "c5.18xlarge" => (15, 50),
        _ => return None,
    };
    Some(Limits {
        max_enis,
        ipv4_per_eni,
    })
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        self.at = now;
    }
}

/// One subnet's addresses: single addresses from the bottom up, /28s from the top down,
/// both with free lists.
#[derive(Debug, Clone)]
pub struct Subnet {
    pub id: String,
    pub cidr: Ipv4Net,
    pub az: String,
    pub tagged: bool,
    next_ip: u32,
    prefix_floor: u32,
    free_ips: Vec<u32>,
    free_prefixes: Vec<u32>,
}

impl Subnet {
    fn new(id: String, cidr: Ipv4Net, az: String, tagged: bool) -> Subnet {
        let base = u32::from(cidr.addr);
        let size = 1u32 << (32 - cidr.len);
        // .0-.3 and the broadcast are EC2's; the top /28 holds the broadcast.
        let top = (base + size - 1) & !15;
        Subnet {
            id,
            cidr,
            az,
            tagged,
            next_ip: base + 4,
            prefix_floor: top,
            free_ips: Vec::new(),
            free_prefixes: Vec::new(),
        }
    }
    pub fn available(&self) -> u32 {
        (self.prefix_floor.saturating_sub(self.next_ip))
            + self.free_ips.len() as u32
            + 16 * self.free_prefixes.len() as u32
    }
    fn ip(&mut self) -> Option<u32> {
        if let Some(ip) = self.free_ips.pop() {
            return Some(ip);
        }
        if self.next_ip < self.prefix_floor {
            self.next_ip += 1;
            return Some(self.next_ip - 1);
        }
        None
    }
    fn prefix(&mut self) -> Option<u32> {
        if let Some(p) = self.free_prefixes.pop() {
            return Some(p);
        }
        let p = self.prefix_floor.checked_sub(16)?;
        if p >= self.next_ip {
            self.prefix_floor = p;
            return Some(p);
        }
        None
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Status {
    Available,
    InUse,
    Detaching(Instant),
}

#[derive(Debug, Clone)]
struct Eni {
    id: String,
    mac: String,
    subnet: usize,
    primary: u32,
    ips: Vec<u32>,
    prefixes: Vec<u32>,
    instance: Option<usize>,
    device: u32,
    attachment: Option<String>,
    status: Status,
    tags: Vec<(String, String)>,
    sgs: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub itype: String,
    pub az: String,
    pub primary_eni: String,
}

/// One EC2 call as the model answered it.
#[derive(Debug, Clone)]
pub struct Call {
    pub at_ms: u64,
    pub node: u32,
    pub api: &'static str,
    /// "200" or the error code.
    pub status: &'static str,
}

pub struct Account {
    pub params: Ec2Params,
    rng: Rng,
    buckets: BTreeMap<&'static str, Bucket>,
    pub subnets: Vec<Subnet>,
    enis: HashMap<String, Eni>,
    pub instances: Vec<Instance>,
    seq: u64,
    pub start: Instant,
    pub log: Vec<Call>,
    vpc_cidrs: Vec<Ipv4Net>,
    sgs: Vec<String>,
}

fn ip(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v)
}

fn err(api: &str, code: &str, msg: impl Into<String>) -> CloudError {
    CloudError::new(api, code, msg)
}

impl Account {
    pub fn new(params: Ec2Params, seed: u64, vpc_cidrs: Vec<Ipv4Net>) -> Account {
        let now = Instant::now();
        let buckets = FAMILIES
            .iter()
            .map(|f| {
                let p = params.buckets.get(*f).cloned().unwrap_or(BucketParam {
                    burst: 100.0,
                    per_sec: 10.0,
                });
                (
                    *f,
                    Bucket {
                        tokens: p.burst,
                        burst: p.burst,
                        per_sec: p.per_sec,
                        at: now,
                    },
                )
            })
            .collect();
        Account {
            params,
            rng: Rng::new(seed),
            buckets,
            subnets: Vec::new(),
            enis: HashMap::new(),
            instances: Vec::new(),
            seq: 0,
            start: now,
            log: Vec::new(),
            vpc_cidrs,
            sgs: vec!["sg-0node".into()],
        }
    }

    pub fn add_subnet(&mut self, cidr: Ipv4Net, az: &str, tagged: bool) -> usize {
        let id = format!("subnet-{:08x}", self.subnets.len() + 1);
        self.subnets
            .push(Subnet::new(id, cidr, az.to_string(), tagged));
        self.subnets.len() - 1
    }

    fn next(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn mac(n: u64) -> String {
        let b = n.to_be_bytes();
        format!(
            "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[3], b[4], b[5], b[6], b[7]
        )
    }

    /// Launches an instance with its primary ENI in `subnet` (an address of its own, no
    /// secondaries): its index.
    pub fn launch(&mut self, itype: &str, subnet: usize) -> Result<usize, String> {
        let n = self.next();
        let primary = self.subnets[subnet]
            .ip()
            .ok_or_else(|| format!("{} is full", self.subnets[subnet].id))?;
        let idx = self.instances.len();
        let eni_id = format!("eni-{n:012x}");
        self.enis.insert(
            eni_id.clone(),
            Eni {
                id: eni_id.clone(),
                mac: Self::mac(n),
                subnet,
                primary,
                ips: vec![],
                prefixes: vec![],
                instance: Some(idx),
                device: 0,
                attachment: Some(format!("eni-attach-{n:012x}")),
                status: Status::InUse,
                tags: vec![],
                sgs: self.sgs.clone(),
            },
        );
        self.instances.push(Instance {
            id: format!("i-{n:012x}"),
            itype: itype.to_string(),
            az: self.subnets[subnet].az.clone(),
            primary_eni: eni_id,
        });
        Ok(idx)
    }

    /// Takes a token of `api`'s family and draws its latency; `None`: throttled.
    fn admit(&mut self, api: &str) -> (bool, Duration) {
        let fam = family(api);
        let now = Instant::now();
        let b = self.buckets.get_mut(fam).expect("family");
        b.refill(now);
        if b.tokens < 1.0 {
            return (
                false,
                Duration::from_secs_f64(self.params.throttle_latency_ms / 1000.0),
            );
        }
        b.tokens -= 1.0;
        let l = self
            .params
            .latency
            .get(fam)
            .cloned()
            .unwrap_or(LatencyParam {
                median_ms: 100.0,
                p99_ms: 500.0,
            });
        let sigma = (l.p99_ms / l.median_ms).max(1.0).ln() / 2.326;
        let ms = l.median_ms * (sigma * self.rng.normal()).exp();
        (true, Duration::from_secs_f64(ms.min(30_000.0) / 1000.0))
    }

    fn record(&mut self, node: u32, api: &'static str, status: &'static str) {
        let at_ms = Instant::now()
            .saturating_duration_since(self.start)
            .as_millis() as u64;
        self.log.push(Call {
            at_ms,
            node,
            api,
            status,
        });
    }

    /// Tokens left per family now.
    pub fn tokens(&mut self) -> Vec<(&'static str, f64, f64)> {
        let now = Instant::now();
        self.buckets
            .iter_mut()
            .map(|(f, b)| {
                b.refill(now);
                (*f, b.tokens, b.burst)
            })
            .collect()
    }

    fn settle(&mut self) {
        let now = Instant::now();
        for e in self.enis.values_mut() {
            if let Status::Detaching(t) = e.status
                && now >= t
            {
                e.status = Status::Available;
                e.instance = None;
            }
        }
    }

    fn info(&self, e: &Eni) -> EniInfo {
        let s = &self.subnets[e.subnet];
        EniInfo {
            id: e.id.clone(),
            mac: e.mac.clone(),
            device_number: e.device,
            subnet_id: s.id.clone(),
            subnet_cidr: s.cidr,
            vpc_id: "vpc-0sim".into(),
            vpc_cidrs: self.vpc_cidrs.clone(),
            security_groups: e.sgs.clone(),
            primary_ip: ip(e.primary),
            secondary_ips: e.ips.iter().map(|v| ip(*v)).collect(),
            prefixes: e
                .prefixes
                .iter()
                .map(|p| Ipv4Net {
                    addr: ip(*p),
                    len: 28,
                })
                .collect(),
            attachment_id: e.attachment.clone(),
            tags: e.tags.clone(),
            status: match e.status {
                Status::Available => "available",
                Status::InUse => "in-use",
                Status::Detaching(_) => "detaching",
            }
            .into(),
            ipv6: Default::default(),
        }
    }

    fn limits_of(&self, inst: usize) -> Limits {
        instance_limits(&self.instances[inst].itype).unwrap_or(Limits {
            max_enis: 3,
            ipv4_per_eni: 10,
        })
    }

    fn eni_mut(&mut self, api: &str, id: &str) -> CloudResult<&mut Eni> {
        self.enis.get_mut(id).ok_or_else(|| {
            err(
                api,
                "InvalidNetworkInterfaceID.NotFound",
                format!("The networkInterface ID '{id}' does not exist"),
            )
        })
    }

    fn instance_by_id(&self, id: &str) -> Option<usize> {
        self.instances.iter().position(|i| i.id == id)
    }

    /// The instance's attached ENIs (as DescribeNetworkInterfaces and IMDS list them).
    pub fn attached(&self, inst: usize) -> Vec<EniInfo> {
        self.on_instance(inst, false)
    }

    /// `with_detaching`: as IMDS lists them (an ENI detaching is still there).
    fn on_instance(&self, inst: usize, with_detaching: bool) -> Vec<EniInfo> {
        let mut v: Vec<&Eni> = self
            .enis
            .values()
            .filter(|e| {
                e.instance == Some(inst)
                    && (e.status == Status::InUse
                        || (with_detaching && matches!(e.status, Status::Detaching(_))))
            })
            .collect();
        v.sort_by_key(|e| e.device);
        v.into_iter().map(|e| self.info(e)).collect()
    }

    /// Every ENI and address the account holds for instances (a report's check).
    pub fn totals(&self) -> (usize, usize) {
        let enis = self.enis.len();
        let addrs = self
            .enis
            .values()
            .map(|e| e.ips.len() + 16 * e.prefixes.len())
            .sum();
        (enis, addrs)
    }

    // --- the actions --------------------------------------------------------------

    fn do_call(&mut self, api: &'static str, node: usize, op: &Op) -> CloudResult<Answer> {
        self.settle();
        let inst = node;
        match op {
            Op::Limits(t) => instance_limits(t)
                .map(Answer::Limits)
                .ok_or_else(|| err(api, "InvalidInstanceType", t.clone())),
            Op::InstanceEnis(id) => {
                let i = self
                    .instance_by_id(id)
                    .ok_or_else(|| err(api, "InvalidInstanceID.NotFound", id.clone()))?;
                Ok(Answer::Enis(self.attached(i)))
            }
            Op::Unattached(k, v) => {
                let mut out: Vec<EniInfo> = self
                    .enis
                    .values()
                    .filter(|e| {
                        e.status == Status::Available
                            && e.tags.iter().any(|(a, b)| a == k && b == v)
                    })
                    .map(|e| self.info(e))
                    .collect();
                out.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(Answer::Enis(out))
            }
            Op::Subnets => Ok(Answer::Subnets(
                self.subnets
                    .iter()
                    .filter(|s| s.tagged)
                    .map(|s| SubnetInfo {
                        id: s.id.clone(),
                        cidr: s.cidr,
                        availability_zone: s.az.clone(),
                        available_addresses: s.available(),
                    })
                    .collect(),
            )),
            Op::Create(req) => {
                let si = self
                    .subnets
                    .iter()
                    .position(|s| s.id == req.subnet_id)
                    .ok_or_else(|| err(api, "InvalidSubnetID.NotFound", req.subnet_id.clone()))?;
                let per = self.limits_of(inst).ipv4_per_eni;
                if 1 + req.secondary_ips + req.prefixes > per {
                    return Err(err(
                        api,
                        "PrivateIpAddressLimitExceeded",
                        "too many addresses for the instance type",
                    ));
                }
                let s = &mut self.subnets[si];
                if s.available() < 1 + req.secondary_ips + 16 * req.prefixes {
                    return Err(err(
                        api,
                        "InsufficientFreeAddressesInSubnet",
                        format!("{} has too few free addresses", s.id),
                    ));
                }
                let primary = s.ip().expect("checked");
                let ips: Vec<u32> = (0..req.secondary_ips).filter_map(|_| s.ip()).collect();
                let mut prefixes = Vec::new();
                for _ in 0..req.prefixes {
                    match s.prefix() {
                        Some(p) => prefixes.push(p),
                        None => {
                            s.free_ips.push(primary);
                            s.free_ips.extend(ips);
                            s.free_prefixes.extend(prefixes);
                            return Err(err(api, "InsufficientCidrBlocks", "no free /28"));
                        }
                    }
                }
                let n = self.next();
                let e = Eni {
                    id: format!("eni-{n:012x}"),
                    mac: Self::mac(n),
                    subnet: si,
                    primary,
                    ips,
                    prefixes,
                    instance: None,
                    device: 0,
                    attachment: None,
                    status: Status::Available,
                    tags: req.tags.clone(),
                    sgs: req.security_groups.clone(),
                };
                let info = self.info(&e);
                self.enis.insert(e.id.clone(), e);
                Ok(Answer::Eni(Box::new(info)))
            }
            Op::Attach(eni, inst_id, device) => {
                let i = self
                    .instance_by_id(inst_id)
                    .ok_or_else(|| err(api, "InvalidInstanceID.NotFound", inst_id.clone()))?;
                let limits = self.limits_of(i);
                let on: Vec<u32> = self
                    .enis
                    .values()
                    .filter(|e| e.instance == Some(i))
                    .map(|e| e.device)
                    .collect();
                if on.len() as u32 >= limits.max_enis {
                    return Err(err(api, "AttachmentLimitExceeded", "ENI limit reached"));
                }
                if on.contains(device) {
                    return Err(err(api, "InvalidParameterValue", "device index in use"));
                }
                let n = self.next();
                let e = self.eni_mut(api, eni)?;
                if e.status != Status::Available {
                    return Err(err(api, "InvalidNetworkInterface.InUse", "attached"));
                }
                e.instance = Some(i);
                e.device = *device;
                e.status = Status::InUse;
                let att = format!("eni-attach-{n:012x}");
                e.attachment = Some(att.clone());
                Ok(Answer::Id(att))
            }
            Op::DeleteOnTermination => Ok(Answer::Unit(())),
            Op::Tag(eni, tags) => {
                let e = self
                    .enis
                    .get_mut(eni)
                    .ok_or_else(|| err(api, "InvalidNetworkInterfaceID.NotFound", eni.clone()))?;
                for (k, v) in tags {
                    e.tags.retain(|(a, _)| a != k);
                    e.tags.push((k.clone(), v.clone()));
                }
                Ok(Answer::Unit(()))
            }
            Op::Detach(att) => {
                let until = Instant::now() + Duration::from_secs_f64(self.params.detach_s);
                let e = self
                    .enis
                    .values_mut()
                    .find(|e| e.attachment.as_deref() == Some(att.as_str()))
                    .ok_or_else(|| err(api, "InvalidAttachmentID.NotFound", att.clone()))?;
                if e.device == 0 {
                    return Err(err(api, "OperationNotPermitted", "primary ENI"));
                }
                e.attachment = None;
                // Until the detach completes the instance keeps it (IMDS lists it, EC2
                // refuses to delete it); describes of attached ENIs no longer show it.
                if self.params.detach_s > 0.0 {
                    e.status = Status::Detaching(until);
                } else {
                    e.status = Status::Available;
                    e.instance = None;
                }
                Ok(Answer::Unit(()))
            }
            Op::Delete(id) => {
                let e = self.eni_mut(api, id)?;
                if e.status != Status::Available {
                    return Err(err(api, "InvalidNetworkInterface.InUse", "attached"));
                }
                let e = self.enis.remove(id).expect("there");
                let s = &mut self.subnets[e.subnet];
                s.free_ips.push(e.primary);
                s.free_ips.extend(e.ips);
                s.free_prefixes.extend(e.prefixes);
                Ok(Answer::Unit(()))
            }
            Op::AssignIps(id, count) => {
                let e = self
                    .enis
                    .get(id)
                    .ok_or_else(|| err(api, "InvalidNetworkInterfaceID.NotFound", id.clone()))?;
                let per = e
                    .instance
                    .map(|i| self.limits_of(i).ipv4_per_eni)
                    .unwrap_or(10);
                let held = 1 + e.ips.len() as u32 + e.prefixes.len() as u32;
                if held + count > per {
                    return Err(err(
                        api,
                        "PrivateIpAddressLimitExceeded",
                        "Number of private addresses will exceed limit.",
                    ));
                }
                let si = e.subnet;
                if self.subnets[si].available() < *count {
                    return Err(err(api, "InsufficientFreeAddressesInSubnet", "subnet full"));
                }
                let new: Vec<u32> = (0..*count).filter_map(|_| self.subnets[si].ip()).collect();
                self.enis.get_mut(id).expect("there").ips.extend(&new);
                Ok(Answer::Ips(new.into_iter().map(ip).collect()))
            }
            Op::AssignPrefixes(id, count) => {
                let e = self
                    .enis
                    .get(id)
                    .ok_or_else(|| err(api, "InvalidNetworkInterfaceID.NotFound", id.clone()))?;
                let per = e
                    .instance
                    .map(|i| self.limits_of(i).ipv4_per_eni)
                    .unwrap_or(10);
                let held = 1 + e.ips.len() as u32 + e.prefixes.len() as u32;
                if held + count > per {
                    return Err(err(api, "PrivateIpAddressLimitExceeded", "slots"));
                }
                let si = e.subnet;
                let mut new = Vec::new();
                for _ in 0..*count {
                    match self.subnets[si].prefix() {
                        Some(p) => new.push(p),
                        None => {
                            self.subnets[si].free_prefixes.extend(new);
                            return Err(err(api, "InsufficientCidrBlocks", "no free /28"));
                        }
                    }
                }
                self.enis.get_mut(id).expect("there").prefixes.extend(&new);
                Ok(Answer::Prefixes(
                    new.into_iter()
                        .map(|p| Ipv4Net {
                            addr: ip(p),
                            len: 28,
                        })
                        .collect(),
                ))
            }
            Op::UnassignIps(id, ips) => {
                let e = self.eni_mut(api, id)?;
                let gone: Vec<u32> = ips.iter().map(|a| u32::from(*a)).collect();
                let before = e.ips.len();
                e.ips.retain(|a| !gone.contains(a));
                let freed = before - e.ips.len();
                let si = e.subnet;
                if freed > 0 {
                    self.subnets[si]
                        .free_ips
                        .extend(gone.into_iter().take(freed));
                }
                Ok(Answer::Unit(()))
            }
            Op::UnassignPrefixes(id, ps) => {
                let e = self.eni_mut(api, id)?;
                let gone: Vec<u32> = ps.iter().map(|p| u32::from(p.addr)).collect();
                e.prefixes.retain(|a| !gone.contains(a));
                let si = e.subnet;
                self.subnets[si].free_prefixes.extend(gone);
                Ok(Answer::Unit(()))
            }
        }
    }
}

enum Op {
    Limits(String),
    InstanceEnis(String),
    Unattached(String, String),
    Subnets,
    Create(NewEni),
    Attach(String, String, u32),
    DeleteOnTermination,
    Tag(String, Vec<(String, String)>),
    Detach(String),
    Delete(String),
    AssignIps(String, u32),
    AssignPrefixes(String, u32),
    UnassignIps(String, Vec<Ipv4Addr>),
    UnassignPrefixes(String, Vec<Ipv4Net>),
}

enum Answer {
    Limits(Limits),
    Enis(Vec<EniInfo>),
    Subnets(Vec<SubnetInfo>),
    Eni(Box<EniInfo>),
    Id(String),
    Unit(()),
    Ips(Vec<Ipv4Addr>),
    Prefixes(Vec<Ipv4Net>),
}

pub type Shared = Arc<Mutex<Account>>;

/// One instance's view of the account: its EC2 client and its IMDS.
#[derive(Clone)]
pub struct NodeCloud {
    pub account: Shared,
    pub node: usize,
}

fn static_code(code: &str) -> &'static str {
    match code {
        "200" => "200",
        "RequestLimitExceeded" => "RequestLimitExceeded",
        "PrivateIpAddressLimitExceeded" => "PrivateIpAddressLimitExceeded",
        "AttachmentLimitExceeded" => "AttachmentLimitExceeded",
        "InsufficientFreeAddressesInSubnet" => "InsufficientFreeAddressesInSubnet",
        "InsufficientCidrBlocks" => "InsufficientCidrBlocks",
        "InvalidNetworkInterface.InUse" => "InvalidNetworkInterface.InUse",
        "InvalidNetworkInterfaceID.NotFound" => "InvalidNetworkInterfaceID.NotFound",
        _ => "error",
    }
}

impl NodeCloud {
    async fn call(&self, api: &'static str, op: Op) -> CloudResult<Answer> {
        let (admitted, latency) = self.account.lock().unwrap().admit(api);
        tokio::time::sleep(latency).await;
        let mut a = self.account.lock().unwrap();
        if !admitted {
            a.record(self.node as u32, api, "RequestLimitExceeded");
            return Err(err(api, "RequestLimitExceeded", "Request limit exceeded."));
        }
        let r = a.do_call(api, self.node, &op);
        let status = match &r {
            Ok(_) => "200",
            Err(e) => static_code(&e.code),
        };
        a.record(self.node as u32, api, status);
        r
    }
}

macro_rules! answer {
    ($r:expr, $v:ident) => {
        match $r? {
            Answer::$v(x) => Ok(x),
            _ => unreachable!("answer shape"),
        }
    };
}

#[async_trait]
impl Ec2 for NodeCloud {
    async fn instance_type_limits(&self, t: &str) -> CloudResult<Limits> {
        answer!(
            self.call("DescribeInstanceTypes", Op::Limits(t.into()))
                .await,
            Limits
        )
    }
    async fn instance_enis(&self, id: &str) -> CloudResult<Vec<EniInfo>> {
        answer!(
            self.call("DescribeNetworkInterfaces", Op::InstanceEnis(id.into()))
                .await,
            Enis
        )
    }
    async fn unattached_enis_tagged(&self, k: &str, v: &str) -> CloudResult<Vec<EniInfo>> {
        answer!(
            self.call(
                "DescribeNetworkInterfaces",
                Op::Unattached(k.into(), v.into())
            )
            .await,
            Enis
        )
    }
    async fn cni_subnets(&self, _vpc: &str) -> CloudResult<Vec<SubnetInfo>> {
        let _ = CNI_SUBNET_TAG;
        answer!(self.call("DescribeSubnets", Op::Subnets).await, Subnets)
    }
    async fn describe_subnet(&self, id: &str) -> CloudResult<SubnetInfo> {
        // Custom networking is not simulated: no scenario names an ENIConfig.
        Err(CloudError::new(
            "DescribeSubnets",
            "InvalidSubnetID.NotFound",
            format!("the simulator models no ENIConfig subnet ({id})"),
        ))
    }
    async fn create_eni(&self, req: &NewEni) -> CloudResult<EniInfo> {
        answer!(
            self.call("CreateNetworkInterface", Op::Create(req.clone()))
                .await,
            Eni
        )
        .map(|e| *e)
    }
    async fn attach_eni(&self, eni: &str, inst: &str, device: u32) -> CloudResult<String> {
        answer!(
            self.call(
                "AttachNetworkInterface",
                Op::Attach(eni.into(), inst.into(), device)
            )
            .await,
            Id
        )
    }
    async fn create_tags(&self, eni: &str, tags: &[(String, String)]) -> CloudResult<()> {
        answer!(
            self.call("CreateTags", Op::Tag(eni.into(), tags.to_vec()))
                .await,
            Unit
        )
    }
    async fn set_security_groups(&self, _: &str, _: &[String]) -> CloudResult<()> {
        // The model keeps no security groups: the same metered call, no state.
        answer!(
            self.call("ModifyNetworkInterfaceAttribute", Op::DeleteOnTermination)
                .await,
            Unit
        )
    }
    async fn set_delete_on_termination(&self, _: &str, _: &str) -> CloudResult<()> {
        answer!(
            self.call("ModifyNetworkInterfaceAttribute", Op::DeleteOnTermination)
                .await,
            Unit
        )
    }
    async fn detach_eni(&self, att: &str) -> CloudResult<()> {
        answer!(
            self.call("DetachNetworkInterface", Op::Detach(att.into()))
                .await,
            Unit
        )
    }
    async fn delete_eni(&self, id: &str) -> CloudResult<()> {
        answer!(
            self.call("DeleteNetworkInterface", Op::Delete(id.into()))
                .await,
            Unit
        )
    }
    async fn assign_ips(&self, id: &str, n: u32) -> CloudResult<Vec<Ipv4Addr>> {
        answer!(
            self.call("AssignPrivateIpAddresses", Op::AssignIps(id.into(), n))
                .await,
            Ips
        )
    }
    async fn assign_prefixes(&self, id: &str, n: u32) -> CloudResult<Vec<Ipv4Net>> {
        answer!(
            self.call("AssignPrivateIpAddresses", Op::AssignPrefixes(id.into(), n))
                .await,
            Prefixes
        )
    }
    async fn unassign_ips(&self, id: &str, ips: &[Ipv4Addr]) -> CloudResult<()> {
        answer!(
            self.call(
                "UnassignPrivateIpAddresses",
                Op::UnassignIps(id.into(), ips.to_vec())
            )
            .await,
            Unit
        )
    }
    async fn unassign_prefixes(&self, id: &str, ps: &[Ipv4Net]) -> CloudResult<()> {
        answer!(
            self.call(
                "UnassignPrivateIpAddresses",
                Op::UnassignPrefixes(id.into(), ps.to_vec())
            )
            .await,
            Unit
        )
    }
}

/// IMDS: unmetered, answers at once from the account's state.
#[async_trait]
impl Imds for NodeCloud {
    async fn instance(&self) -> CloudResult<InstanceMeta> {
        let a = self.account.lock().unwrap();
        let i = &a.instances[self.node];
        let p = &a.enis[&i.primary_eni];
        Ok(InstanceMeta {
            instance_id: i.id.clone(),
            instance_type: i.itype.clone(),
            availability_zone: i.az.clone(),
            primary_mac: p.mac.clone(),
            primary_ip: ip(p.primary),
        })
    }
    async fn enis(&self) -> CloudResult<Vec<EniInfo>> {
        let mut a = self.account.lock().unwrap();
        a.settle();
        let mut v = a.on_instance(self.node, true);
        for e in &mut v {
            // IMDS shows neither attachments nor tags.
            e.attachment_id = None;
            e.tags.clear();
        }
        Ok(v)
    }
}
