//! What a runtime hands the plugin: the CNI_* environment (here the first lines of the
//! input, `KEY=VALUE`) and the network configuration on stdin (the rest), with a
//! prevResult in it. Every parse either succeeds or returns a CNI error: no panic, and
//! a result that parsed is turned back into JSON of the configuration's version.
#![no_main]

use aws_cni::args::K8sArgs;
use aws_cni::config::{NetConf, peek_version};
use aws_cni::plugin::CniEnv;
use aws_cni::result::CniResult;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (env_part, stdin) = data.split_at(split);
    let stdin = stdin.get(1..).unwrap_or_default();
    let mut env = CniEnv::default();
    for line in String::from_utf8_lossy(env_part).lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "CNI_COMMAND" => env.command = v.to_string(),
            "CNI_CONTAINERID" => env.container_id = v.to_string(),
            "CNI_NETNS" => env.netns = v.to_string(),
            "CNI_IFNAME" => env.if_name = v.to_string(),
            "CNI_ARGS" => env.args = v.to_string(),
            _ => {}
        }
    }
    let _ = env.require_container_id();
    let _ = env.require_if_name();
    let _ = K8sArgs::parse(&env.args);
    let _ = peek_version(stdin);
    let _ = aws_cni::version::version_info(peek_version(stdin).as_deref());
    if let Ok(conf) = NetConf::parse(stdin) {
        if let Some(prev) = &conf.prev_result
            && let Ok(r) = CniResult::from_prev(prev)
        {
            let _ = r.sandbox_ipv4(&env.if_name);
            let _ = r.to_json(conf.cni_version, &conf.cni_version_str);
        }
    }
});
