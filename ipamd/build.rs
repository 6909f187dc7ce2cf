//! Link ipamd as a non-PIE executable, as Go links upstream's aws-node by default: a PIE's
//! start-up relocations (1 MB of `.rela.dyn` read, 0.7 MB of `.data.rel.ro` written) stay
//! resident, about 1 MB of ipamd's RSS (`cargo bench -p ipamd --bench ipamd`: 18.9-19.8 MB
//! as a PIE, 16.4-18.4 MB without, against a 20 MB target). The price is a fixed load
//! address for the binary's own image (libraries, heap and stacks stay randomised).
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        println!("cargo:rustc-link-arg-bin=ipamd=-no-pie");
    }
}
