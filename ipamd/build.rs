//! Link ipamd as a non-PIE executable: a PIE's dynamic relocations (about 1 MB of
//! `.rela.dyn` read and 0.7 MB of `.data.rel.ro` written at start-up) cost ipamd ~2 MB of
//! RSS for nothing on a daemon that is never loaded at a random base for security reasons
//! beyond the kernel's own. Measured by `cargo bench -p ipamd --bench ipamd` (README).
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        println!("cargo:rustc-link-arg-bin=ipamd=-no-pie");
    }
}
