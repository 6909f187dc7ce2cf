//! Every EC2 call goes through a client-side budget: token buckets per call family,
//! metered as EC2 meters an account (mutating calls 100 burst / 5 per s, ENI
//! lifecycle 50 / 5 per s, describes 100 / 20 per s), exponential backoff with jitter
//! on throttling, and a count of every call and error per action.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

use async_trait::async_trait;

use crate::cloud::{CloudResult, Ec2, EniInfo, NewEni, SubnetInfo};
use crate::net::Ipv4Net;
use crate::pool::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    Describe,
    AssignUnassign,
    EniLifecycle,
}

#[derive(Debug)]
struct Bucket {
    capacity: f64,
    per_sec: f64,
    /// The refill rate the family starts at and recovers to.
    base_per_sec: f64,
    tokens: f64,
    at: Instant,
    /// When EC2 last throttled the family.
    throttled_at: Option<Instant>,
}

impl Bucket {
    fn new(capacity: f64, per_sec: f64) -> Self {
        Bucket {
            capacity,
            per_sec,
            base_per_sec: per_sec,
            tokens: capacity,
            at: Instant::now(),
            throttled_at: None,
        }
    }

    /// EC2 throttled the family: nothing left, and half the rate (down to a tenth):
    /// a fleet sharing one account's bucket backs off together instead of retrying at
    /// each node's full rate (the AWS SDKs' adaptive retry mode does the same).
    fn throttled(&mut self, now: Instant) {
        self.tokens = 0.0;
        self.at = now;
        self.throttled_at = Some(now);
        self.per_sec = (self.per_sec / 2.0).max(self.base_per_sec / 10.0);
    }

    /// A call of the family went through: the rate recovers by a fifth of its base.
    fn succeeded(&mut self) {
        self.per_sec = (self.per_sec + self.base_per_sec / 5.0).min(self.base_per_sec);
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let dt = now.duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            // At least a millisecond, tokio's timer tick: a shorter sleep ends in the same
            // tick, the bucket has not refilled, and on a paused clock (the simulator) the
            // caller would spin at one instant forever.
            Some(
                Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec)
                    .max(Duration::from_millis(1)),
            )
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CallStats {
    pub calls: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub throttled: u64,
    pub waited_ms: u64,
    /// Per (action, failed, status): calls and their summed latency in µs. `status` is
    /// "200" for a success, else EC2's error code.
    pub latency: BTreeMap<(String, bool, String), (u64, u64)>,
    /// The last `LOG_LEN` calls in the order they were sent.
    pub log: std::collections::VecDeque<CallRecord>,
}

/// One call as sent: when (ms since the budget was made), the action, and "200" or
/// EC2's error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub at_ms: u64,
    pub api: String,
    pub status: String,
}

tokio::task_local! {
    /// The attempts a call made inside `at_most` gets, instead of the budget's.
    static ATTEMPTS: u32;
}

/// Runs `f` with every EC2 call in it tried at most `attempts` times: for calls that are
/// only due (a periodic describe, a sweep), which the next pass makes anyway. Retrying
/// them through throttling spends the account's bucket that the calls pods wait for need
/// (5,000 simulated nodes: six attempts of each periodic describe held the describe
/// bucket at empty).
pub async fn at_most<F: std::future::Future>(attempts: u32, f: F) -> F::Output {
    ATTEMPTS.scope(attempts.max(1), f).await
}

/// How many calls the log keeps.
pub const LOG_LEN: usize = 1000;

/// A family's bucket as it is now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketView {
    pub family: Family,
    pub tokens: f64,
    pub capacity: f64,
    pub per_sec: f64,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Describe => "describe",
            Family::AssignUnassign => "assign-unassign",
            Family::EniLifecycle => "eni-lifecycle",
        }
    }
}

impl CallStats {
    pub fn total_calls(&self) -> u64 {
        self.calls.values().sum()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BudgetConfig {
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            max_attempts: 6,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

pub struct Budgeted<E> {
    inner: E,
    born: Instant,
    buckets: Mutex<BTreeMap<Family, Bucket>>,
    stats: Mutex<CallStats>,
    cfg: BudgetConfig,
}

impl<E: Ec2> Budgeted<E> {
    /// The client calls go to, behind the budget.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    pub fn new(inner: E, cfg: BudgetConfig) -> Self {
        let mut b = BTreeMap::new();
        b.insert(Family::Describe, Bucket::new(100.0, 20.0));
        b.insert(Family::AssignUnassign, Bucket::new(100.0, 5.0));
        b.insert(Family::EniLifecycle, Bucket::new(50.0, 5.0));
        Budgeted {
            inner,
            born: Instant::now(),
            buckets: Mutex::new(b),
            stats: Mutex::new(CallStats::default()),
            cfg,
        }
    }

    pub fn stats(&self) -> CallStats {
        self.stats.lock().unwrap().clone()
    }

    /// Tokens left in each family's bucket, refilled up to now.
    pub fn buckets(&self) -> Vec<BucketView> {
        let now = Instant::now();
        self.buckets
            .lock()
            .unwrap()
            .iter()
            .map(|(f, b)| {
                let dt = now.saturating_duration_since(b.at).as_secs_f64();
                BucketView {
                    family: *f,
                    tokens: (b.tokens + dt * b.per_sec).min(b.capacity),
                    capacity: b.capacity,
                    per_sec: b.per_sec,
                }
            })
            .collect()
    }

    async fn acquire(&self, fam: Family) {
        loop {
            let wait = self
                .buckets
                .lock()
                .unwrap()
                .get_mut(&fam)
                .expect("bucket")
                .take(Instant::now());
            match wait {
                None => return,
                Some(d) => {
                    self.stats.lock().unwrap().waited_ms += d.as_millis() as u64;
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    fn drain(&self, fam: Family) {
        if let Some(b) = self.buckets.lock().unwrap().get_mut(&fam) {
            b.throttled(Instant::now());
        }
    }

    async fn call<T, F, Fut>(&self, api: &str, fam: Family, f: F) -> CloudResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = CloudResult<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.acquire(fam).await;
            *self
                .stats
                .lock()
                .unwrap()
                .calls
                .entry(api.to_string())
                .or_default() += 1;
            let t0 = Instant::now();
            let res = f().await;
            let us = t0.elapsed().as_micros() as u64;
            {
                let mut st = self.stats.lock().unwrap();
                let status = match &res {
                    Ok(_) => "200".to_string(),
                    Err(e) => e.code.clone(),
                };
                let l = st
                    .latency
                    .entry((api.to_string(), res.is_err(), status))
                    .or_default();
                l.0 += 1;
                l.1 += us;
                if st.log.len() == LOG_LEN {
                    st.log.pop_front();
                }
                let at_ms = t0.saturating_duration_since(self.born).as_millis() as u64;
                st.log.push_back(CallRecord {
                    at_ms,
                    api: api.to_string(),
                    status: match &res {
                        Ok(_) => "200".to_string(),
                        Err(e) => e.code.clone(),
                    },
                });
            }
            match res {
                Ok(v) => {
                    if let Some(b) = self.buckets.lock().unwrap().get_mut(&fam) {
                        b.succeeded();
                    }
                    return Ok(v);
                }
                Err(e) => {
                    *self
                        .stats
                        .lock()
                        .unwrap()
                        .errors
                        .entry(api.to_string())
                        .or_default() += 1;
                    // Counted and drained on the last attempt too (a call tried once
                    // inside `at_most` is throttled like any other).
                    if e.is_throttle() {
                        self.stats.lock().unwrap().throttled += 1;
                        // EC2 says the account is over budget: stop spending this family.
                        self.drain(fam);
                    }
                    let max = ATTEMPTS.try_with(|n| *n).unwrap_or(self.cfg.max_attempts);
                    if !e.is_transient() || attempt >= max {
                        return Err(e);
                    }
                    let exp = self
                        .cfg
                        .base_backoff
                        .saturating_mul(1 << (attempt - 1).min(16));
                    let cap = exp.min(self.cfg.max_backoff);
                    let jitter = jitter_fraction();
                    tokio::time::sleep(cap.mul_f64(0.5 + jitter / 2.0)).await;
                }
            }
        }
    }
}

/// A cheap jitter in [0, 1) without a random-number crate: one xorshift sequence per
/// process (seeded from the time of day; the simulator seeds it to repeat a run).
static JITTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn seed_jitter(seed: u64) {
    JITTER.store(seed | 1, std::sync::atomic::Ordering::Relaxed);
}

fn jitter_fraction() -> f64 {
    use std::sync::atomic::Ordering::Relaxed;
    let mut x = JITTER.load(Relaxed);
    if x == 0 {
        x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    JITTER.store(x, Relaxed);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[async_trait]
impl<E: Ec2> Ec2 for Budgeted<E> {
    fn eni_calls_throttled_ago(&self) -> Option<Duration> {
        let at = self.buckets.lock().unwrap()[&Family::EniLifecycle].throttled_at?;
        Some(Instant::now().saturating_duration_since(at))
    }
    async fn instance_type_limits(&self, t: &str) -> CloudResult<Limits> {
        self.call("DescribeInstanceTypes", Family::Describe, || {
            self.inner.instance_type_limits(t)
        })
        .await
    }
    async fn instance_enis(&self, id: &str) -> CloudResult<Vec<EniInfo>> {
        self.call("DescribeNetworkInterfaces", Family::Describe, || {
            self.inner.instance_enis(id)
        })
        .await
    }
    async fn unattached_enis_tagged(&self, k: &str, v: &str) -> CloudResult<Vec<EniInfo>> {
        self.call("DescribeNetworkInterfaces", Family::Describe, || {
            self.inner.unattached_enis_tagged(k, v)
        })
        .await
    }
    async fn cni_subnets(&self, vpc: &str) -> CloudResult<Vec<SubnetInfo>> {
        self.call("DescribeSubnets", Family::Describe, || {
            self.inner.cni_subnets(vpc)
        })
        .await
    }
    async fn describe_subnet(&self, id: &str) -> CloudResult<SubnetInfo> {
        self.call("DescribeSubnets", Family::Describe, || {
            self.inner.describe_subnet(id)
        })
        .await
    }
    async fn create_eni(&self, req: &NewEni) -> CloudResult<EniInfo> {
        self.call("CreateNetworkInterface", Family::EniLifecycle, || {
            self.inner.create_eni(req)
        })
        .await
    }
    async fn attach_eni(&self, e: &str, i: &str, d: u32) -> CloudResult<String> {
        self.call("AttachNetworkInterface", Family::EniLifecycle, || {
            self.inner.attach_eni(e, i, d)
        })
        .await
    }
    async fn set_delete_on_termination(&self, e: &str, a: &str) -> CloudResult<()> {
        self.call(
            "ModifyNetworkInterfaceAttribute",
            Family::EniLifecycle,
            || self.inner.set_delete_on_termination(e, a),
        )
        .await
    }
    async fn set_security_groups(&self, e: &str, g: &[String]) -> CloudResult<()> {
        self.call(
            "ModifyNetworkInterfaceAttribute",
            Family::EniLifecycle,
            || self.inner.set_security_groups(e, g),
        )
        .await
    }
    async fn create_tags(&self, e: &str, t: &[(String, String)]) -> CloudResult<()> {
        self.call("CreateTags", Family::EniLifecycle, || {
            self.inner.create_tags(e, t)
        })
        .await
    }
    async fn detach_eni(&self, a: &str) -> CloudResult<()> {
        self.call("DetachNetworkInterface", Family::EniLifecycle, || {
            self.inner.detach_eni(a)
        })
        .await
    }
    async fn delete_eni(&self, e: &str) -> CloudResult<()> {
        self.call("DeleteNetworkInterface", Family::EniLifecycle, || {
            self.inner.delete_eni(e)
        })
        .await
    }
    async fn assign_ips(&self, e: &str, n: u32) -> CloudResult<Vec<Ipv4Addr>> {
        self.call("AssignPrivateIpAddresses", Family::AssignUnassign, || {
            self.inner.assign_ips(e, n)
        })
        .await
    }
    async fn assign_prefixes(&self, e: &str, n: u32) -> CloudResult<Vec<Ipv4Net>> {
        self.call("AssignPrivateIpAddresses", Family::AssignUnassign, || {
            self.inner.assign_prefixes(e, n)
        })
        .await
    }
    async fn unassign_ips(&self, e: &str, ips: &[Ipv4Addr]) -> CloudResult<()> {
        self.call("UnassignPrivateIpAddresses", Family::AssignUnassign, || {
            self.inner.unassign_ips(e, ips)
        })
        .await
    }
    async fn unassign_prefixes(&self, e: &str, p: &[Ipv4Net]) -> CloudResult<()> {
        self.call("UnassignPrivateIpAddresses", Family::AssignUnassign, || {
            self.inner.unassign_prefixes(e, p)
        })
        .await
    }
    async fn assign_ipv6_prefixes(&self, e: &str, n: u32) -> CloudResult<Vec<crate::net::Ipv6Net>> {
        self.call("AssignIpv6Addresses", Family::AssignUnassign, || {
            self.inner.assign_ipv6_prefixes(e, n)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nearly_full_token_is_waited_for_a_whole_timer_tick() {
        // Found by the simulator: (1 - tokens) / rate was a few ns, a sleep that ends in
        // the same tick without refilling anything, so a paused clock never advanced.
        let t0 = Instant::now();
        let mut b = Bucket {
            capacity: 50.0,
            per_sec: 5.0,
            base_per_sec: 5.0,
            tokens: 1.0 - 1e-12,
            at: t0,
            throttled_at: None,
        };
        let d = b.take(t0).expect("less than one token");
        assert!(d >= Duration::from_millis(1), "{d:?}");
        assert_eq!(b.take(t0 + d), None, "refilled after the wait");
    }

    #[test]
    fn a_throttled_family_halves_its_rate_to_a_tenth_and_recovers_by_fifths() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 20.0);
        b.throttled(t0);
        assert_eq!(b.tokens, 0.0);
        assert_eq!(b.per_sec, 10.0);
        for _ in 0..10 {
            b.throttled(t0);
        }
        assert_eq!(b.per_sec, 2.0, "floor: a tenth of the base");
        b.succeeded();
        assert_eq!(b.per_sec, 6.0);
        for _ in 0..10 {
            b.succeeded();
        }
        assert_eq!(b.per_sec, 20.0, "never above the base");
        // The halved rate is what refills: one token after 1/2 s at 2/s.
        b.throttled(t0);
        b.per_sec = 2.0;
        let wait = b.take(t0).expect("empty");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2.0, 5.0);
        b.at = t0;
        assert!(b.take(t0).is_none());
        assert!(b.take(t0).is_none());
        let wait = b.take(t0).expect("empty");
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-6, "{wait:?}");
        assert!(b.take(t0 + Duration::from_millis(200)).is_none());
    }
}
