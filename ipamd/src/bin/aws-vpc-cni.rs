//! The image's command: validate the env, install aws-cni, start ipamd, wait until it is
//! healthy, then write 10-aws.conflist (see `ipamd::entrypoint`). `aws-vpc-cni init` is
//! the privileged init container's command: the sysctls ipamd needs.

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("init") {
        return match ipamd::entrypoint::init_sysctls() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("aws-vpc-cni init: {e}");
                ExitCode::from(1)
            }
        };
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .unwrap_or_else(|| "/app".into());
    let s = match ipamd::entrypoint::settings(ipamd::entrypoint::process_env(), &exe_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aws-vpc-cni: {e}");
            return ExitCode::from(2);
        }
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(ipamd::entrypoint::run(s)),
        Err(e) => {
            eprintln!("aws-vpc-cni: tokio runtime: {e}");
            ExitCode::from(1)
        }
    }
}
