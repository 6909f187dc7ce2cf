//! Link the plugin as a non-PIE executable with lazy binding: the runtime exec's it
//! for every pod, and a PIE spends about a millisecond applying relocations first.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        println!("cargo:rustc-link-arg-bin=aws-cni=-no-pie");
        println!("cargo:rustc-link-arg-bin=aws-cni=-Wl,-z,lazy");
    }
}
