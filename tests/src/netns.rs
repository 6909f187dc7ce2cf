//! Named network namespaces (`/var/run/netns/<name>`) for tests, removed on drop,
//! even when the test fails. Uses iproute2 to create them, never the root namespace.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use vpc_cni_netlink::Netlink;
use vpc_cni_netlink::netns::NetNs;

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct TestNs {
    pub name: String,
}

impl TestNs {
    /// A new namespace named `<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> TestNs {
        let name = format!(
            "{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = TestNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace; panics with its output if it fails.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs a command inside the namespace and reports whether it succeeded.
    pub fn try_exec(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Runs a command inside the namespace; its stdout, empty if it failed.
    pub fn try_output(&self, args: &[&str]) -> String {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// A netlink handle bound to this namespace (for checking what exists).
    /// Call inside a tokio runtime.
    pub fn netlink(&self) -> Netlink {
        let home = NetNs::current().expect("own netns");
        let ns = NetNs::open(std::path::Path::new(&self.path())).expect("open test netns");
        ns.run_in(&home, Netlink::connect)
            .expect("enter test netns")
            .expect("netlink socket")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub use ec2_emulator_sdk_check::hotplug::sh;

/// A node namespace as on an EC2 instance: an `eth0` carrying the node's primary
/// address (a veth whose peer stays unused), forwarding on, rp_filter loose.
pub struct Node {
    pub ns: TestNs,
    pub primary_ip: String,
}

impl Node {
    pub fn new(primary_ip: &str) -> Node {
        Node::tagged("node", primary_ip)
    }

    /// As [`Node::new`], with the namespace named `<tag>-<pid>-<n>`.
    pub fn tagged(tag: &str, primary_ip: &str) -> Node {
        let ns = TestNs::new(tag);
        ns.exec(&[
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{primary_ip}/24"),
            "dev",
            "eth0",
        ]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns.exec(&["ip", "link", "set", "eth0-peer", "up"]);
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv4.conf.all.rp_filter", "2");
        Node {
            ns,
            primary_ip: primary_ip.to_string(),
        }
    }
}
