//! The node entrypoint (`aws-vpc-cni`, the image's command): validates the whole
//! environment, installs the `aws-cni` plugin into the host's CNI bin dir, starts ipamd,
//! waits until ipamd's gRPC health check says SERVING, and only then writes
//! `10-aws.conflist`, so the container runtime never calls a plugin whose daemon is not
//! ready. It then stays ipamd's parent: SIGTERM/SIGINT are passed on, ipamd's exit status
//! is ours.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vpc_cni_proto::address::IpamdAddress;
use vpc_cni_proto::conf::{DEFAULT_PLUGIN_LOG_FILE, LogLevel};

pub const CONFLIST_NAME: &str = "10-aws.conflist";

#[derive(Debug, Clone)]
pub struct Settings {
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// Where the image keeps `aws-cni`.
    pub plugin_source: PathBuf,
    pub ipamd_bin: PathBuf,
    pub ready_timeout: Duration,
    pub conflist: Value,
    /// IPv6 mode: `egress-cni` is installed too and chained after `aws-cni`; with IPv4
    /// egress on (ENABLE_V4_EGRESS), its `nodeIP` is filled in from IMDS before the
    /// conflist is written.
    pub ipv6: bool,
    pub v4_egress: bool,
}

/// egress-cni's IPv4 range and address store (upstream's).
pub const EGRESS_V4_SUBNET: &str = "169.254.172.0/22";
pub const EGRESS_V4_DATA_DIR: &str = "/run/cni/v6pd/egress-v4-ipam";

fn env_or(get: &impl Fn(&str) -> Option<String>, var: &str, default: &str) -> String {
    get(var)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Everything the entrypoint and ipamd read, checked before anything is touched.
pub fn settings(get: impl Fn(&str) -> Option<String>, exe_dir: &Path) -> Result<Settings, String> {
    let cfg = ipamd_core::config::from_env(&get).map_err(|e| e.to_string())?;
    ipamd_core::node::timing_from_env(&get).map_err(|e| e.to_string())?;
    crate::kube::check(&cfg, &get)?;
    let level = env_or(&get, "AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "DEBUG");
    if LogLevel::parse(&level).is_none() {
        return Err(format!(
            "AWS_VPC_K8S_PLUGIN_LOG_LEVEL={level:?} is invalid: DEBUG, INFO, WARN or ERROR"
        ));
    }
    let log_file = env_or(&get, "AWS_VPC_K8S_PLUGIN_LOG_FILE", DEFAULT_PLUGIN_LOG_FILE);
    if log_file == "stdout" {
        return Err(
            "AWS_VPC_K8S_PLUGIN_LOG_FILE=\"stdout\" is invalid: stdout carries the CNI result; use a path, stderr or none"
                .into(),
        );
    }
    let abs = |var: &str, default: &str| -> Result<PathBuf, String> {
        let v = env_or(&get, var, default);
        if v.starts_with('/') {
            Ok(PathBuf::from(v))
        } else {
            Err(format!("{var}={v:?} is invalid: an absolute path"))
        }
    };
    let exe = exe_dir.display().to_string();
    let timeout_raw = env_or(&get, "IPAMD_READY_TIMEOUT_MS", "300000");
    let ready_timeout = timeout_raw
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            format!("IPAMD_READY_TIMEOUT_MS={timeout_raw:?} is invalid: a positive number of milliseconds")
        })?;
    let socket = cfg.socket_path.clone();
    IpamdAddress::parse(&socket).map_err(|e| format!("IPAMD_SOCKET={socket:?} is invalid: {e}"))?;
    let cni_bin_dir = abs("HOST_CNI_BIN_PATH", "/host/opt/cni/bin")?;
    let mut plugins = vec![json!({
        "name": "aws-cni",
        "type": "aws-cni",
        "mtu": cfg.eni_mtu.to_string(),
        "vethPrefix": cfg.veth_prefix,
        "pluginLogFile": log_file,
        "pluginLogLevel": level,
        "ipamdAddress": socket,
    })];
    let v4_egress = match env_or(&get, "ENABLE_V4_EGRESS", "true")
        .to_ascii_lowercase()
        .as_str()
    {
        "true" => true,
        "false" => false,
        v => return Err(format!("ENABLE_V4_EGRESS={v:?} is invalid: true or false")),
    };
    if cfg.enable_ipv6 {
        let egress_level = env_or(&get, "AWS_VPC_K8S_EGRESS_PLUGIN_LOG_LEVEL", "DEBUG");
        if LogLevel::parse(&egress_level).is_none() {
            return Err(format!(
                "AWS_VPC_K8S_EGRESS_PLUGIN_LOG_LEVEL={egress_level:?} is invalid: DEBUG, INFO, WARN or ERROR"
            ));
        }
        plugins.push(json!({
            "name": "egress-cni",
            "type": "egress-cni",
            "mtu": cfg.eni_mtu.to_string(),
            "enabled": v4_egress.to_string(),
            "randomizeSNAT": format!("{:?}", cfg.randomize_snat).to_ascii_lowercase(),
            "nodeIP": "",
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": EGRESS_V4_SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": EGRESS_V4_DATA_DIR,
            },
            "pluginLogFile": env_or(&get, "AWS_VPC_K8S_EGRESS_PLUGIN_LOG_FILE", "/var/log/aws-routed-eni/egress-v4-plugin.log"),
            "pluginLogLevel": egress_level,
        }));
    }
    // hostPort pods need portmap; chain it when the node has it, as upstream's list does.
    if cni_bin_dir.join("portmap").exists() {
        plugins.push(json!({
            "type": "portmap",
            "capabilities": {"portMappings": true},
            "snat": true,
        }));
    }
    Ok(Settings {
        cni_conf_dir: abs("HOST_CNI_CONFDIR_PATH", "/host/etc/cni/net.d")?,
        plugin_source: abs("CNI_PLUGIN_SOURCE_DIR", &exe)?.join("aws-cni"),
        ipamd_bin: abs("IPAMD_BIN", &format!("{exe}/ipamd"))?,
        cni_bin_dir,
        ready_timeout,
        ipv6: cfg.enable_ipv6,
        v4_egress: cfg.enable_ipv6 && v4_egress,
        conflist: json!({
            "cniVersion": "1.0.0",
            "name": "aws-cni",
            "disableCheck": true,
            "plugins": plugins,
        }),
    })
}

/// Writes `bytes` to `dest` through a temporary file and a rename: a reader (the runtime,
/// or a node still running the old plugin) never sees half a file.
pub fn install_atomically(dest: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, dest)
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("aws-vpc-cni: {msg}");
}

pub async fn run(mut s: Settings) -> ExitCode {
    let mut binaries = vec![s.plugin_source.clone()];
    if s.ipv6 {
        binaries.push(s.plugin_source.with_file_name("egress-cni"));
    }
    for src in binaries {
        let plugin = match std::fs::read(&src) {
            Ok(b) => b,
            Err(e) => {
                log(format!("reading {}: {e}", src.display()));
                return ExitCode::from(1);
            }
        };
        let dest = s.cni_bin_dir.join(src.file_name().unwrap_or_default());
        if let Err(e) = install_atomically(&dest, &plugin, 0o755) {
            log(format!("installing {}: {e}", dest.display()));
            return ExitCode::from(1);
        }
        log(format!("installed {}", dest.display()));
    }
    let mut child = match tokio::process::Command::new(&s.ipamd_bin).spawn() {
        Ok(c) => c,
        Err(e) => {
            log(format!("starting {}: {e}", s.ipamd_bin.display()));
            return ExitCode::from(1);
        }
    };
    let socket = s.conflist["plugins"][0]["ipamdAddress"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let addr = match IpamdAddress::parse(&socket) {
        Ok(a) => a,
        Err(e) => {
            log(e);
            return ExitCode::from(2);
        }
    };
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            log("cannot handle signals");
            return ExitCode::from(1);
        }
    };
    let pass_on = |child: &tokio::process::Child, sig: nix::sys::signal::Signal| {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    };
    let t0 = Instant::now();
    let deadline = t0 + s.ready_timeout;
    loop {
        tokio::select! {
            st = child.wait() => {
                log(format!("ipamd exited before it became healthy ({}); not writing {CONFLIST_NAME}",
                    st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())));
                return ExitCode::from(1);
            }
            _ = term.recv() => { pass_on(&child, nix::sys::signal::Signal::SIGTERM); let _ = child.wait().await; return ExitCode::from(143); }
            _ = int.recv() => { pass_on(&child, nix::sys::signal::Signal::SIGINT); let _ = child.wait().await; return ExitCode::from(130); }
            ok = crate::cli::serving(&addr) => {
                if ok.is_ok() { break; }
                if Instant::now() >= deadline {
                    log(format!("ipamd not healthy at {addr} within {:?}; stopping it, not writing {CONFLIST_NAME}", s.ready_timeout));
                    pass_on(&child, nix::sys::signal::Signal::SIGTERM);
                    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                    let _ = child.kill().await;
                    return ExitCode::from(1);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    if s.v4_egress {
        // ipamd is healthy: IMDS has answered it, so it answers us.
        use ipamd_core::cloud::Imds;
        match crate::aws::SdkImds::from_env().instance().await {
            Ok(m) => {
                if let Some(p) = s.conflist["plugins"]
                    .as_array_mut()
                    .and_then(|ps| ps.iter_mut().find(|p| p["type"] == "egress-cni"))
                {
                    p["nodeIP"] = m.primary_ip.to_string().into();
                }
            }
            Err(e) => {
                log(format!(
                    "the node's primary IPv4 (IMDS local-ipv4, for IPv4 egress): {e}; not writing {CONFLIST_NAME}"
                ));
                pass_on(&child, nix::sys::signal::Signal::SIGTERM);
                let _ = child.wait().await;
                return ExitCode::from(1);
            }
        }
    }
    let conf = s.cni_conf_dir.join(CONFLIST_NAME);
    let text = serde_json::to_vec_pretty(&s.conflist).unwrap_or_default();
    if let Err(e) = install_atomically(&conf, &text, 0o644) {
        log(format!("writing {}: {e}", conf.display()));
        pass_on(&child, nix::sys::signal::Signal::SIGTERM);
        let _ = child.wait().await;
        return ExitCode::from(1);
    }
    log(format!(
        "ipamd healthy after {:?}; wrote {}",
        t0.elapsed(),
        conf.display()
    ));
    let status = tokio::select! {
        st = child.wait() => st,
        _ = term.recv() => { pass_on(&child, nix::sys::signal::Signal::SIGTERM); child.wait().await }
        _ = int.recv() => { pass_on(&child, nix::sys::signal::Signal::SIGINT); child.wait().await }
    };
    match status {
        Ok(st) if st.success() => ExitCode::SUCCESS,
        Ok(st) => {
            log(format!("ipamd {st}"));
            ExitCode::from(st.code().unwrap_or(1).clamp(1, 255) as u8)
        }
        Err(e) => {
            log(format!("waiting for ipamd: {e}"));
            ExitCode::from(1)
        }
    }
}

/// The interface of the default route in `/proc/net/route` text (the primary ENI).
pub fn default_route_interface(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// `aws-vpc-cni init`, the privileged init container: the sysctls ipamd needs but cannot
/// write from a container without privileges (/proc/sys is read-only there). ipamd checks
/// them again and only writes what differs.
pub fn init_sysctls() -> Result<(), String> {
    let routes = std::fs::read_to_string("/proc/net/route")
        .map_err(|e| format!("reading /proc/net/route: {e}"))?;
    let primary = default_route_interface(&routes)
        .ok_or("no default route: cannot tell the primary interface")?;
    let ipv6 = std::env::var("ENABLE_IPv6").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    for (path, value) in init_sysctl_list(&primary, ipv6) {
        let full = format!("/proc/sys/{path}");
        std::fs::write(&full, value).map_err(|e| format!("setting {full} to {value}: {e}"))?;
        log(format!("{full} = {value}"));
    }
    Ok(())
}

/// What `init` sets: IPv4 forwarding and loose rp_filter on the primary interface; with
/// ENABLE_IPv6, IPv6 on, forwarding, and router advertisements still accepted on the
/// primary interface (`accept_ra=2`: forwarding would otherwise turn them off, and with
/// them the node's default IPv6 route), as upstream's init.
pub fn init_sysctl_list(primary: &str, ipv6: bool) -> Vec<(String, &'static str)> {
    let mut v = vec![
        ("net/ipv4/ip_forward".to_string(), "1"),
        (format!("net/ipv4/conf/{primary}/rp_filter"), "2"),
    ];
    if ipv6 {
        v.extend([
            ("net/ipv6/conf/all/disable_ipv6".to_string(), "0"),
            (format!("net/ipv6/conf/{primary}/accept_ra"), "2"),
            ("net/ipv6/conf/all/forwarding".to_string(), "1"),
        ]);
    }
    v
}

/// The env as a lookup, for `settings`.
pub fn process_env() -> impl Fn(&str) -> Option<String> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    move |k| env.get(k).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<Settings, String> {
        let m: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        settings(move |k| m.get(k).cloned(), Path::new("/app"))
    }

    #[test]
    fn primary_interface_from_the_route_table() {
        let t = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 ens5\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 ens5\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(t).as_deref(), Some("ens5"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None);
    }

    #[test]
    fn defaults_follow_upstream_paths() {
        let s = with(&[]).unwrap();
        assert_eq!(s.cni_bin_dir, Path::new("/host/opt/cni/bin"));
        assert_eq!(s.cni_conf_dir, Path::new("/host/etc/cni/net.d"));
        assert_eq!(s.plugin_source, Path::new("/app/aws-cni"));
        assert_eq!(s.ipamd_bin, Path::new("/app/ipamd"));
        let p = &s.conflist["plugins"][0];
        assert_eq!(p["type"], "aws-cni");
        assert_eq!(p["mtu"], "9001");
        assert_eq!(p["vethPrefix"], "eni");
        assert_eq!(p["ipamdAddress"], "/var/run/aws-node/ipamd.sock");
        assert_eq!(p["pluginLogFile"], "/var/log/aws-routed-eni/plugin.log");
        assert_eq!(s.conflist["plugins"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn knobs_reach_the_conflist() {
        let s = with(&[
            ("AWS_VPC_ENI_MTU", "1500"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "abc"),
            ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "info"),
        ])
        .unwrap();
        let p = &s.conflist["plugins"][0];
        assert_eq!(p["mtu"], "1500");
        assert_eq!(p["vethPrefix"], "abc");
        assert_eq!(p["pluginLogLevel"], "info");
    }

    #[test]
    fn ipv6_mode_chains_egress_cni_and_init_sets_the_ipv6_sysctls() {
        let v6 = [
            ("ENABLE_IPv6", "true"),
            ("ENABLE_IPv4", "false"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
        ];
        let s = with(&v6).unwrap();
        assert!(s.ipv6 && s.v4_egress);
        let plugins = s.conflist["plugins"].as_array().unwrap();
        assert_eq!(plugins[0]["type"], "aws-cni");
        let e = &plugins[1];
        assert_eq!(e["type"], "egress-cni");
        assert_eq!(e["enabled"], "true");
        assert_eq!(e["randomizeSNAT"], "prng");
        assert_eq!(e["ipam"]["ranges"][0][0]["subnet"], "169.254.172.0/22");
        let off = with(&[&v6[..], &[("ENABLE_V4_EGRESS", "false")]].concat()).unwrap();
        assert!(!off.v4_egress);
        assert_eq!(off.conflist["plugins"][1]["enabled"], "false");
        assert!(
            with(&[&v6[..], &[("ENABLE_V4_EGRESS", "maybe")]].concat())
                .unwrap_err()
                .contains("ENABLE_V4_EGRESS")
        );
        // An IPv4 node has one plugin, and init touches no IPv6 setting.
        assert_eq!(
            with(&[]).unwrap().conflist["plugins"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert!(
            init_sysctl_list("ens5", false)
                .iter()
                .all(|(p, _)| !p.contains("ipv6"))
        );
        let six = init_sysctl_list("ens5", true);
        assert!(six.contains(&("net/ipv6/conf/ens5/accept_ra".into(), "2")));
        assert!(six.contains(&("net/ipv6/conf/all/forwarding".into(), "1")));
        assert!(six.contains(&("net/ipv6/conf/all/disable_ipv6".into(), "0")));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, v) in [
            ("WARM_ENI_TARGET", "lots"),
            ("AWS_VPC_ENI_MTU", "100"),
            ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "loud"),
            ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "stdout"),
            ("HOST_CNI_BIN_PATH", "relative/bin"),
            ("IPAMD_READY_TIMEOUT_MS", "soon"),
            ("INTROSPECTION_BIND_ADDRESS", "somewhere"),
        ] {
            let e = with(&[(var, v)]).unwrap_err();
            assert!(e.contains(var), "{var}: {e}");
        }
    }
}
