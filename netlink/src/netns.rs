//! Network namespaces: entering one on the current thread, only long enough to open a
//! netlink socket there (the socket stays bound to that namespace afterwards).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sched::{CloneFlags, setns};

pub struct NetNs {
    file: File,
}

impl NetNs {
    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        Ok(Self {
            file: File::open("/proc/thread-self/ns/net")?,
        })
    }

    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` with the current thread inside `self`, then returns to `home`. Fails
    /// (without running `f`) if `self` is not a network namespace.
    pub fn run_in<R>(&self, home: &NetNs, f: impl FnOnce() -> R) -> io::Result<R> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(e) = setns(home.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Staying in the pod's namespace would make every later step act on the
            // wrong host: there is no safe way to continue.
            eprintln!("aws-cni: cannot return to the host network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }
}
