//! The emulated VPC lab: a "fabric" namespace that is the VPC's router, N "node"
//! namespaces whose ENIs are veths into the fabric carrying the MACs EC2 (the emulator)
//! reports, and an "internet" host outside the VPC. The fabric follows EC2 as the real VPC
//! does: each ENI attached to a node appears as a link, and every address EC2 assigns to an
//! ENI (secondary IPs, /28 prefixes) is routed to the node holding it; detached ENIs and
//! released addresses disappear. Seeded `--ipv6`, the VPC is dual-stack: each node's
//! primary ENI carries its IPv6 address too (a /128 with the fabric's `fe80::1` as its
//! gateway, as an instance learns its router from RAs), and each IPv6 /80 prefix is routed
//! to the node holding it; the internet host has an IPv6 address as well.
//!
//! The caller's thread runs inside the fabric namespace (`Lab::run`), with the emulator;
//! each node runs the real `aws-vpc-cni` entrypoint (which starts ipamd and writes the
//! conflist) and containerd with its CRI plugin, both inside the node's namespace.
//! IMDS answers each node for its own instance (the emulator looks at the caller's
//! address, as each real instance reaches its own IMDS).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ec2_emulator_sdk_check::{Emulator, sdk_config};

use crate::containerd::{Containerd, spawn_in_netns};
use crate::cri::Cri;
use crate::netns::sh;

/// Where nodes reach the emulator (EC2 and IMDS): an address of the fabric.
pub const EMULATOR_ADDR: &str = "100.64.0.1";
/// The internet host, outside the VPC, and the fabric's address on its link.
pub const INTERNET_ADDR: &str = "203.0.113.10";
const INTERNET_GW: &str = "203.0.113.1";
/// The internet host's IPv6 address (a documentation prefix, outside the VPC's block).
pub const INTERNET6_ADDR: &str = "2001:db8:ff::10";
const INTERNET6_GW: &str = "2001:db8:ff::1";
/// The VPC router's address on every ENI's link, the nodes' IPv6 gateway.
const ROUTER6: &str = "fe80::1";

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A workspace binary: `target/debug/<name>`, or `target/release/<name>` with
/// `VPC_CNI_PROFILE=release` (benchmarks).
fn bin(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = std::env::var("VPC_CNI_PROFILE").unwrap_or_else(|_| "debug".into());
    let p = target.join(&profile).join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build{} --workspace --bins` first",
        p.display(),
        if profile == "release" {
            " --release"
        } else {
            ""
        }
    );
    p
}

/// An ENI as EC2 shows it, attached to a lab node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniView {
    pub id: String,
    pub instance: String,
    pub device: i32,
    pub mac: String,
    pub primary_ip: Ipv4Addr,
    pub subnet_id: String,
    /// Secondary IPs, and every address of each /28.
    pub addresses: Vec<Ipv4Addr>,
    /// The ENI's own IPv6 addresses, and its delegated /80s.
    pub ipv6: Vec<Ipv6Addr>,
    pub ipv6_prefixes: Vec<(Ipv6Addr, u8)>,
}

pub struct LabNode {
    pub index: usize,
    /// Its network namespace's name.
    pub ns: String,
    pub instance: String,
    pub primary_ip: Ipv4Addr,
    pub dir: PathBuf,
    entrypoint: Option<Child>,
    pub containerd: Option<Containerd>,
}

impl LabNode {
    pub fn ns_path(&self) -> String {
        format!("/var/run/netns/{}", self.ns)
    }
    pub fn ipamd_socket(&self) -> PathBuf {
        self.dir.join("run/ipamd.sock")
    }
    pub fn introspection(&self) -> String {
        format!("unix:{}", self.dir.join("run/introspection.sock").display())
    }
    pub fn conflist(&self) -> PathBuf {
        self.dir.join("cni/net.d/10-aws.conflist")
    }
    pub fn ipamd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ipamd.log")).unwrap_or_default()
    }
    /// Runs a command in the node's namespace (output, or panics).
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.ns];
        full.extend_from_slice(args);
        sh(&full)
    }
    pub async fn cri(&self) -> Cri {
        Cri::connect(&self.containerd.as_ref().expect("containerd").socket)
            .await
            .unwrap()
    }
    /// The pid of ipamd (the entrypoint's child).
    pub fn ipamd_pid(&self) -> Option<i32> {
        let pid = self.entrypoint.as_ref()?.id();
        let out = Command::new("pgrep")
            .args(["-P", &pid.to_string(), "-x", "ipamd"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }
}

pub struct Lab {
    pub id: String,
    pub fabric: String,
    pub internet: String,
    pub emu: Emulator,
    pub ec2: aws_sdk_ec2::Client,
    pub nodes: Vec<LabNode>,
    pub subnets: BTreeMap<String, (Ipv4Addr, u8)>,
    pub dir: tempfile::TempDir,
    follow: Arc<AtomicBool>,
    follower: Option<std::thread::JoinHandle<()>>,
    /// Knobs for every node's ipamd.
    pub knobs: Vec<(String, String)>,
    cni_before: BTreeSet<String>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// For a last-resort cleanup by whoever started us (`scripts/run`, if the demo is killed
/// before it can clean up): each namespace the lab makes is appended to the file
/// `$VPC_CNI_LAB_STATE` names, as `netns <name>`, and the pod namespaces that existed
/// before it as `cni-before <name>`. Everything the lab starts lives in those namespaces.
pub fn note_state(kind: &str, value: &str) {
    use std::io::Write;
    if let Ok(path) = std::env::var("VPC_CNI_LAB_STATE")
        && let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path)
    {
        let _ = writeln!(f, "{kind} {value}");
    }
}

/// One lab at a time per process: two cores, and pod namespaces are told apart by name.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cni_netns() -> BTreeSet<String> {
    std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cni-"))
        .collect()
}

fn cidr_of(s: &str) -> (Ipv4Addr, u8) {
    let (a, l) = s.split_once('/').unwrap();
    (a.parse().unwrap(), l.parse().unwrap())
}

fn gateway(net: (Ipv4Addr, u8)) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.0) + 1)
}

/// Creates the fabric namespace, enters it on this thread, runs `f` on a runtime whose
/// threads live there, and removes everything afterwards (also when `f` panics).
pub fn in_fabric<F: std::future::Future<Output = ()>>(f: impl FnOnce(String) -> F) {
    let name = format!(
        "lab-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let home = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
    sh(&["ip", "netns", "add", &name]);
    note_state("netns", &name);
    struct Back(std::fs::File, String);
    impl Drop for Back {
        fn drop(&mut self) {
            let _ = nix::sched::setns(&self.0, nix::sched::CloneFlags::CLONE_NEWNET);
            let _ = Command::new("ip").args(["netns", "del", &self.1]).output();
        }
    }
    let _back = Back(home, name.clone());
    let ns = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    sh(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    sh(&[
        "ip",
        "addr",
        "add",
        &format!("{EMULATOR_ADDR}/32"),
        "dev",
        "lo",
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(f(name));
}

impl Lab {
    /// Seeds `nodes` instances of `instance_type` and brings each node up: its namespace,
    /// its primary ENI, the entrypoint (ipamd) and containerd. Call inside `in_fabric`.
    pub async fn start(
        fabric: &str,
        nodes: usize,
        instance_type: &str,
        knobs: &[(&str, &str)],
    ) -> Lab {
        let t0 = Instant::now();
        let mut lab = Lab::fabric(fabric, nodes, instance_type, knobs).await;
        for i in 0..lab.nodes.len() {
            lab.start_node(i);
            eprintln!("lab: node{} started in {:?}", i + 1, t0.elapsed());
        }
        for n in &lab.nodes {
            let t0 = Instant::now();
            while !n.conflist().exists() {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "node{}: no conflist after 60 s\n{}",
                    n.index,
                    n.ipamd_log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        eprintln!("lab: every node's conflist written in {:?}", t0.elapsed());
        lab
    }

    /// `start`, the emulator seeded with these arguments too (`--ipv6`: dual-stack).
    pub async fn start_seeded(
        fabric: &str,
        nodes: usize,
        instance_type: &str,
        knobs: &[(&str, &str)],
        seed: &[&str],
    ) -> Lab {
        let t0 = Instant::now();
        let mut lab = Lab::fabric_seeded(fabric, nodes, instance_type, knobs, seed).await;
        for i in 0..lab.nodes.len() {
            lab.start_node(i);
        }
        for n in &lab.nodes {
            while !n.conflist().exists() {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "node{}: no conflist after 60 s\n{}",
                    n.index,
                    n.ipamd_log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        eprintln!("lab: every node's conflist written in {:?}", t0.elapsed());
        lab
    }

    /// The VPC without anything running on its nodes: the emulator with `nodes` instances
    /// of `instance_type`, the fabric following EC2, each node's namespace with its primary
    /// ENI, the internet host. (`start` then runs the entrypoint and containerd on each;
    /// the cluster runs kubelet instead.)
    pub async fn fabric(
        fabric: &str,
        nodes: usize,
        instance_type: &str,
        knobs: &[(&str, &str)],
    ) -> Lab {
        Lab::fabric_seeded(fabric, nodes, instance_type, knobs, &[]).await
    }

    /// `fabric`, the emulator seeded with these arguments too (`emulator seed --help`).
    pub async fn fabric_seeded(
        fabric: &str,
        nodes: usize,
        instance_type: &str,
        knobs: &[(&str, &str)],
        seed: &[&str],
    ) -> Lab {
        let t0 = Instant::now();
        let emu = Emulator::start_on("0.0.0.0");
        eprintln!("lab: emulator up in {:?}", t0.elapsed());
        let count = nodes.to_string();
        let mut args = vec!["--type", instance_type, "--count", &count];
        args.extend_from_slice(seed);
        let ids = emu.seed(&args);
        assert_eq!(ids.len(), nodes, "seeded {ids:?}");
        let conf = sdk_config(&emu.endpoint, "us-west-2").await;
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let subs = ec2.describe_subnets().send().await.unwrap();
        let subnets: BTreeMap<String, (Ipv4Addr, u8)> = subs
            .subnets()
            .iter()
            .map(|s| {
                (
                    s.subnet_id().unwrap().to_string(),
                    cidr_of(s.cidr_block().unwrap()),
                )
            })
            .collect();
        let id = fabric.trim_start_matches("lab-").to_string();
        let internet = format!("inet-{id}");
        sh(&["ip", "netns", "add", &internet]);
        note_state("netns", &internet);
        let iv = format!("fi-{}", SEQ.fetch_add(1, Ordering::Relaxed));
        sh(&[
            "ip", "link", "add", &iv, "type", "veth", "peer", "name", "tmp-inet",
        ]);
        sh(&["ip", "link", "set", "tmp-inet", "netns", &internet]);
        let inet = |args: &[&str]| {
            let mut full = vec!["ip", "-n", &internet];
            full.extend_from_slice(args);
            sh(&full);
        };
        inet(&["link", "set", "lo", "up"]);
        inet(&["link", "set", "tmp-inet", "name", "eth0"]);
        inet(&["addr", "add", &format!("{INTERNET_ADDR}/24"), "dev", "eth0"]);
        inet(&["link", "set", "eth0", "up"]);
        inet(&["route", "add", "default", "via", INTERNET_GW]);
        inet(&[
            "-6",
            "addr",
            "add",
            &format!("{INTERNET6_ADDR}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        inet(&["-6", "route", "add", "default", "via", INTERNET6_GW]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{INTERNET_GW}/24"),
            "dev",
            &iv,
        ]);
        sh(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{INTERNET6_GW}/64"),
            "dev",
            &iv,
            "nodad",
        ]);
        sh(&["ip", "link", "set", &iv, "up"]);
        let dir = tempfile::tempdir().unwrap();
        let serial = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
        let mut lab = Lab {
            cni_before: cni_netns(),
            _serial: serial,
            id,
            fabric: fabric.to_string(),
            internet,
            emu,
            ec2,
            nodes: Vec::new(),
            subnets,
            dir,
            follow: Arc::new(AtomicBool::new(true)),
            follower: None,
            knobs: knobs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for (i, instance) in ids.iter().enumerate() {
            let ns = format!("node{}-{}", i + 1, lab.id);
            sh(&["ip", "netns", "add", &ns]);
            note_state("netns", &ns);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            let dir = lab.dir.path().join(format!("node{}", i + 1));
            std::fs::create_dir_all(&dir).unwrap();
            lab.nodes.push(LabNode {
                index: i + 1,
                ns,
                instance: instance.clone(),
                primary_ip: Ipv4Addr::UNSPECIFIED,
                dir,
                entrypoint: None,
                containerd: None,
            });
        }
        // The primary ENIs, then the fabric follows EC2 on its own.
        let enis = lab.enis().await;
        lab.converge(&enis);
        for n in &mut lab.nodes {
            let p = enis
                .iter()
                .find(|e| e.instance == n.instance && e.device == 0)
                .expect("primary ENI");
            n.primary_ip = p.primary_ip;
        }
        lab.start_follower();
        eprintln!(
            "lab: fabric and {} nodes in {:?}",
            lab.nodes.len(),
            t0.elapsed()
        );
        lab
    }

    fn node_env(&self, n: &LabNode) -> Vec<(String, String)> {
        let endpoint = format!("http://{EMULATOR_ADDR}:{}", self.emu.port);
        let run = n.dir.join("run");
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            ("AWS_ENDPOINT_URL_EC2".into(), endpoint.clone()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
                format!("{endpoint}/"),
            ),
            ("AWS_REGION".into(), "us-west-2".into()),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            (
                "AWS_VPC_K8S_CNI_BACKING_STORE".into(),
                run.join("ipam.json").display().to_string(),
            ),
            (
                "IPAMD_SOCKET".into(),
                run.join("ipamd.sock").display().to_string(),
            ),
            ("INTROSPECTION_BIND_ADDRESS".into(), n.introspection()),
            (
                "IPAMD_METRICS_BIND_ADDRESS".into(),
                format!("unix:{}", run.join("metrics.sock").display()),
            ),
            (
                "HOST_CNI_BIN_PATH".into(),
                n.dir.join("cni/bin").display().to_string(),
            ),
            (
                "HOST_CNI_CONFDIR_PATH".into(),
                n.dir.join("cni/net.d").display().to_string(),
            ),
            (
                "CNI_PLUGIN_SOURCE_DIR".into(),
                bin("aws-cni").parent().unwrap().display().to_string(),
            ),
            ("IPAMD_BIN".into(), bin("ipamd").display().to_string()),
            (
                "AWS_VPC_K8S_PLUGIN_LOG_FILE".into(),
                n.dir.join("plugin.log").display().to_string(),
            ),
            ("AWS_VPC_K8S_CNI_LOGLEVEL".into(), "DEBUG".into()),
            ("IPAMD_POOL_INTERVAL_MS".into(), "200".into()),
            ("IPAMD_SHRINK_INTERVAL_MS".into(), "500".into()),
            ("IPAMD_ENI_MIN_AGE_MS".into(), "1000".into()),
            ("IPAMD_SHRINK_GRACE_MS".into(), "0".into()),
            ("IPAMD_RECONCILE_INTERVAL_MS".into(), "2000".into()),
            ("IPAMD_LEAKED_ENI_MIN_AGE_MS".into(), "0".into()),
            ("IP_COOLDOWN_PERIOD".into(), "1".into()),
            ("IPAMD_RECLAIM_AFTER_MS".into(), "3000".into()),
        ];
        for (k, v) in &self.knobs {
            env.retain(|(e, _)| e != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }

    /// Starts (or restarts) node `i`'s entrypoint, and its containerd if not running.
    pub fn start_node(&mut self, i: usize) {
        let env = self.node_env(&self.nodes[i]);
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.join("ipamd.log"))
            .unwrap();
        let mut cmd = Command::new(bin("aws-vpc-cni"));
        cmd.env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        n.entrypoint = Some(spawn_in_netns(&n.ns_path(), cmd).expect("spawn aws-vpc-cni"));
        // containerd sets up the sandbox's `lo` with the reference `loopback` plugin.
        let lo = n.dir.join("cni/bin/loopback");
        if !lo.exists() {
            std::fs::create_dir_all(lo.parent().unwrap()).unwrap();
            std::fs::copy("/usr/lib/cni/loopback", &lo)
                .expect("/usr/lib/cni/loopback (apt-get install containernetworking-plugins)");
        }
        if n.containerd.is_none() {
            n.containerd = Some(Containerd::start(
                &n.ns_path(),
                &n.dir.join("containerd"),
                &n.dir.join("cni/bin"),
                &n.dir.join("cni/net.d"),
            ));
        }
    }

    /// SIGKILLs node `i`'s ipamd (the entrypoint then exits too, as the container would).
    pub fn kill_ipamd(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let pid = n.ipamd_pid().expect("ipamd runs under the entrypoint");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        // Gone before the new one starts, as a container's processes are.
        let t0 = Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "ipamd {pid} survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(mut c) = n.entrypoint.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every ENI attached to a lab instance, as EC2 shows it now.
    pub async fn enis(&self) -> Vec<EniView> {
        let ids: Vec<String> = self.nodes.iter().map(|n| n.instance.clone()).collect();
        describe_lab_enis(&self.ec2, &ids).await.unwrap_or_default()
    }

    fn converge(&self, enis: &[EniView]) {
        converge_fabric(&self.fabric_spec(), enis);
    }

    fn fabric_spec(&self) -> FabricSpec {
        FabricSpec {
            nodes: self
                .nodes
                .iter()
                .map(|n| (n.instance.clone(), (n.index, n.ns.clone())))
                .collect(),
            subnets: self.subnets.clone(),
        }
    }

    fn start_follower(&mut self) {
        let spec = self.fabric_spec();
        let ids: Vec<String> = self.nodes.iter().map(|n| n.instance.clone()).collect();
        let endpoint = self.emu.endpoint.clone();
        let go = self.follow.clone();
        let fabric = format!("/var/run/netns/{}", self.fabric);
        self.follower = Some(std::thread::spawn(move || {
            let f = std::fs::File::open(&fabric).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let conf = sdk_config(&endpoint, "us-west-2").await;
                let ec2 = aws_sdk_ec2::Client::new(&conf);
                while go.load(Ordering::Relaxed) {
                    if let Ok(enis) = describe_lab_enis(&ec2, &ids).await {
                        converge_fabric(&spec, &enis);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }));
    }

    /// Which node's ENI holds `ip` in EC2 (and which ENI), if any.
    pub async fn holder(&self, ip: Ipv4Addr) -> Option<(usize, String)> {
        self.enis().await.into_iter().find_map(|e| {
            e.addresses.contains(&ip).then(|| {
                let n = self
                    .nodes
                    .iter()
                    .position(|n| n.instance == e.instance)
                    .unwrap();
                (n, e.id.clone())
            })
        })
    }

    /// Stops every pod through the CRI (so DEL reaches ipamd), then containerd, the
    /// entrypoints (and their ipamd), the follower and the namespaces.
    pub async fn shutdown(mut self) {
        let t0 = Instant::now();
        for n in &mut self.nodes {
            if let Some(c) = &n.containerd
                && let Ok(cri) = Cri::connect(&c.socket).await
            {
                let (_, ids) = c.ctr(&["-n", "k8s.io", "containers", "ls", "-q"]);
                for id in ids.lines().filter(|l| !l.is_empty()) {
                    if let Err(e) = cri.stop(id).await {
                        eprintln!("lab: stopping sandbox {id}: {e}");
                    }
                    if let Err(e) = cri.remove(id).await {
                        eprintln!("lab: removing sandbox {id}: {e}");
                    }
                }
            }
        }
        eprintln!("lab: pods removed in {:?}", t0.elapsed());
        drop(self);
        eprintln!("lab: down in {:?}", t0.elapsed());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.follow.store(false, Ordering::Relaxed);
        if let Some(t) = self.follower.take() {
            let _ = t.join();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.containerd.take() {
                c.stop();
            }
            if let Some(mut c) = n.entrypoint.take() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let t0 = Instant::now();
                while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(5)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new("ip").args(["netns", "del", &n.ns]).output();
        }
        // Pod namespaces containerd left behind (a sandbox that failed mid-way).
        for ns in cni_netns().difference(&self.cni_before) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.internet])
            .output();
    }
}

/// What the fabric needs to know to converge: instance -> (node index, namespace), and
/// subnet id -> CIDR.
#[derive(Clone)]
struct FabricSpec {
    nodes: BTreeMap<String, (usize, String)>,
    subnets: BTreeMap<String, (Ipv4Addr, u8)>,
}

pub async fn describe_lab_enis(
    ec2: &aws_sdk_ec2::Client,
    instances: &[String],
) -> Result<Vec<EniView>, String> {
    let r = ec2
        .describe_network_interfaces()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("attachment.instance-id")
                .set_values(Some(instances.to_vec()))
                .build(),
        )
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut out = Vec::new();
    for n in r.network_interfaces() {
        let Some(att) = n.attachment() else { continue };
        if att.status().map(|s| s.as_str()) == Some("detached") {
            continue;
        }
        let primary: Ipv4Addr = match n.private_ip_address().and_then(|a| a.parse().ok()) {
            Some(a) => a,
            None => continue,
        };
        let mut addresses: Vec<Ipv4Addr> = n
            .private_ip_addresses()
            .iter()
            .filter(|a| a.primary() != Some(true))
            .filter_map(|a| a.private_ip_address()?.parse().ok())
            .collect();
        for p in n.ipv4_prefixes() {
            if let Some((base, _)) = p.ipv4_prefix().map(cidr_of) {
                addresses.extend((0..16).map(|i| Ipv4Addr::from(u32::from(base) + i)));
            }
        }
        let ipv6 = n
            .ipv6_addresses()
            .iter()
            .filter_map(|a| a.ipv6_address()?.parse().ok())
            .collect();
        let ipv6_prefixes = n
            .ipv6_prefixes()
            .iter()
            .filter_map(|p| {
                let (a, l) = p.ipv6_prefix()?.split_once('/')?;
                Some((a.parse().ok()?, l.parse().ok()?))
            })
            .collect();
        out.push(EniView {
            id: n.network_interface_id().unwrap_or_default().to_string(),
            instance: att.instance_id().unwrap_or_default().to_string(),
            device: att.device_index().unwrap_or(-1),
            mac: n.mac_address().unwrap_or_default().to_string(),
            primary_ip: primary,
            subnet_id: n.subnet_id().unwrap_or_default().to_string(),
            addresses,
            ipv6,
            ipv6_prefixes,
        });
    }
    Ok(out)
}

fn json_of(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// The ENI's link pair: `n<node>e<device>` in the fabric, `eth<device>` with the ENI's MAC
/// in the node; the fabric answers for the subnet's gateway on it.
fn plug(ns: &str, link: &str, idx: &usize, e: &EniView, net: (Ipv4Addr, u8)) -> bool {
    let tmp = format!("t{idx}e{}", e.device);
    let eth = format!("eth{}", e.device);
    let gw = gateway(net).to_string();
    let _ = quiet(&["ip", "-n", ns, "link", "del", &eth]);
    let mut steps: Vec<Vec<String>> = vec![
        vec![
            "ip", "link", "add", link, "type", "veth", "peer", "name", &tmp,
        ],
        vec!["ip", "link", "set", &tmp, "netns", ns],
        vec![
            "ip", "-n", ns, "link", "set", &tmp, "name", &eth, "address", &e.mac,
        ],
        // Which ENI the pair is for: a device number EC2 gives again (an ENI freed and
        // another attached there between two passes) gets a new pair, as on EC2.
        vec!["ip", "link", "set", link, "alias", &e.id],
        vec!["ip", "addr", "add", &format!("{gw}/32"), "dev", link],
        // The VPC answers ARP for every address of the subnet (a node's primary ENI keeps
        // its on-link subnet route): proxy ARP, at once.
        vec![
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{link}.proxy_arp=1"),
        ],
        vec![
            "sysctl",
            "-qw",
            &format!("net.ipv4.neigh.{link}.proxy_delay=0"),
        ],
        vec!["ip", "link", "set", link, "up"],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    if !e.ipv6.is_empty() {
        // The router's IPv6 address on a dual-stack ENI's link, valid at once (no DAD).
        let router = format!("{ROUTER6}/64");
        let v = ["ip", "-6", "addr", "add", &router, "dev", link, "nodad"];
        steps.insert(steps.len() - 1, v.iter().map(|s| s.to_string()).collect());
    }
    if e.device == 0 {
        // The node's OS configures its primary ENI (DHCP on EC2).
        let addr = format!("{}/{}", e.primary_ip, net.1);
        for v in [
            vec!["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"],
            vec!["ip", "-n", ns, "link", "set", "eth0", "up"],
            vec!["ip", "-n", ns, "route", "add", "default", "via", &gw],
        ] {
            steps.push(v.into_iter().map(String::from).collect());
        }
        // Dual-stack: its IPv6 address (DHCPv6 on EC2) and the router (from RAs there).
        if let Some(v6) = e.ipv6.first() {
            let addr6 = format!("{v6}/128");
            for v in [
                vec![
                    "ip", "-n", ns, "-6", "addr", "add", &addr6, "dev", "eth0", "nodad",
                ],
                vec![
                    "ip", "-n", ns, "-6", "route", "add", "default", "via", ROUTER6, "dev", "eth0",
                ],
            ] {
                steps.push(v.into_iter().map(String::from).collect());
            }
        }
    }
    steps
        .iter()
        .all(|s| quiet(&s.iter().map(String::as_str).collect::<Vec<_>>()))
}

fn quiet(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// One pass: the fabric's links and routes made to match `enis`. Runs in the fabric ns.
fn converge_fabric(spec: &FabricSpec, enis: &[EniView]) {
    let Some(links) = json_of(&["ip", "-j", "link", "show"]) else {
        return;
    };
    // Fabric link -> the ENI it was plugged for (its alias).
    let have: BTreeMap<String, String> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let name = l["ifname"].as_str()?;
            (name.starts_with('n') && name.contains('e')).then(|| {
                let alias = l["ifalias"].as_str().unwrap_or_default();
                (name.to_string(), alias.to_string())
            })
        })
        .collect();
    let mut want_links = BTreeSet::new();
    let mut want_routes: BTreeMap<Ipv4Addr, (String, Option<Ipv4Addr>)> = BTreeMap::new();
    for e in enis {
        let Some((idx, ns)) = spec.nodes.get(&e.instance).map(|(i, n)| (i, n.as_str())) else {
            continue;
        };
        let Some(net) = spec.subnets.get(&e.subnet_id).copied() else {
            continue;
        };
        // Fabric side `n<node>e<device>`, node side `eth<device>` with the ENI's MAC.
        let link = format!("n{idx}e{}", e.device);
        let link = link.as_str();
        want_links.insert(link.to_string());
        let current = have.get(link);
        if current.is_some_and(|id| *id != e.id) {
            // Another ENI on this device now: the old pair goes (both ends).
            let _ = quiet(&["ip", "link", "del", link]);
        }
        if current != Some(&e.id) && !plug(ns, link, idx, e, net) {
            // A node namespace already gone (teardown): try again next pass, if any.
            let _ = quiet(&["ip", "link", "del", link]);
            continue;
        }
        want_routes.insert(e.primary_ip, (link.to_string(), None));
        for a in &e.addresses {
            want_routes.insert(*a, (link.to_string(), Some(e.primary_ip)));
        }
    }
    for l in have.keys().filter(|l| !want_links.contains(*l)) {
        let _ = quiet(&["ip", "link", "del", l]);
    }
    converge_fabric6(spec, enis);
    // Routes to VPC addresses carry protocol 200, so only ours are compared.
    let Some(routes) = json_of(&["ip", "-j", "route", "show", "proto", "200"]) else {
        return;
    };
    let mut current: BTreeMap<Ipv4Addr, (String, Option<Ipv4Addr>)> = BTreeMap::new();
    for r in routes.as_array().into_iter().flatten() {
        let (Some(dst), Some(dev)) = (r["dst"].as_str(), r["dev"].as_str()) else {
            continue;
        };
        let Ok(dst) = dst.trim_end_matches("/32").parse() else {
            continue;
        };
        let via = r["gateway"].as_str().and_then(|g| g.parse().ok());
        current.insert(dst, (dev.to_string(), via));
    }
    for (ip, (dev, via)) in &want_routes {
        if current.get(ip) == Some(&(dev.clone(), *via)) {
            continue;
        }
        let ip = format!("{ip}/32");
        let mut args = vec!["ip", "route", "replace", &ip, "proto", "200"];
        let via_s = via.map(|v| v.to_string());
        if let Some(v) = &via_s {
            args.extend(["via", v]);
        }
        args.extend(["dev", dev]);
        let _ = quiet(&args);
    }
    for ip in current.keys().filter(|ip| !want_routes.contains_key(ip)) {
        let _ = quiet(&["ip", "route", "del", &format!("{ip}/32"), "proto", "200"]);
    }
}

/// The IPv6 routes of the fabric: each ENI's own addresses on its link, each /80 via the
/// ENI's address (the node routes it on to its pods).
fn converge_fabric6(spec: &FabricSpec, enis: &[EniView]) {
    let mut want: BTreeMap<String, (String, Option<Ipv6Addr>)> = BTreeMap::new();
    for e in enis {
        let Some((idx, _)) = spec.nodes.get(&e.instance) else {
            continue;
        };
        let link = format!("n{idx}e{}", e.device);
        for a in &e.ipv6 {
            want.insert(format!("{a}/128"), (link.clone(), None));
        }
        for (p, l) in &e.ipv6_prefixes {
            want.insert(format!("{p}/{l}"), (link.clone(), e.ipv6.first().copied()));
        }
    }
    let Some(routes) = json_of(&["ip", "-6", "-j", "route", "show", "proto", "200"]) else {
        return;
    };
    let mut current: BTreeMap<String, (String, Option<Ipv6Addr>)> = BTreeMap::new();
    for r in routes.as_array().into_iter().flatten() {
        let (Some(dst), Some(dev)) = (r["dst"].as_str(), r["dev"].as_str()) else {
            continue;
        };
        let dst = if dst.contains('/') {
            dst.to_string()
        } else {
            format!("{dst}/128")
        };
        let via = r["gateway"].as_str().and_then(|g| g.parse().ok());
        current.insert(dst, (dev.to_string(), via));
    }
    for (dst, (dev, via)) in &want {
        if current.get(dst) == Some(&(dev.clone(), *via)) {
            continue;
        }
        let mut args = vec!["ip", "-6", "route", "replace", dst, "proto", "200"];
        let via_s = via.map(|v| v.to_string());
        if let Some(v) = &via_s {
            args.extend(["via", v]);
        }
        args.extend(["dev", dev]);
        let _ = quiet(&args);
    }
    for dst in current.keys().filter(|d| !want.contains_key(*d)) {
        let _ = quiet(&["ip", "-6", "route", "del", dst, "proto", "200"]);
    }
}

/// Runs `f` on a thread inside the network namespace at `path` (a pod's, a node's).
pub fn in_netns<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_string();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// The network namespace (under /var/run/netns) whose eth0 holds `ip`: a pod's.
pub fn pod_netns(ip: impl Into<std::net::IpAddr>) -> Option<String> {
    let ip: std::net::IpAddr = ip.into();
    let dir = std::fs::read_dir("/var/run/netns").ok()?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("cni-") {
            continue;
        }
        let out = Command::new("ip")
            .args(["-n", &name, "-j", "addr", "show", "dev", "eth0"])
            .output()
            .ok()?;
        if String::from_utf8_lossy(&out.stdout).contains(&format!("\"{ip}\"")) {
            return Some(format!("/var/run/netns/{name}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Namespaces made for one test, removed on drop (also when it panics).
    struct Netns(Vec<String>);
    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = quiet(&["ip", "netns", "del", n]);
            }
        }
    }

    fn eni(id: &str, mac: &str, ip: [u8; 4]) -> EniView {
        EniView {
            id: id.into(),
            instance: "i-1".into(),
            device: 1,
            mac: mac.into(),
            primary_ip: Ipv4Addr::from(ip),
            subnet_id: "subnet-a".into(),
            addresses: vec![],
            ipv6: vec![],
            ipv6_prefixes: vec![],
        }
    }

    /// An ENI freed and another attached at the same device between two passes (custom
    /// networking swaps a node's ENIs so) gets its own link in the node, with its MAC: the
    /// fabric once kept the old pair because the device's link name was there, and the new
    /// ENI's link never appeared (found by the cluster test).
    #[test]
    fn a_device_given_to_another_eni_between_passes_gets_the_new_enis_link() {
        let tag = std::process::id();
        let (fab, node) = (format!("tfab-{tag}"), format!("tnode-{tag}"));
        let _ns = Netns(vec![fab.clone(), node.clone()]);
        for n in [&fab, &node] {
            assert!(quiet(&["ip", "netns", "add", n]), "ip netns add {n}");
        }
        let spec = FabricSpec {
            nodes: [("i-1".to_string(), (1, node.clone()))].into(),
            subnets: [("subnet-a".to_string(), (Ipv4Addr::new(10, 9, 0, 0), 24))].into(),
        };
        // The node's eth1: its MAC and its ifindex (a new pair has a new one).
        let eth1 = |node: &str| {
            let v = json_of(&["ip", "-n", node, "-j", "link", "show", "eth1"])?;
            Some((
                v[0]["address"].as_str()?.to_string(),
                v[0]["ifindex"].as_u64()?,
            ))
        };
        let mac_of = |node: &str| eth1(node).map(|(mac, _)| mac);
        let fab_path = format!("/var/run/netns/{fab}");
        let pass = |enis: Vec<EniView>| {
            let spec = spec.clone();
            in_netns(&fab_path, move || converge_fabric(&spec, &enis));
        };
        pass(vec![eni("eni-old", "02:00:00:00:00:01", [10, 9, 0, 10])]);
        assert_eq!(mac_of(&node).as_deref(), Some("02:00:00:00:00:01"));
        pass(vec![eni("eni-new", "02:00:00:00:00:02", [10, 9, 0, 20])]);
        assert_eq!(
            mac_of(&node).as_deref(),
            Some("02:00:00:00:00:02"),
            "the node's eth1 is still the freed ENI's"
        );
        // The same ENI again: the pair stays (no flap on every pass).
        let before = eth1(&node);
        pass(vec![eni("eni-new", "02:00:00:00:00:02", [10, 9, 0, 20])]);
        assert_eq!(eth1(&node), before);
        // Freed: the pair goes.
        pass(vec![]);
        assert_eq!(mac_of(&node), None);
    }
}
