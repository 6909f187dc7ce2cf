//! Network namespaces: entering one on the current thread, only long enough to open a
//! netlink socket there (the socket stays bound to that namespace afterwards).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sched::{CloneFlags, setns};

// NS_GET_NSTYPE = _IO(0xb7, 0x3) (linux/nsfs.h): the CLONE_NEW* type of a namespace fd.
nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);

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

    /// Opens a network namespace by path. Non-blocking (a FIFO there must not hang the
    /// open) and checked: anything that is not a network namespace (a regular file, a
    /// directory, another kind of namespace) is `InvalidInput`, saying what it is.
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)?;
        let not = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is {what}, not a network namespace", path.display()),
            )
        };
        let fs = nix::sys::statfs::fstatfs(&file).map_err(io::Error::from)?;
        if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            let t = file.metadata()?.file_type();
            use std::os::unix::fs::FileTypeExt;
            let what = if t.is_dir() {
                "a directory"
            } else if t.is_fifo() {
                "a FIFO"
            } else if t.is_socket() {
                "a socket"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else {
                "a file"
            };
            return Err(not(what.into()));
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the namespace's type of
        // a descriptor we own for the duration of the call.
        let kind = unsafe { ns_get_nstype(file.as_raw_fd()) }.map_err(io::Error::from)?;
        if kind != CloneFlags::CLONE_NEWNET.bits() {
            return Err(not(format!("another kind of namespace (type {kind:#x})")));
        }
        Ok(Self { file })
    }

    /// The same namespace as `other` (the same nsfs inode)?
    pub fn same_as(&self, other: &NetNs) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (self.file.metadata()?, other.file.metadata()?);
        Ok(a.dev() == b.dev() && a.ino() == b.ino())
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
