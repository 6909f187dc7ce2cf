//! Runs the real `aws-cni` binary the way a container runtime does: a clean
//! environment of CNI_* variables, the network configuration on stdin, inside the
//! node's network namespace.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::fake_ipamd::FakeIpamd;
use crate::netns::Node;

/// The plugin binary: `$AWS_CNI_BIN`, or the workspace's target dir (debug, or release
/// for benchmarks). Build it first with `cargo build -p aws-cni`.
pub fn plugin_bin(release: bool) -> PathBuf {
    if let Ok(p) = std::env::var("AWS_CNI_BIN") {
        return PathBuf::from(p);
    }
    built_bin("aws-cni", release)
}

/// The `egress-cni` binary of the workspace's target dir (built with `-p aws-cni`).
pub fn egress_bin() -> PathBuf {
    built_bin("egress-cni", false)
}

fn built_bin(name: &str, release: bool) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target
        .join(if release { "release" } else { "debug" })
        .join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build -p aws-cni{}` first",
        p.display(),
        if release { " --release" } else { "" }
    );
    p
}

#[derive(Debug)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub json: Value,
    pub stderr: String,
}

impl Output {
    /// The CNI error code, if the plugin failed.
    pub fn code(&self) -> Option<u64> {
        self.json.get("code").and_then(Value::as_u64)
    }

    pub fn msg(&self) -> String {
        self.json
            .get("msg")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub if_name: String,
    pub args: String,
}

impl Invocation {
    pub fn new(
        command: &str,
        container_id: &str,
        netns: &str,
        pod_ns: &str,
        pod_name: &str,
    ) -> Self {
        Invocation {
            command: command.into(),
            container_id: container_id.into(),
            netns: netns.into(),
            if_name: "eth0".into(),
            // containerd's form and (varying) order.
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={pod_ns};K8S_POD_NAME={pod_name};\
                 K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{pod_name}"
            ),
        }
    }

    pub fn with_command(&self, command: &str) -> Self {
        Invocation {
            command: command.into(),
            ..self.clone()
        }
    }
}

/// Execs the plugin inside the namespace at `node_netns` (or the caller's, if None).
pub fn run(bin: &PathBuf, node_netns: Option<&str>, inv: &Invocation, stdin: &str) -> Output {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", &inv.command)
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_NETNS", &inv.netns)
        .env("CNI_IFNAME", &inv.if_name)
        .env("CNI_ARGS", &inv.args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = node_netns {
        let ns = File::open(path).expect("open node netns");
        // SAFETY: setns is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn aws-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    // A plugin that hangs (a FIFO opened blocking, say) fails the test instead of it.
    let t0 = std::time::Instant::now();
    while child.try_wait().expect("wait aws-cni").is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "aws-cni {} did not finish within 20 s: it hangs",
                inv.command
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let out = child.wait_with_output().expect("wait aws-cni");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Output {
        success: out.status.success(),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A network configuration as libcni hands it to the plugin.
pub fn netconf(version: &str, socket: &str, log: &str, extra: &[(&str, Value)]) -> String {
    let mut v = serde_json::json!({
        "cniVersion": version,
        "name": "aws-cni",
        "type": "aws-cni",
        "mtu": "9001",
        "vethPrefix": "eni",
        "pluginLogFile": log,
        "pluginLogLevel": "Debug",
        "ipamdAddress": socket,
    });
    for (k, val) in extra {
        v[*k] = val.clone();
    }
    v.to_string()
}

/// A node namespace, the test daemon and the plugin binary: what every plugin test needs.
pub struct World {
    pub node: Node,
    pub ipamd: FakeIpamd,
    pub log: String,
    pub bin: PathBuf,
}

impl World {
    /// Nothing of any pod on the node that a pod could use: no host veth up (DEL leaves
    /// a pod's pair, down, for the removal of its namespace), no pod rule, no route to a
    /// pod address (10.0.9.0/24 in these tests).
    pub fn assert_node_clean(&self) {
        let links = self.node.ns.exec(&["ip", "-o", "link", "show"]);
        for l in links.lines().filter(|l| l.contains(": eni")) {
            let flags = l.split('<').nth(1).and_then(|f| f.split('>').next());
            assert!(
                !flags.unwrap_or_default().split(',').any(|f| f == "UP"),
                "a host veth was left up: {l}"
            );
        }
        let rules = self.node.ns.exec(&["ip", "rule", "show"]);
        assert!(
            !rules.contains("512:") && !rules.contains("1536:"),
            "rules left: {rules}"
        );
        let routes = self.node.ns.exec(&["ip", "route", "show"]);
        assert!(
            !routes.contains("10.0.9."),
            "a pod route was left: {routes}"
        );
    }

    /// No host veth at all (every pod namespace of the test removed).
    pub fn assert_no_host_veth(&self) {
        let t = std::time::Instant::now();
        loop {
            let links = self.node.ns.exec(&["ip", "-o", "link", "show"]);
            if !links.contains(": eni") {
                return;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "host veths 5 s after their namespaces went: {links}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The daemon serves `pool` (address, ENI device number).
    pub fn new<A: Into<std::net::IpAddr>>(pool: Vec<(A, i32)>) -> World {
        crate::require_root();
        let ipamd = FakeIpamd::start(pool);
        let log = ipamd.dir.join("plugin.log").display().to_string();
        World {
            node: Node::new("192.168.0.10"),
            ipamd,
            log,
            bin: plugin_bin(false),
        }
    }

    pub fn conf(&self, version: &str, extra: &[(&str, Value)]) -> String {
        netconf(version, &self.ipamd.socket_str(), &self.log, extra)
    }

    pub fn run(&self, inv: &Invocation, stdin: &str) -> Output {
        run(&self.bin, Some(&self.node.ns.path()), inv, stdin)
    }
}
