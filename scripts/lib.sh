# Shared by scripts/run and scripts/test: install what a fresh Debian machine lacks.
# shellcheck shell=bash

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "This needs root (network namespaces, veths, routes). Run it as root (on a minimal Debian there is no sudo: su - first)." >&2
        exit 1
    fi
}

# Debian packages the tests and the demo use (containerd, runc, the reference CNI plugins
# for `loopback`, busybox-static for the sandbox image: the lab's container runtime;
# openssl for the test API server's service-account key).
DEBIAN_PACKAGES=(iproute2 iptables iputils-ping procps python3 python3-venv ca-certificates curl
    openssl containerd runc containernetworking-plugins busybox-static
    mmdebstrap umoci binutils conntrack)

install_packages() {
    local missing=()
    for p in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

need_rust() {
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null; then
        echo "Rust is not installed. Install it with rustup (https://rustup.rs), 1.85 or later." >&2
        exit 1
    fi
    local v
    v=$(rustc --version | awk '{print $2}')
    if [ "$(printf '%s\n1.85.0\n' "$v" | sort -V | head -1)" != "1.85.0" ]; then
        echo "rustc $v is too old: this workspace uses edition 2024 (Rust 1.85 or later)." >&2
        exit 1
    fi
}
