//! `aws-cni`: exec'd by the container runtime. The result, or the CNI error JSON,
//! goes to stdout; the exit status is 0 on success and 1 on error.

use std::io::{Read, Write};

use aws_cni::config::peek_version;
use aws_cni::plugin::{CniEnv, run};

fn main() {
    let env = CniEnv::from_process();
    let mut stdin = Vec::new();
    if !env.command.is_empty() {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let out = run(&env, &stdin);
    let mut stdout = std::io::stdout().lock();
    match out {
        Ok(Some(v)) => {
            let _ = writeln!(stdout, "{v}");
        }
        Ok(None) => {}
        Err(e) => {
            let version = peek_version(&stdin).unwrap_or_else(|| "1.0.0".into());
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            let _ = stdout.flush();
            std::process::exit(1);
        }
    }
}
