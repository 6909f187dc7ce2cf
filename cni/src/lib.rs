//! The `aws-cni` CNI plugin: asks ipamd for a VPC address and builds the pod's veth
//! datapath; tears it down on DEL. Single-threaded, no AWS SDK, no Kubernetes client.

pub mod args;
pub mod config;
pub mod datapath;
pub mod egress;
pub mod error;
pub mod ipamd;
#[macro_use]
pub mod log;
pub mod plugin;
pub mod result;
pub mod upstream;
pub mod version;

/// A plugin binary's `main`: reads the CNI environment and stdin, runs `verb`, writes the
/// result (or the CNI error JSON, exiting 1) to stdout.
pub fn exec(verb: fn(&plugin::CniEnv, &[u8]) -> error::Result<Option<serde_json::Value>>) {
    use std::io::{Read, Write};
    let env = plugin::CniEnv::from_process();
    let mut stdin = Vec::new();
    if !env.command.is_empty() {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let out = verb(&env, &stdin);
    let mut stdout = std::io::stdout().lock();
    match out {
        Ok(Some(v)) => {
            let _ = writeln!(stdout, "{v}");
        }
        Ok(None) => {}
        Err(e) => {
            let version = config::peek_version(&stdin).unwrap_or_else(|| "1.0.0".into());
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            let _ = stdout.flush();
            std::process::exit(1);
        }
    }
}
