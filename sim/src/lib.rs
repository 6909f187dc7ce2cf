//! The fleet simulator: N nodes on one paused tokio clock, each running ipamd's real
//! engine (`ipamd_core::node::Node`: the same pool policy, datastore, checkpoint journal,
//! EC2 budget and reconcile code the daemon runs) or a model of upstream's ipamd, against
//! one in-process model of the account's EC2 and IMDS. Kubelet is modelled as far as
//! address latency needs: a pod's sandbox is set up through AddNetwork, and retried after
//! kubelet's back-off when the CNI fails it.

pub mod model;
pub mod ours;
pub mod report;
pub mod scenario;
pub mod upstream;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ipamd_core::net::Ipv4Net;
use tokio::time::Instant;

use model::{Account, Rng, Shared};
use scenario::Scenario;

pub fn parse_net(s: &str) -> Option<Ipv4Net> {
    ipamd_core::net::parse_cidr(s)
}

/// What a node offers kubelet.
#[async_trait]
pub trait PodApi: Send + Sync {
    /// AddNetwork: an address, or a failure (after the implementation's own wait).
    async fn add(&self, key: &str) -> bool;
    async fn del(&self, key: &str);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Impl {
    Ours,
    Upstream,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Ours => "ours",
            Impl::Upstream => "upstream model",
        }
    }
}

/// What happened to pods, as the run goes.
#[derive(Default)]
pub struct PodLog {
    /// Per pod: virtual ms from created to served.
    pub served_ms: Vec<u64>,
    /// Pods created and not served by the end.
    pub unserved: u64,
    /// (ms, +1 a pod starts waiting / -1 it is served) in order.
    pub waiting: Vec<(u64, i32)>,
    /// AddNetwork calls that failed (kubelet tried again).
    pub failed_adds: u64,
    /// Nodes whose instance could not launch (no address left in their subnet): their
    /// pods are never created.
    pub nodes_not_launched: u64,
}

impl PodLog {
    /// At the end: pods still waiting (inside an AddNetwork, or between kubelet's tries)
    /// are unserved too.
    fn closed(mut self) -> PodLog {
        let still: i64 = self.waiting.iter().map(|(_, d)| *d as i64).sum();
        self.unserved += still.max(0) as u64;
        self
    }
}

pub struct Run {
    pub account: Shared,
    pub pods: Arc<Mutex<PodLog>>,
    pub start: Instant,
}

impl Run {
    fn ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.start)
            .as_millis() as u64
    }
}

/// How a kubelet retries a pod's ADD: after `retry` (+ up to half of it), until `until`.
#[derive(Clone, Copy)]
struct Kubelet {
    retry: Duration,
    until: Instant,
}

/// One pod's life: created at its time, AddNetwork until served (kubelet's back-off
/// between failures), deleted when its time comes (or never).
async fn pod(
    run: Arc<Run>,
    api: Arc<dyn PodApi>,
    key: String,
    kubelet: Kubelet,
    seed: u64,
    hold: Option<Duration>,
    served_tx: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let Kubelet { retry, until } = kubelet;
    let t0 = Instant::now();
    run.pods.lock().unwrap().waiting.push((run.ms(), 1));
    let mut rng = Rng::new(seed);
    loop {
        if api.add(&key).await {
            break;
        }
        run.pods.lock().unwrap().failed_adds += 1;
        let wait = retry.mul_f64(1.0 + 0.5 * rng.f64());
        if Instant::now() + wait >= until {
            let mut p = run.pods.lock().unwrap();
            p.unserved += 1;
            let now = run.ms();
            p.waiting.push((now, -1));
            return;
        }
        tokio::time::sleep(wait).await;
    }
    {
        let mut p = run.pods.lock().unwrap();
        p.served_ms
            .push(Instant::now().saturating_duration_since(t0).as_millis() as u64);
        let now = run.ms();
        p.waiting.push((now, -1));
    }
    if let Some(tx) = served_tx {
        let _ = tx.send(());
    }
    if let Some(h) = hold {
        tokio::time::sleep(h).await;
        api.del(&key).await;
    }
}

/// A node's pods from its launch on: its waves, then the scenario's rollouts.
async fn workload(
    run: Arc<Run>,
    sc: Arc<Scenario>,
    api: Arc<dyn PodApi>,
    node: u32,
    launched: Instant,
    end: Instant,
) {
    let kubelet = Kubelet {
        retry: sc.secs(sc.kubelet_retry_s),
        until: end,
    };
    let mut rng = Rng::new(sc.seed ^ (node as u64).wrapping_mul(0x9E37_79B9));
    let mut tasks = Vec::new();
    // (created at, key) of pods that stay: the rollouts replace them.
    let mut staying: Vec<(Instant, String)> = Vec::new();
    let mut seq = 0u32;
    for (w, wave) in sc.waves.iter().enumerate() {
        let mut start = launched + sc.secs(wave.at_s);
        for r in 0..wave.repeat {
            for p in 0..wave.pods {
                let at = start
                    + sc.secs(if wave.pods > 1 {
                        wave.spread_s * p as f64 / (wave.pods - 1) as f64
                    } else {
                        0.0
                    });
                let key = format!("n{node}-w{w}-r{r}-p{p}");
                seq += 1;
                let hold = (wave.hold_s > 0.0).then(|| sc.secs(wave.hold_s));
                if hold.is_none() {
                    staying.push((at, key.clone()));
                }
                let (run, api, seed) = (run.clone(), api.clone(), rng.next_u64());
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    pod(run, api, key, kubelet, seed, hold, None).await;
                }));
            }
            start += sc.secs(wave.spread_s + wave.hold_s + wave.gap_s);
        }
    }
    let _ = seq;
    for (ri, ro) in sc.rollouts.iter().enumerate() {
        let at = run.start + sc.secs(ro.at_s);
        tokio::time::sleep_until(at).await;
        let alive: Vec<String> = staying
            .iter()
            .filter(|(t, _)| *t <= at)
            .map(|(_, k)| k.clone())
            .collect();
        staying.retain(|(t, _)| *t > at);
        let n = alive.len().max(1) as f64;
        for (i, old) in alive.into_iter().enumerate() {
            let when = at + sc.secs(ro.spread_s * i as f64 / n);
            tokio::time::sleep_until(when).await;
            let key = format!("{old}-ro{ri}");
            staying.push((when, key.clone()));
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (run2, api2, seed) = (run.clone(), api.clone(), rng.next_u64());
            tasks.push(tokio::spawn(pod(
                run2,
                api2,
                key,
                kubelet,
                seed,
                None,
                Some(tx),
            )));
            // maxUnavailable 0: the old pod goes once the new one runs.
            let _ = rx.await;
            api.del(&old).await;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// One node's pods of the scenario against any AddNetwork / DelNetwork (a real ipamd
/// over its socket, in the emulator check), on the current runtime's clock, until the
/// scenario's end: what happened to them.
pub async fn drive(sc: Arc<Scenario>, api: Arc<dyn PodApi>, account: Shared) -> PodLog {
    let start = Instant::now();
    let end = start + sc.secs(sc.duration_s);
    let run = Arc::new(Run {
        account,
        pods: Arc::new(Mutex::new(PodLog::default())),
        start,
    });
    tokio::select! {
        _ = workload(run.clone(), sc, api, 0, start, end) => {}
        _ = tokio::time::sleep_until(end) => {}
    }
    tokio::time::sleep_until(end).await;
    std::mem::take(&mut *run.pods.lock().unwrap()).closed()
}

/// Runs the scenario with one implementation on the current (paused) runtime.
pub async fn run(sc: Arc<Scenario>, which: Impl, store: &std::path::Path) -> report::Outcome {
    let wall = std::time::Instant::now();
    let vpc: Vec<Ipv4Net> = sc.vpc_cidrs.iter().filter_map(|c| parse_net(c)).collect();
    let mut account = Account::new(sc.ec2.clone(), sc.seed, vpc);
    let mut node_subnets = Vec::new();
    for s in &sc.subnets {
        let i = account.add_subnet(parse_net(&s.cidr).expect("checked"), &s.az, s.tagged);
        if s.nodes {
            node_subnets.push(i);
        }
    }
    let account: Shared = Arc::new(Mutex::new(account));
    let start = Instant::now();
    let end = start + sc.secs(sc.duration_s);
    let run = Arc::new(Run {
        account: account.clone(),
        pods: Arc::new(Mutex::new(PodLog::default())),
        start,
    });
    let sampler = tokio::spawn(report::sample(run.clone(), sc.clone(), end));
    let mut nodes = Vec::new();
    for n in 0..sc.nodes {
        let at = start
            + sc.secs(
                sc.join.at_s
                    + if sc.nodes > 1 {
                        sc.join.over_s * n as f64 / (sc.nodes - 1) as f64
                    } else {
                        0.0
                    },
            );
        let (run, sc, account) = (run.clone(), sc.clone(), account.clone());
        let subnet = node_subnets[n as usize % node_subnets.len()];
        let dir = store.join(format!("node-{n}"));
        nodes.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let launched = account.lock().unwrap().launch(&sc.instance_type, subnet);
            let Ok(idx) = launched else {
                run.pods.lock().unwrap().nodes_not_launched += 1;
                return;
            };
            let cloud = model::NodeCloud {
                account: account.clone(),
                node: idx,
            };
            let api: Arc<dyn PodApi> = match which {
                Impl::Ours => ours::start(&sc, cloud, &dir).await,
                Impl::Upstream => upstream::start(&sc, cloud).await,
            };
            tokio::select! {
                _ = workload(run, sc, api, n, Instant::now(), end) => {}
                _ = tokio::time::sleep_until(end) => {}
            }
        }));
    }
    tokio::time::sleep_until(end).await;
    // Pods still waiting at the end count as unserved.
    let series = sampler.await.unwrap_or_default();
    for n in nodes {
        n.abort();
    }
    let pods = std::mem::take(&mut *run.pods.lock().unwrap()).closed();
    let log = std::mem::take(&mut account.lock().unwrap().log);
    let (enis, addrs) = account.lock().unwrap().totals();
    report::Outcome::new(which, &sc, pods, log, series, enis, addrs, wall.elapsed())
}

/// Both implementations, each on a fresh paused runtime of its own.
pub fn run_paused(sc: &Scenario, which: Impl) -> report::Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    ipamd_core::budget::seed_jitter(sc.seed);
    let dir = tempfile::Builder::new()
        .prefix("vpc-cni-sim")
        .tempdir_in(store_root())
        .expect("a directory for the nodes' checkpoints");
    let sc = Arc::new(sc.clone());
    let out = rt.block_on(run(sc, which, dir.path()));
    drop(rt);
    out
}

/// Checkpoints live on tmpfs (as /var/run on a node): written inline, no writer thread.
fn store_root() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

pub fn counts(log: &[model::Call]) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for c in log {
        *m.entry(c.api).or_default() += 1;
    }
    m
}
