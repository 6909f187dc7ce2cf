//! The node entrypoint (`aws-vpc-cni`) as the DaemonSet runs it: it refuses a bad env
//! before touching anything, and writes the conflist only once ipamd is healthy.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ec2_emulator_sdk_check::Emulator;

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let h = Host {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(h.image()).unwrap();
        std::fs::write(h.image().join("aws-cni"), b"#!/bin/sh\necho plugin\n").unwrap();
        h
    }
    fn image(&self) -> PathBuf {
        self.dir.path().join("app")
    }
    fn bin(&self) -> PathBuf {
        self.dir.path().join("opt/cni/bin")
    }
    fn conf(&self) -> PathBuf {
        self.dir.path().join("etc/cni/net.d/10-aws.conflist")
    }
    /// A stand-in for ipamd: a shell script.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
    fn command(&self, ipamd: &Path, env: &[(&str, String)]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_aws-vpc-cni"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST_CNI_BIN_PATH", self.bin())
            .env("HOST_CNI_CONFDIR_PATH", self.conf().parent().unwrap())
            .env("CNI_PLUGIN_SOURCE_DIR", self.image())
            .env("IPAMD_BIN", ipamd)
            .env(
                "IPAMD_SOCKET",
                self.dir.path().join("ipamd.sock").display().to_string(),
            )
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }
}

fn stderr_of(c: Child) -> (Option<i32>, String) {
    let out = c.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refuses_an_invalid_env_naming_the_variable_and_touches_nothing() {
    let h = Host::new();
    let marker = h.dir.path().join("ipamd-started");
    let ipamd = h.script("ipamd", &format!("touch {}", marker.display()));
    for (var, val) in [
        ("WARM_ENI_TARGET", "lots"),
        ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "sometimes"),
        ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "loud"),
        ("HOST_CNI_CONFDIR_PATH", "etc/cni"),
    ] {
        let c = h
            .command(&ipamd, &[(var, val.to_string())])
            .spawn()
            .unwrap();
        let (code, err) = stderr_of(c);
        assert_eq!(code, Some(2), "{var}: {err}");
        assert!(err.contains(var) && err.contains(val), "{var}: {err}");
        assert!(!h.bin().join("aws-cni").exists(), "{var}: plugin installed");
        assert!(!h.conf().exists(), "{var}: conflist written");
        assert!(!marker.exists(), "{var}: ipamd started");
    }
}

#[test]
fn an_ipamd_that_never_gets_healthy_gets_no_conflist() {
    let h = Host::new();
    // Never opens the socket.
    let ipamd = h.script("ipamd", "exec sleep 60");
    let t0 = Instant::now();
    let c = h
        .command(&ipamd, &[("IPAMD_READY_TIMEOUT_MS", "1500".into())])
        .spawn()
        .unwrap();
    let (code, err) = stderr_of(c);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not healthy") && err.contains("1.5s"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "the stand-in was stopped"
    );
    assert!(!h.conf().exists());
    // The plugin is installed first (harmless without a conflist), executable, identical.
    let installed = h.bin().join("aws-cni");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(h.image().join("aws-cni")).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );

    // An ipamd that dies at once: reported, and still no conflist.
    let dead = h.script("dead-ipamd", "echo 'WARM_IP_TARGET is bad' >&2; exit 3");
    let (code, err) = stderr_of(h.command(&dead, &[]).spawn().unwrap());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("exited before it became healthy"), "{err}");
    assert!(err.contains("exit status: 3"), "{err}");
    assert!(!h.conf().exists());
}

#[test]
fn writes_the_conflist_only_once_ipamd_is_healthy() {
    in_node_ns("entry", writes_the_conflist_only_once_ipamd_is_healthy_)
}

async fn writes_the_conflist_only_once_ipamd_is_healthy_() {
    let emu = Emulator::start();
    emu.seed(&["--type", "t3.medium"]);
    let h = Host::new();
    // The real ipamd, started 2 s late: a window where a careless entrypoint would
    // already have written the conflist.
    let mut d = Ipamd::start(&emu, &[]);
    let env: Vec<(&str, String)> = d
        .env
        .iter()
        .filter(|(k, _)| *k != "IPAMD_SOCKET")
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    // The fixture's own ipamd is not wanted: only its env, emulator and hotplug.
    if let Some(mut c) = d.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let ipamd = h.script(
        "ipamd",
        &format!("sleep 2; exec {}", env!("CARGO_BIN_EXE_ipamd")),
    );
    let socket = h.dir.path().join("ipamd.sock");
    let mut entry = h
        .command(&ipamd, &env)
        .env("AWS_VPC_ENI_MTU", "1500")
        // ipamd's log shares the entrypoint's stderr pipe, read only at the end.
        .env("AWS_VPC_K8S_CNI_LOGLEVEL", "ERROR")
        .env("AWS_VPC_K8S_PLUGIN_LOG_FILE", "/var/log/test-plugin.log")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut seen_unhealthy = false;
    // Invariant, polled: whenever the conflist exists, ipamd answers SERVING.
    loop {
        let conf_exists = h.conf().exists();
        let healthy = match connect(&socket, Duration::ZERO).await {
            Ok(c) => c.healthy().await,
            Err(_) => false,
        };
        if conf_exists {
            assert!(healthy, "conflist written before ipamd was healthy");
            break;
        }
        seen_unhealthy |= !healthy;
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no conflist after 30 s"
        );
        assert!(entry.try_wait().unwrap().is_none(), "entrypoint exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen_unhealthy,
        "the test saw the window before ipamd served"
    );
    assert!(t0.elapsed() >= Duration::from_secs(2));
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(h.conf()).unwrap()).unwrap();
    assert_eq!(conf["name"], "aws-cni");
    let p = &conf["plugins"][0];
    assert_eq!(p["type"], "aws-cni");
    assert_eq!(p["mtu"], "1500");
    assert_eq!(p["ipamdAddress"], socket.display().to_string());
    assert_eq!(p["pluginLogFile"], "/var/log/test-plugin.log");
    assert!(h.bin().join("aws-cni").exists());
    // SIGTERM reaches ipamd through the entrypoint; both exit cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(entry.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (code, err) = stderr_of(entry);
    assert_eq!(code, Some(0), "ipamd stopped cleanly: {err}");
    assert!(err.contains("wrote"), "{err}");
    assert!(
        connect(&socket, Duration::from_millis(200)).await.is_err(),
        "ipamd stopped"
    );
}

#[test]
fn init_sets_forwarding_and_loose_rp_filter_on_the_primary_interface() {
    in_node_ns("entry-init", async || {
        let init = || {
            Command::new(env!("CARGO_BIN_EXE_aws-vpc-cni"))
                .arg("init")
                .output()
                .unwrap()
        };
        let out = init();
        assert!(!out.status.success(), "no default route yet");
        assert!(String::from_utf8_lossy(&out.stderr).contains("no default route"));
        for c in [
            "ip link add ens5 type veth peer name ens5-peer",
            "ip addr add 192.168.0.10/24 dev ens5",
            "ip link set ens5 up",
            "ip link set ens5-peer up",
            "ip route add default via 192.168.0.1",
        ] {
            sh(&c.split(' ').collect::<Vec<_>>());
        }
        let read = |k: &str| sh(&["cat", &format!("/proc/sys/net/ipv4/{k}")]);
        assert_eq!(read("ip_forward").trim(), "0", "a fresh namespace");
        let out = init();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(read("ip_forward").trim(), "1");
        assert_eq!(read("conf/ens5/rp_filter").trim(), "2");
    })
}

#[test]
fn ipv6_mode_installs_and_chains_egress_cni_with_the_nodes_primary_ipv4() {
    in_node_ns(
        "entry6",
        ipv6_mode_installs_and_chains_egress_cni_with_the_nodes_primary_ipv4_,
    )
}

async fn ipv6_mode_installs_and_chains_egress_cni_with_the_nodes_primary_ipv4_() {
    let emu = Emulator::start();
    let id = emu.seed(&["--ipv6"]).remove(0);
    let h = Host::new();
    std::fs::write(h.image().join("egress-cni"), b"#!/bin/sh\necho egress\n").unwrap();
    let mut d = Ipamd::start(
        &emu,
        &[
            ("ENABLE_IPv6", "true"),
            ("ENABLE_IPv4", "false"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
        ],
    );
    let env: Vec<(&str, String)> = d
        .env
        .iter()
        .filter(|(k, _)| *k != "IPAMD_SOCKET")
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    if let Some(mut c) = d.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let mut entry = h
        .command(Path::new(env!("CARGO_BIN_EXE_ipamd")), &env)
        .env("AWS_VPC_K8S_CNI_LOGLEVEL", "ERROR")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !h.conf().exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no conflist after 30 s"
        );
        assert!(entry.try_wait().unwrap().is_none(), "entrypoint exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(h.conf()).unwrap()).unwrap();
    let (_, inst) = ec2_instance(&emu, &id).await;
    let e = &conf["plugins"][1];
    assert_eq!(e["type"], "egress-cni", "{conf}");
    assert_eq!(e["nodeIP"], inst.private_ip_address().unwrap(), "{conf}");
    assert_eq!(
        std::fs::read(h.bin().join("egress-cni")).unwrap(),
        b"#!/bin/sh\necho egress\n"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(entry.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (code, err) = stderr_of(entry);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn init_in_ipv6_mode_turns_ipv6_forwarding_on_and_keeps_router_advertisements() {
    in_node_ns("entry-init6", async || {
        for c in [
            "ip link add ens5 type veth peer name ens5-peer",
            "ip addr add 192.168.0.10/24 dev ens5",
            "ip link set ens5 up",
            "ip link set ens5-peer up",
            "ip route add default via 192.168.0.1",
        ] {
            sh(&c.split(' ').collect::<Vec<_>>());
        }
        let read = |k: &str| sh(&["cat", &format!("/proc/sys/net/ipv6/conf/{k}")]);
        let out = Command::new(env!("CARGO_BIN_EXE_aws-vpc-cni"))
            .arg("init")
            .env("ENABLE_IPv6", "true")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(read("all/forwarding").trim(), "1");
        assert_eq!(read("all/disable_ipv6").trim(), "0");
        assert_eq!(read("ens5/accept_ra").trim(), "2");
    })
}
