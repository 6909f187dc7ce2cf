//! containerd (the Debian package) with its CRI plugin, one per lab node, running inside
//! the node's network namespace with its own root, state, socket and CNI directories, and
//! a sandbox image built locally from busybox-static (no registry).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::sh;

pub const SANDBOX_IMAGE: &str = "lab.local/pause:1";

/// Builds (once per directory) a Docker-archive image whose only process is a busybox
/// shell that sleeps until SIGTERM: the pod sandbox ("pause") image, and (with busybox's
/// applets in /bin) the image the cluster tests' pods run.
pub fn sandbox_image(dir: &Path) -> PathBuf {
    let tar = dir.join("pause.tar");
    if tar.exists() {
        return tar;
    }
    let work = dir.join("pause-build");
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("/bin/busybox (apt-get install busybox-static)");
    // Every applet under its name, as a pod's `command` names them (/bin/sleep, /bin/ping).
    for applet in sh(&["/bin/busybox", "--list"]).split_whitespace() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
    }
    sh(&[
        "tar",
        "-C",
        &rootfs.display().to_string(),
        "-cf",
        &work.join("layer.tar").display().to_string(),
        ".",
    ]);
    let digest = sh(&["sha256sum", &work.join("layer.tar").display().to_string()]);
    let digest = digest.split_whitespace().next().unwrap().to_string();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/busybox", "sh", "-c",
                "trap 'exit 0' TERM INT; while :; do /bin/busybox sleep 3600 & wait; done"],
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
    });
    std::fs::write(work.join("config.json"), config.to_string()).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [SANDBOX_IMAGE],
        "Layers": ["layer.tar"],
    }]);
    std::fs::write(work.join("manifest.json"), manifest.to_string()).unwrap();
    sh(&[
        "tar",
        "-C",
        &work.display().to_string(),
        "-cf",
        &tar.display().to_string(),
        "manifest.json",
        "config.json",
        "layer.tar",
    ]);
    tar
}

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
}

/// Spawns `cmd` with the network namespace at `netns` (the calling thread is untouched).
pub fn spawn_in_netns(netns: &str, mut cmd: Command) -> std::io::Result<Child> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::other)?;
        cmd.spawn()
    })
    .join()
    .map_err(|_| std::io::Error::other("spawn thread panicked"))?
}

impl Containerd {
    /// Starts containerd in `netns` (a path) with CNI from `cni_bin` / `cni_conf`, and
    /// imports the sandbox image. Returns once the CRI answers.
    pub fn start(netns: &str, dir: &Path, cni_bin: &Path, cni_conf: &Path) -> Containerd {
        Containerd::start_in(netns, None, dir, cni_bin, cni_conf)
    }

    /// As `start`, also inside the mount namespace `mnt` (a path) when given: a cluster
    /// node's, where `cni_bin` and `cni_conf` are the paths the node sees.
    pub fn start_in(
        netns: &str,
        mnt: Option<&str>,
        dir: &Path,
        cni_bin: &Path,
        cni_conf: &Path,
    ) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  # The sandbox's oom_score_adj -998 cannot be set here (no CAP_SYS_RESOURCE in this VM).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            image = SANDBOX_IMAGE,
            bin = cni_bin.display(),
            conf = cni_conf.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let mut cmd = match mnt {
            Some(m) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--mount={m}")).args(["--", "containerd"]);
                c
            }
            None => Command::new("containerd"),
        };
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn_in_netns(netns, cmd).expect("spawn containerd");
        // Its tasks' bundles (with each sandbox's netns) are under its state directory.
        crate::lab::note_state("containerd-state", &dir.join("state").display().to_string());
        let me = Containerd {
            dir: dir.to_path_buf(),
            socket,
            child: Some(child),
        };
        let t0 = Instant::now();
        while !me.ctr(&["version"]).0 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "containerd did not start:\n{}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let tar = sandbox_image(dir.parent().unwrap_or(dir));
        let (ok, out) = me.ctr(&[
            "-n",
            "k8s.io",
            "images",
            "import",
            &tar.display().to_string(),
        ]);
        assert!(ok, "importing the sandbox image: {out}");
        me
    }

    /// `ctr` against this containerd: (success, output).
    pub fn ctr(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("ctr");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Stops containerd and every sandbox it still runs (their shims and tasks).
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        // Sandboxes left behind by a failed test: kill their tasks, then containerd.
        let (_, containers) = self.ctr(&["-n", "k8s.io", "containers", "ls", "-q"]);
        let (_, tasks) = self.ctr(&["-n", "k8s.io", "tasks", "ls", "-q"]);
        for t in tasks.lines().filter(|l| !l.is_empty()) {
            let _ = self.ctr(&["-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", t]);
        }
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims outlive containerd by design; ours are found by their socket's directory.
        let _ = Command::new("pkill")
            .args([
                "-KILL",
                "-f",
                &format!("containerd-shim.*{}", self.dir.display()),
            ])
            .output();
        // Sandbox /dev/shm mounts and rootfs mounts under our root and state.
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "grep -o ' {0}/[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
                    self.dir.display()
                ),
            ])
            .output();
        // And what runc keeps outside our directory for them: cgroups and its state.
        for id in containers
            .lines()
            .filter(|l| !l.is_empty() && !l.contains('/'))
        {
            for dir in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = std::fs::remove_dir(dir.path().join("k8s.io").join(id));
            }
            let _ = std::fs::remove_dir_all(format!("/run/containerd/runc/k8s.io/{id}"));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}
