//! A real Kubernetes cluster on the emulated VPC lab, run as users run aws-node: the
//! control plane (etcd, kube-apiserver with the Node and RBAC authorizers,
//! kube-controller-manager, kube-scheduler) in the fabric namespace, and on each node a
//! containerd, a kubelet and a kube-proxy (iptables mode) in that node's network namespace
//! and a mount namespace of its own. `deploy/aws-node.yaml` is applied as written (the
//! image it names is imported into every node), and the only thing added to it is where
//! EC2 is (`AWS_EC2_ENDPOINT`: the emulator speaks plain HTTP at an address of the lab;
//! IMDS is where it always is, 169.254.169.254, and gives the instance profile's
//! credentials and the region). CoreDNS serves cluster.local at 10.96.0.10.
//!
//! Why a mount namespace per node: the DaemonSet's host paths (`/opt/cni/bin`,
//! `/etc/cni/net.d`, `/var/run/aws-node`, `/run/xtables.lock`) are absolute, and two nodes
//! on one machine would share them. Each node sees its own: a tmpfs on `/run`, `/opt` and
//! `/var/log`, and an overlay on `/etc`, with the node's CNI directories bound where the
//! DaemonSet expects them. The mounts are private: the machine's own are never changed,
//! and they vanish with the node's processes.
//!
//! What the kubelet changes that no namespace isolates (a few kernel sysctls, and cgroup
//! directories under a root of its own per node) is saved and restored, or removed, on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::containerd::{Containerd, spawn_in_netns};
use crate::lab::{EMULATOR_ADDR, Lab, note_state};

/// Where the control plane listens, on the fabric's loopback.
pub const APISERVER_ADDR: &str = "100.64.0.2";
/// The first address of the Service range: the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const CLUSTER_DNS: &str = "10.96.0.10";
/// The cluster's VPC: two availability zones (node1, node3, ... in us-west-2a's 10.0.0.0/20,
/// node2, node4, ... in us-west-2b's 10.0.32.0/20) and, for custom networking, 100.64.0.0/16
/// beside the nodes' 10.0.0.0/16 with a pod subnet per zone, Name=pods-0 (100.64.0.0/19,
/// us-west-2a) and pods-1 (100.64.32.0/19, us-west-2b), and a security group named pods.
pub const POD_SEED: &[&str] = &[
    "--zones",
    "2",
    "--pod-vpc-cidr",
    "100.64.0.0/16",
    "--pod-subnet",
    "100.64.0.0/19@us-west-2a",
    "--pod-subnet",
    "100.64.32.0/19@us-west-2b",
];

/// The zone of the lab's node `i` (0-based) under [`POD_SEED`].
pub fn zone_of_node(i: usize) -> &'static str {
    ["us-west-2a", "us-west-2b"][i % 2]
}

/// The aws-node image deploy/aws-node.yaml names, and a second tag for rolling updates.
pub const AWS_NODE_IMAGE: &str = "vpc-cni-rs/aws-node";

/// The kernel settings kubelet writes (pkg/kubelet/cm: setupKernelTunables), global to
/// the machine: saved before the first kubelet starts, restored on drop.
const KERNEL_TUNABLES: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// The Kubernetes binaries tests/k8s/build made.
pub fn k8s_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("VPC_CNI_K8S_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.build/k8s/bin"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it with tests/k8s/build (scripts/test does)",
        p.display()
    );
    p
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A node of the cluster: its mount namespace (held by a process), containerd, kubelet
/// and kube-proxy.
pub struct KubeNode {
    pub name: String,
    pub index: usize,
    pub dir: PathBuf,
    holder: Option<Child>,
    pub containerd: Option<Containerd>,
    kubelet: Option<Child>,
    proxy: Option<Child>,
    pub cgroup_root: String,
    /// When its kubelet was started (for the boot figure).
    pub kubelet_started: Option<Instant>,
    /// The same on the wall clock (to set beside the API's timestamps).
    pub kubelet_started_at: Option<std::time::SystemTime>,
}

impl KubeNode {
    /// The node's mount namespace.
    fn mnt(&self) -> String {
        format!(
            "/proc/{}/ns/mnt",
            self.holder.as_ref().expect("node mount namespace").id()
        )
    }
    pub fn kubelet_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kubelet.log")).unwrap_or_default()
    }
}

pub struct Cluster {
    pub lab: Lab,
    pub dir: PathBuf,
    control: Vec<(String, Child)>,
    pub nodes: Vec<KubeNode>,
    kernel_saved: Vec<(String, String)>,
    pub started: Instant,
    /// The kubelet's max-pods (EKS's formula for the instance type).
    pub max_pods: u32,
    /// Per node, from its kubelet's start: registered with the API, Ready.
    pub boot: BTreeMap<String, (Option<Duration>, Option<Duration>)>,
    /// Per node, the messages of its Ready condition seen while it was not Ready.
    pub not_ready_seen: BTreeMap<String, BTreeSet<String>>,
}

/// Spawns `cmd` inside the network namespace `netns` and, if given, the mount namespace
/// `mnt` (through nsenter, so the calling thread is untouched).
fn spawn_node(
    netns: &str,
    mnt: Option<&str>,
    program: &Path,
    args: &[String],
    log: &Path,
) -> Child {
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = match mnt {
        Some(m) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--mount={m}")).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    spawn_in_netns(netns, cmd).unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()))
}

fn sysctl_path(k: &str) -> String {
    format!("/proc/sys/{k}")
}

impl Cluster {
    /// The lab's VPC with `nodes` instances of `instance_type`, a control plane, and a
    /// kubelet node on each; aws-node and CoreDNS applied; returns once every node is
    /// Ready and CoreDNS answers. Call inside `lab::in_fabric`.
    pub async fn start(fabric: &str, nodes: usize, instance_type: &str) -> Cluster {
        let started = Instant::now();
        // Two zones, and a secondary VPC block with a pod subnet per zone, for custom
        // networking.
        let lab = Lab::fabric_seeded(fabric, nodes, instance_type, &[], POD_SEED).await;
        let dir = lab.dir.path().join("cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let max_pods = max_pods(&lab, instance_type).await;
        let mut c = Cluster {
            boot: BTreeMap::new(),
            not_ready_seen: BTreeMap::new(),
            max_pods,
            lab,
            dir,
            control: Vec::new(),
            nodes: Vec::new(),
            kernel_saved: Vec::new(),
            started,
        };
        c.imds_at_its_address();
        c.start_control_plane().await;
        eprintln!("cluster: control plane up in {:?}", started.elapsed());
        c.save_kernel_tunables();
        for i in 0..c.lab.nodes.len() {
            c.start_node(i);
        }
        eprintln!(
            "cluster: {} kubelets started in {:?}",
            nodes,
            started.elapsed()
        );
        c.apply_aws_node(&format!("{AWS_NODE_IMAGE}:{}", env!("CARGO_PKG_VERSION")));
        c.kubectl_ok(&[
            "apply",
            "-f",
            &repo()
                .join("tests/k8s/manifests/coredns.yaml")
                .display()
                .to_string(),
        ]);
        c.wait_nodes_ready(Duration::from_secs(180)).await;
        eprintln!("cluster: every node Ready in {:?}", started.elapsed());
        // (A node is Ready once the conflist is written; aws-node's pod once its readiness
        // probe, `ipamd health`, has passed: a little later.)
        c.wait_rollout(
            "kube-system",
            "daemonset/aws-node",
            Duration::from_secs(120),
        );
        c.wait_rollout(
            "kube-system",
            "deployment/coredns",
            Duration::from_secs(120),
        );
        eprintln!("cluster: CoreDNS ready in {:?}", started.elapsed());
        c
    }

    /// IMDS where instances reach it: 169.254.169.254:80 is the emulator, for every node
    /// (the fabric is the lab's own namespace: its firewall is ours to set).
    fn imds_at_its_address(&self) {
        let port = self.lab.emu.port.to_string();
        for args in [
            vec!["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"],
            vec![
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                "169.254.169.254/32",
                "-p",
                "tcp",
                "--dport",
                "80",
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{EMULATOR_ADDR}:{port}"),
            ],
            vec![
                "ip",
                "addr",
                "add",
                &format!("{APISERVER_ADDR}/32"),
                "dev",
                "lo",
            ],
        ] {
            crate::netns::sh(&args);
        }
    }

    fn token(identity: &str) -> String {
        format!("token-{}", identity.replace([':', '@'], "-"))
    }

    /// A kubeconfig for `user` with its static token (written once: every kubectl call
    /// reads the admin's).
    fn kubeconfig(&self, user: &str) -> PathBuf {
        let path = self
            .dir
            .join(format!("{}.kubeconfig", user.replace(':', "-")));
        if path.exists() {
            return path;
        }
        let ca = self.dir.join("certs/apiserver.crt");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{APISERVER_ADDR}:6443\n    certificate-authority: {}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: u}}\ncurrent-context: lab\nusers:\n- name: u\n  user:\n    token: {}\n",
                ca.display(),
                Self::token(user)
            ),
        )
        .unwrap();
        path
    }

    async fn start_control_plane(&mut self) {
        let d = self.dir.clone();
        let key = d.join("sa.key");
        let ok = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(ok.success(), "openssl genrsa");
        // One static token per identity; bootstrap RBAC and the Node authorizer do the rest.
        let mut tokens = vec![
            format!("{},admin,admin,system:masters", Self::token("admin")),
            format!(
                "{},system:kube-controller-manager,kcm,system:masters",
                Self::token("system:kube-controller-manager")
            ),
            format!(
                "{},system:kube-scheduler,scheduler",
                Self::token("system:kube-scheduler")
            ),
            format!(
                "{},system:kube-proxy,kube-proxy",
                Self::token("system:kube-proxy")
            ),
        ];
        for i in 0..self.lab.nodes.len() {
            let user = format!("system:node:node{}", i + 1);
            tokens.push(format!("{},{user},{user},system:nodes", Self::token(&user)));
        }
        std::fs::write(d.join("tokens.csv"), tokens.join("\n") + "\n").unwrap();
        let spawn = |name: &str, args: &[&str]| -> Child {
            let log = std::fs::File::create(d.join(format!("{name}.log"))).unwrap();
            Command::new(k8s_bin(name))
                .args(args)
                .current_dir(&d)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {name}: {e}"))
        };
        let etcd = spawn(
            "etcd",
            &[
                "--data-dir",
                "etcd",
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
                "--log-level",
                "error",
            ],
        );
        self.control.push(("etcd".into(), etcd));
        let apiserver = spawn(
            "kube-apiserver",
            &[
                "--etcd-servers",
                "http://127.0.0.1:2379",
                "--bind-address",
                "0.0.0.0",
                "--advertise-address",
                APISERVER_ADDR,
                "--secure-port",
                "6443",
                "--cert-dir",
                "certs",
                "--service-cluster-ip-range",
                SERVICE_CIDR,
                "--service-account-issuer",
                "https://kubernetes.default.svc",
                "--service-account-key-file",
                "sa.key",
                "--service-account-signing-key-file",
                "sa.key",
                "--token-auth-file",
                "tokens.csv",
                "--authorization-mode",
                "Node,RBAC",
                "--allow-privileged=true",
                "--kubelet-preferred-address-types",
                "InternalIP",
                "--profiling=false",
            ],
        );
        self.control.push(("kube-apiserver".into(), apiserver));
        let deadline = Instant::now() + Duration::from_secs(90);
        while !d.join("certs/apiserver.crt").exists() {
            assert!(
                Instant::now() < deadline,
                "kube-apiserver wrote no certificate\n{}",
                self.control_log("kube-apiserver")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        loop {
            let (ok, _) = self.kubectl(&["get", "--raw", "/readyz"]);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready\n{}",
                self.control_log("kube-apiserver")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let kcm_cfg = self.kubeconfig("system:kube-controller-manager");
        let kcm = spawn(
            "kube-controller-manager",
            &[
                "--kubeconfig",
                kcm_cfg.to_str().unwrap(),
                "--authentication-kubeconfig",
                kcm_cfg.to_str().unwrap(),
                "--authorization-kubeconfig",
                kcm_cfg.to_str().unwrap(),
                "--service-account-private-key-file",
                "sa.key",
                "--root-ca-file",
                "certs/apiserver.crt",
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                "10257",
                "--leader-elect=false",
                "--controllers",
                "*",
                "--node-monitor-grace-period",
                "20s",
            ],
        );
        self.control.push(("kube-controller-manager".into(), kcm));
        let sched_cfg = self.kubeconfig("system:kube-scheduler");
        let sched = spawn(
            "kube-scheduler",
            &[
                "--kubeconfig",
                sched_cfg.to_str().unwrap(),
                "--authentication-kubeconfig",
                sched_cfg.to_str().unwrap(),
                "--authorization-kubeconfig",
                sched_cfg.to_str().unwrap(),
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                "10259",
                "--leader-elect=false",
            ],
        );
        self.control.push(("kube-scheduler".into(), sched));
        // The service account the admission plugin needs exists once kcm runs.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self
            .kubectl(&["-n", "kube-system", "get", "serviceaccount", "default"])
            .0
        {
            assert!(
                Instant::now() < deadline,
                "no default service account\n{}",
                self.control_log("kube-controller-manager")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn control_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn save_kernel_tunables(&mut self) {
        for k in KERNEL_TUNABLES {
            if let Ok(v) = std::fs::read_to_string(sysctl_path(k)) {
                let v = v.trim().to_string();
                note_state("sysctl", &format!("{k} {v}"));
                self.kernel_saved.push((k.to_string(), v));
            }
        }
    }

    /// Node `i`: its mount namespace, cgroup root, containerd with the images, kubelet
    /// and kube-proxy.
    pub fn start_node(&mut self, i: usize) {
        let ln = &self.lab.nodes[i];
        let name = format!("node{}", i + 1);
        let dir = ln.dir.clone();
        let netns = ln.ns_path();
        let node_ip = ln.primary_ip;
        for sub in [
            "cni/bin",
            "cni/net.d",
            "etc-upper",
            "etc-work",
            "kubelet",
            "pod-logs",
            "run-aws-node",
        ] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // containerd sets up the sandbox's `lo` with the reference plugin.
        std::fs::copy("/usr/lib/cni/loopback", dir.join("cni/bin/loopback"))
            .expect("/usr/lib/cni/loopback (apt-get install containernetworking-plugins)");
        // The node's view of the host paths (see the module's comment).
        let script = format!(
            "set -e\n\
             mount -t tmpfs -o mode=755 tmpfs /run\n\
             mkdir -p /run/aws-node /run/netns /run/containerd\n\
             mount --bind {d}/run-aws-node /run/aws-node\n\
             mount -t tmpfs -o mode=755 tmpfs /opt\n\
             mkdir -p /opt/cni/bin\n\
             mount --bind {d}/cni/bin /opt/cni/bin\n\
             mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc-upper,workdir={d}/etc-work /etc\n\
             mkdir -p /etc/cni/net.d\n\
             mount --bind {d}/cni/net.d /etc/cni/net.d\n\
             mount -t tmpfs -o mode=755 tmpfs /var/log\n\
             touch {d}/mounts-ready\n\
             exec sleep infinity\n",
            d = dir.display()
        );
        let holder_log = std::fs::File::create(dir.join("mounts.log")).unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(holder_log);
        let holder = spawn_in_netns(&netns, cmd).expect("spawn the node's mount namespace");
        let t0 = Instant::now();
        while !dir.join("mounts-ready").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{name}: mount namespace not ready: {}",
                std::fs::read_to_string(dir.join("mounts.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let cgroup_root = format!("/vpccni-{}-{name}", self.lab.id);
        // kubelet insists its cgroup root exists in every (v1) hierarchy.
        for h in cgroup_hierarchies() {
            let _ = std::fs::create_dir_all(format!("{h}{cgroup_root}"));
        }
        note_state("cgroup", &cgroup_root);
        let mut node = KubeNode {
            name: name.clone(),
            index: i + 1,
            dir: dir.clone(),
            holder: Some(holder),
            containerd: None,
            kubelet: None,
            proxy: None,
            cgroup_root: cgroup_root.clone(),
            kubelet_started: None,
            kubelet_started_at: None,
        };
        let mnt = node.mnt();
        node.containerd = Some(Containerd::start_in(
            &netns,
            Some(&mnt),
            &dir.join("containerd"),
            Path::new("/opt/cni/bin"),
            Path::new("/etc/cni/net.d"),
        ));
        let ctrd = node.containerd.as_ref().unwrap();
        for (image, base) in [
            (
                repo().join(format!(
                    ".build/image/aws-node-{}.tar",
                    env!("CARGO_PKG_VERSION")
                )),
                format!("docker.io/{AWS_NODE_IMAGE}"),
            ),
            (
                repo().join(format!(
                    ".build/image/aws-node-{}-b.tar",
                    env!("CARGO_PKG_VERSION")
                )),
                format!("docker.io/{AWS_NODE_IMAGE}"),
            ),
            (
                repo().join(".build/k8s/images/coredns.tar"),
                "vpccni.test/coredns".to_string(),
            ),
        ] {
            // (The second aws-node tag is only for the rolling update, which checks for it.)
            if !image.exists() && image.display().to_string().ends_with("-b.tar") {
                continue;
            }
            assert!(
                image.exists(),
                "{} is missing: deploy/build-image, tests/k8s/build",
                image.display()
            );
            let (ok, out) = ctrd.ctr(&[
                "-n",
                "k8s.io",
                "images",
                "import",
                "--base-name",
                &base,
                &image.display().to_string(),
            ]);
            assert!(ok, "import {}: {out}", image.display());
        }
        let kubelet_cfg = dir.join("kubelet.yaml");
        std::fs::write(
            &kubelet_cfg,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failSwapOn: false
failCgroupV1: false
clusterDNS: ["{CLUSTER_DNS}"]
clusterDomain: cluster.local
containerRuntimeEndpoint: unix://{sock}
podLogsDir: {d}/pod-logs
maxPods: {max_pods}
readOnlyPort: 0
port: 10250
address: {node_ip}
healthzBindAddress: 127.0.0.1
serializeImagePulls: false
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
evictionPressureTransitionPeriod: 5s
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
fileCheckFrequency: 10s
imageGCHighThresholdPercent: 100
"#,
                sock = dir.join("containerd/containerd.sock").display(),
                d = dir.display(),
                max_pods = self.max_pods,
            ),
        )
        .unwrap();
        let kubeconfig = self.kubeconfig(&format!("system:node:{name}"));
        node.kubelet_started = Some(Instant::now());
        node.kubelet_started_at = Some(std::time::SystemTime::now());
        node.kubelet = Some(spawn_node(
            &netns,
            Some(&mnt),
            &k8s_bin("kubelet"),
            &[
                format!("--config={}", kubelet_cfg.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", dir.join("kubelet").display()),
                format!("--hostname-override={name}"),
                format!("--node-ip={node_ip}"),
                "--v=2".into(),
            ],
            &dir.join("kubelet.log"),
        ));
        let proxy_cfg = self.kubeconfig("system:kube-proxy");
        node.proxy = Some(spawn_node(
            &netns,
            Some(&mnt),
            &k8s_bin("kube-proxy"),
            &[
                format!("--kubeconfig={}", proxy_cfg.display()),
                format!("--hostname-override={name}"),
                "--proxy-mode=iptables".into(),
                // EKS sets the VPC's CIDR: traffic from outside it to a Service is masqueraded.
                "--cluster-cidr=10.0.0.0/16".into(),
                // Off host-wide settings: no conntrack table sizing or timeouts.
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--healthz-bind-address=127.0.0.1:10256".into(),
                "--v=2".into(),
            ],
            &dir.join("kube-proxy.log"),
        ));
        if self.nodes.len() > i {
            self.nodes[i] = node;
        } else {
            self.nodes.push(node);
        }
    }

    /// deploy/aws-node.yaml as written, told where EC2 is, with `image`.
    pub fn apply_aws_node(&self, image: &str) {
        let yaml = std::fs::read_to_string(repo().join("deploy/aws-node.yaml")).unwrap();
        let endpoint = format!("http://{EMULATOR_ADDR}:{}", self.lab.emu.port);
        let default_image = format!("{AWS_NODE_IMAGE}:{}", env!("CARGO_PKG_VERSION"));
        let yaml = yaml.replace(
            &format!("image: {default_image}"),
            &format!("image: {image}"),
        );
        // The aws-node container's env (the init container has one of its own first).
        let main = yaml
            .find("        - name: aws-node\n")
            .expect("the manifest's aws-node container moved");
        let (head, tail) = yaml.split_at(main);
        let patched = format!(
            "{head}{}",
            tail.replacen(
                "          env:\n",
                &format!(
                    "          env:\n            - name: AWS_EC2_ENDPOINT\n              value: \"{endpoint}\"\n"
                ),
                1,
            )
        );
        assert!(
            patched.contains("AWS_EC2_ENDPOINT"),
            "the manifest's env list moved"
        );
        let path = self.dir.join("aws-node.yaml");
        std::fs::write(&path, patched).unwrap();
        self.kubectl_ok(&["apply", "-f", &path.display().to_string()]);
    }

    /// kubectl as the cluster's admin: (success, stdout + stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let out = self
            .kubectl_cmd()
            .arg("--request-timeout=30s")
            .args(args)
            .output()
            .expect("kubectl");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// kubectl with the admin's kubeconfig.
    fn kubectl_cmd(&self) -> Command {
        let mut cmd = Command::new(k8s_bin("kubectl"));
        cmd.arg(format!(
            "--kubeconfig={}",
            self.kubeconfig("admin").display()
        ));
        cmd
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.kubectl(args);
        assert!(ok, "kubectl {args:?}: {out}");
        out
    }

    /// `kubectl get -o json`.
    pub fn get_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl_cmd().args(&a).output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {a:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs `sh -c script` in a pod's container (kubectl exec, through the kubelet).
    pub fn exec(&self, ns: &str, pod: &str, script: &str) -> (bool, String) {
        self.kubectl(&["exec", "-n", ns, pod, "--", "sh", "-c", script])
    }

    /// Whether every node's Ready condition is True.
    pub fn nodes_ready(&self) -> BTreeMap<String, bool> {
        self.node_conditions()
            .into_iter()
            .map(|(n, (ready, _))| (n, ready))
            .collect()
    }

    /// Per node: its Ready condition (True?) and that condition's message.
    pub fn node_conditions(&self) -> BTreeMap<String, (bool, String)> {
        let v = self.get_json(&["nodes"]);
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                let cond = n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == "Ready");
                (
                    n["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    (
                        cond.is_some_and(|c| c["status"] == "True"),
                        cond.and_then(|c| c["message"].as_str())
                            .unwrap_or_default()
                            .to_string(),
                    ),
                )
            })
            .collect()
    }

    pub async fn wait_nodes_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let conds = self.node_conditions();
            for (n, (ready, msg)) in &conds {
                if !ready {
                    self.not_ready_seen
                        .entry(n.clone())
                        .or_default()
                        .insert(msg.clone());
                }
            }
            let r: BTreeMap<String, bool> =
                conds.iter().map(|(n, (r, _))| (n.clone(), *r)).collect();
            for n in &self.nodes {
                let Some(t0) = n.kubelet_started else {
                    continue;
                };
                let e = self.boot.entry(n.name.clone()).or_default();
                if e.0.is_none() && r.contains_key(&n.name) {
                    e.0 = Some(t0.elapsed());
                }
                if e.1.is_none() && r.get(&n.name) == Some(&true) {
                    e.1 = Some(t0.elapsed());
                }
            }
            if r.len() == self.nodes.len() && r.values().all(|v| *v) {
                return;
            }
            if Instant::now() > deadline {
                let mut msg = format!("nodes not Ready: {r:?}\n");
                msg.push_str(&self.kubectl(&["get", "pods", "-A", "-o", "wide"]).1);
                msg.push_str(&self.kubectl(&["describe", "nodes"]).1);
                for n in &self.nodes {
                    let log = n.kubelet_log();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    msg.push_str(&format!("\n--- {} kubelet (last lines)\n", n.name));
                    for l in tail.into_iter().rev() {
                        msg.push_str(l);
                        msg.push('\n');
                    }
                }
                panic!("{msg}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Lab node `i`'s ipamd `/v1/pool` (null when it does not answer).
    pub fn pool(&self, i: usize) -> Value {
        crate::lab::in_netns(&self.lab.nodes[i].ns_path(), || {
            ipamd::cli::http_get("127.0.0.1:61679", "/v1/pool").unwrap_or(Value::Null)
        })
    }

    /// `kubectl rollout status` until done.
    pub fn wait_rollout(&self, ns: &str, what: &str, within: Duration) {
        let (ok, out) = self.kubectl(&[
            "rollout",
            "status",
            "-n",
            ns,
            what,
            &format!("--timeout={}s", within.as_secs()),
        ]);
        if ok {
            return;
        }
        // What a stuck rollout needs read: the pods, why the first not-Running ones are
        // where they are (the scheduler's reason is in their events), the nodes (taints,
        // conditions, allocatable), and the last lines of the scheduler, the controller
        // manager and each kubelet.
        let mut msg = format!("{what} did not roll out: {out}\n");
        msg.push_str(&self.kubectl(&["get", "pods", "-A", "-o", "wide"]).1);
        let (_, stuck) = self.kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "--field-selector=status.phase!=Running",
            "-o",
            "name",
        ]);
        for p in stuck.lines().take(3) {
            msg.push_str(&self.kubectl(&["describe", "-n", ns, p]).1);
        }
        msg.push_str(&self.kubectl(&["describe", "nodes"]).1);
        msg.push_str(
            &self
                .kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"])
                .1,
        );
        let tail = |name: &str, log: String| {
            let lines: Vec<&str> = log.lines().rev().take(40).collect();
            let mut t = format!("\n--- {name} (last lines)\n");
            for l in lines.into_iter().rev() {
                t.push_str(l);
                t.push('\n');
            }
            t
        };
        for (name, child) in &self.control {
            // Still running? (A zombie or a missing /proc entry says it is not.)
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
                .unwrap_or_else(|_| "gone".into());
            msg.push_str(&format!("\n{name} pid {}: {stat}", child.id()));
        }
        for c in ["kube-scheduler", "kube-controller-manager"] {
            msg.push_str(&tail(c, self.control_log(c)));
        }
        for n in &self.nodes {
            msg.push_str(&tail(&format!("{} kubelet", n.name), n.kubelet_log()));
        }
        // ipamd's side: its pool as introspection says, and its log.
        let (_, daemons) = self.kubectl(&[
            "get",
            "pods",
            "-n",
            "kube-system",
            "-l",
            "k8s-app=aws-node",
            "-o",
            "name",
        ]);
        for p in daemons.lines() {
            let (_, log) = self.kubectl(&["logs", "-n", "kube-system", "--tail=40", p]);
            msg.push_str(&tail(&format!("{p} log"), log));
        }
        for (i, n) in self.lab.nodes.iter().enumerate() {
            msg.push_str(&format!("\n--- {} /v1/pool\n{}\n", n.ns, self.pool(i)));
        }
        panic!("{msg}");
    }

    /// `kubectl wait` for the pods' Ready condition; on a timeout, what they and their
    /// nodes' events say.
    pub fn wait_pods_ready(&self, ns: &str, pods: &[&str], within: Duration) {
        let mut args = vec!["wait", "-n", ns, "--for=condition=Ready"];
        let names: Vec<String> = pods.iter().map(|p| format!("pod/{p}")).collect();
        args.extend(names.iter().map(String::as_str));
        let timeout = format!("--timeout={}s", within.as_secs());
        args.push(&timeout);
        let (ok, out) = self.kubectl(&args);
        if !ok {
            let mut msg = format!("pods {pods:?} not Ready: {out}\n");
            for p in pods {
                msg.push_str(&self.kubectl(&["describe", "pod", "-n", ns, p]).1);
                msg.push_str(&self.kubectl(&["logs", "-n", ns, p, "--tail=20"]).1);
            }
            panic!("{msg}");
        }
    }

    /// The node a pod runs on and its address.
    pub fn pod_ip(&self, ns: &str, pod: &str) -> (String, Ipv4Addr) {
        let v = self.get_json(&["pod", "-n", ns, pod]);
        (
            v["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            v["status"]["podIP"]
                .as_str()
                .unwrap_or("0.0.0.0")
                .parse()
                .unwrap(),
        )
    }

    /// Stops a node's kubelet (its pods keep running, as on a real node).
    pub fn stop_kubelet(&mut self, i: usize) {
        if let Some(mut k) = self.nodes[i].kubelet.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}

/// max-pods of an instance type as EKS's bootstrap sets it: ENIs × (IPs per ENI − 1) + 2,
/// from DescribeInstanceTypes.
async fn max_pods(lab: &Lab, instance_type: &str) -> u32 {
    let r = lab
        .ec2
        .describe_instance_types()
        .instance_types(instance_type.into())
        .send()
        .await
        .expect("DescribeInstanceTypes");
    let n = r.instance_types()[0].network_info().expect("network info");
    let (enis, ips) = (
        n.maximum_network_interfaces().unwrap_or(1) as u32,
        n.ipv4_addresses_per_interface().unwrap_or(1) as u32,
    );
    enis * (ips - 1) + 2
}

/// The cgroup hierarchies kubelet's cgroup root must exist in: every v1 controller's
/// mount, systemd's named one, and the unified one of a hybrid layout.
fn cgroup_hierarchies() -> Vec<String> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return vec![];
    };
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| f[1].to_string())
        })
        .collect()
}

/// Removes a cgroup directory and everything below it (empty cgroups, deepest first).
fn remove_cgroup_tree(path: &Path) {
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first: kubelet and kube-proxy, then containerd with its sandboxes, then the
        // process holding the mount namespace (its mounts go with it).
        for n in &mut self.nodes {
            for c in [n.kubelet.take(), n.proxy.take()].into_iter().flatten() {
                let mut c = c;
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.containerd.take() {
                c.stop();
            }
            if let Some(mut h) = n.holder.take() {
                let _ = h.kill();
                let _ = h.wait();
            }
        }
        for n in &self.nodes {
            for h in cgroup_hierarchies() {
                remove_cgroup_tree(&PathBuf::from(format!("{h}{}", n.cgroup_root)));
            }
        }
        for (_, c) in self.control.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (k, v) in &self.kernel_saved {
            let _ = std::fs::write(sysctl_path(k), v);
        }
    }
}
