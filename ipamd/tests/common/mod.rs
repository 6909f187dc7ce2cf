//! A real ipamd process against a real emulator process, and a gRPC client for it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use ec2_emulator_sdk_check::hotplug::Hotplug;
pub use ec2_emulator_sdk_check::hotplug::sh;
use ec2_emulator_sdk_check::{Emulator, sdk_config};
use tonic::transport::Channel;
use vpc_cni_proto::address::IpamdAddress;
use vpc_cni_proto::health::health_check_response::ServingStatus;
use vpc_cni_proto::health::{HealthCheckRequest, health_client::HealthClient};
use vpc_cni_proto::rpc::cni_backend_client::CniBackendClient;
use vpc_cni_proto::rpc::{AddNetworkReply, AddNetworkRequest, DelNetworkReply, DelNetworkRequest};

pub struct Ipamd {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub env: BTreeMap<String, String>,
    pub hotplug: Option<Hotplug>,
}

impl Ipamd {
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("ipamd.sock")
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("ipam.json")
    }

    /// Where the introspection server listens (inside the test's namespace).
    pub fn introspection_addr(&self) -> String {
        self.env
            .get("INTROSPECTION_BIND_ADDRESS")
            .cloned()
            .unwrap_or_else(|| "127.0.0.1:61679".into())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ipamd.log")).unwrap_or_default()
    }

    /// Fast pacing for tests; `knobs` override.
    pub fn start(emu: &Emulator, knobs: &[(&str, &str)]) -> Ipamd {
        let dir = tempfile::tempdir().unwrap();
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("AWS_ENDPOINT_URL_EC2", emu.endpoint.clone()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("{}/", emu.endpoint),
            ),
            ("AWS_REGION", "us-west-2".into()),
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            (
                "AWS_VPC_K8S_CNI_BACKING_STORE",
                dir.path().join("ipam.json").display().to_string(),
            ),
            (
                "IPAMD_SOCKET",
                dir.path().join("ipamd.sock").display().to_string(),
            ),
            ("AWS_VPC_K8S_CNI_LOGLEVEL", "DEBUG".into()),
            ("IPAMD_POOL_INTERVAL_MS", "200".into()),
            ("IPAMD_SHRINK_INTERVAL_MS", "200".into()),
            ("IPAMD_ENI_MIN_AGE_MS", "0".into()),
            // These tests time ENI attaches; the warm grace has a test of its own.
            ("IPAMD_WARM_GRACE_MS", "0".into()),
            // ... and ENI frees: the shrink grace has a test of its own too.
            ("IPAMD_SHRINK_GRACE_MS", "0".into()),
            ("IPAMD_RECONCILE_INTERVAL_MS", "2000".into()),
            ("IPAMD_LEAKED_ENI_MIN_AGE_MS", "0".into()),
            // These tests' pods are gRPC calls, without interfaces on the host.
            ("IPAMD_RECLAIM_AFTER_MS", "0".into()),
            ("IP_COOLDOWN_PERIOD", "0".into()),
        ] {
            env.insert(k.to_string(), v);
        }
        for (k, v) in knobs {
            env.insert(k.to_string(), v.to_string());
        }
        let mut me = Ipamd {
            dir,
            child: None,
            env,
            hotplug: Some(Hotplug::start(&emu.endpoint)),
        };
        me.spawn();
        me
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("ipamd.log"))
            .unwrap();
        // IPAMD_BIN: another build (an older commit's, to see a regression test fail on it).
        let bin = std::env::var("IPAMD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ipamd").into());
        let child = Command::new(bin)
            .env_clear()
            .envs(&self.env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ipamd");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.socket(), Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}\nipamd log:\n{}", self.log()))
    }
}

impl Drop for Ipamd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A gRPC client of ipamd's socket (the generated clients over one channel, as the
/// plugin uses them), shared by the test's tasks.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
}

pub async fn connect(path: &Path, within: Duration) -> Result<Client, String> {
    let addr = IpamdAddress::Unix(path.display().to_string());
    let deadline = Instant::now() + within;
    loop {
        if let Ok(channel) = vpc_cni_proto::address::connect(&addr, Duration::from_secs(2)).await {
            let c = Client { channel };
            if c.healthy().await {
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "ipamd not serving on {} within {within:?}",
                path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A call that takes longer than this failed (ipamd's own wait is 10 s by default).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 30 s")),
    }
}

impl Client {
    /// The health service answers (whatever it says).
    pub async fn healthy(&self) -> bool {
        self.health().await.is_ok()
    }

    pub async fn health(&self) -> Result<ServingStatus, tonic::Status> {
        let req = HealthCheckRequest {
            service: vpc_cni_proto::HEALTH_SERVICE.to_string(),
        };
        bounded(HealthClient::new(self.channel.clone()).check(req))
            .await
            .map(|r| r.status())
    }

    pub async fn add(&self, container: &str) -> Result<AddNetworkReply, tonic::Status> {
        bounded(
            CniBackendClient::new(self.channel.clone()).add_network(AddNetworkRequest {
                k8s_pod_name: format!("pod-{container}"),
                k8s_pod_namespace: "default".into(),
                container_id: container.into(),
                if_name: "eth0".into(),
                network_name: "aws-cni".into(),
                netns: "/var/run/netns/x".into(),
                client_version: "test".into(),
                ..Default::default()
            }),
        )
        .await
    }

    pub async fn del(&self, container: &str) -> Result<DelNetworkReply, tonic::Status> {
        bounded(
            CniBackendClient::new(self.channel.clone()).del_network(DelNetworkRequest {
                k8s_pod_name: format!("pod-{container}"),
                k8s_pod_namespace: "default".into(),
                container_id: container.into(),
                if_name: "eth0".into(),
                network_name: "aws-cni".into(),
                reason: "PodDeleted".into(),
                ..Default::default()
            }),
        )
        .await
    }
}

/// What EC2 holds for an instance: (ENI id, device, secondary IPs, prefixes).
pub async fn ec2_view(
    emu: &Emulator,
    instance: &str,
) -> Vec<(String, i32, Vec<String>, Vec<String>)> {
    let conf = sdk_config(&emu.endpoint, "us-west-2").await;
    let c = aws_sdk_ec2::Client::new(&conf);
    let r = ec2_emulator_sdk_check::attached_enis(&c, instance)
        .await
        .unwrap();
    let mut v: Vec<_> = r
        .network_interfaces()
        .iter()
        .map(|n| {
            (
                n.network_interface_id().unwrap().to_string(),
                n.attachment().and_then(|a| a.device_index()).unwrap_or(-1),
                n.private_ip_addresses()
                    .iter()
                    .filter(|a| !a.primary().unwrap_or(false))
                    .map(|a| a.private_ip_address().unwrap().to_string())
                    .collect(),
                n.ipv4_prefixes()
                    .iter()
                    .map(|p| p.ipv4_prefix().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    v.sort_by_key(|x| x.1);
    v
}

/// (ENIs, secondary IPs) on the instance.
pub async fn counts(emu: &Emulator, instance: &str) -> (usize, usize) {
    let v = ec2_view(emu, instance).await;
    (v.len(), v.iter().map(|e| e.2.len()).sum())
}

/// Polls until `f` holds or `within` passes; returns the last value.
pub async fn eventually<T: std::fmt::Debug + PartialEq>(
    within: Duration,
    want: T,
    mut f: impl AsyncFnMut() -> T,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let v = f().await;
        if v == want || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An EC2 client for the emulator and the seeded instance as EC2 describes it.
pub async fn ec2_instance(
    emu: &Emulator,
    instance: &str,
) -> (aws_sdk_ec2::Client, aws_sdk_ec2::types::Instance) {
    let conf = sdk_config(&emu.endpoint, "us-west-2").await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let r = ec2
        .describe_instances()
        .instance_ids(instance)
        .send()
        .await
        .unwrap();
    let i = r.reservations()[0].instances()[0].clone();
    (ec2, i)
}

/// A network namespace that the calling thread, and every thread and process it starts
/// afterwards, lives in until drop; the namespace is removed on drop, also when the test
/// fails. ipamd sets up routes, rules and iptables: never in the machine's own namespace.
pub struct NodeNs {
    pub name: String,
    home: std::fs::File,
}

impl NodeNs {
    pub fn enter(tag: &str) -> NodeNs {
        use std::os::fd::AsFd;
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let home = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        sh(&["ip", "netns", "add", &name]);
        let ns = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
        let me = NodeNs { name, home };
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("enter the test namespace");
        sh(&["ip", "link", "set", "lo", "up"]);
        me
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        use std::os::fd::AsFd;
        let _ = nix::sched::setns(self.home.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` on a 2-worker runtime whose threads all live in a fresh node namespace.
pub fn in_node_ns<F: std::future::Future<Output = ()>>(tag: &str, f: impl FnOnce() -> F) {
    let ns = NodeNs::enter(tag);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(f());
    drop(rt);
    drop(ns);
}

/// `ip route show table N`, empty when the table does not exist (yet, or any more).
pub fn table_routes(table: u32) -> String {
    Command::new("ip")
        .args(["route", "show", "table", &table.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
