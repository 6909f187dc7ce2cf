//! The on-disk state that survives a restart, in one place.
//!
//! `ipam.json` is upstream's snapshot format (`vpc-cni-ipam/1`), so a node can move
//! from aws-node to us with every pod keeping its address; we add `cooldowns`, which
//! upstream ignores. Between snapshots every change is one line appended to
//! `ipam.json.journal`; a writer thread batches concurrent changes into one write (and
//! one fdatasync), and an Add or Del is answered only after its line is written. A
//! snapshot is written atomically (temp file, fsync, rename) and then the journal is
//! emptied; replaying a journal over a newer snapshot is harmless (the last change to
//! each key wins), so a kill -9 at any instant loses nothing and doubles nothing.
//!
//! One file holds one family: `ipv4` entries on an IPv4 node, `ipv6` entries (as
//! upstream writes them with ENABLE_IPv6) on an IPv6 node. An entry of the other family
//! is not this node's state: the file is refused as a whole, naming it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::hash::Hash;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::datastore::{Assignment, PodRef, SandboxKey};

pub const VERSION: &str = "vpc-cni-ipam/1";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileMetadata {
    #[serde(
        rename = "k8sPodNamespace",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub namespace: String,
    #[serde(
        rename = "k8sPodName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileAllocation {
    #[serde(rename = "networkName")]
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(rename = "ifName")]
    pub if_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    #[serde(rename = "allocationTimestamp", default)]
    pub allocation_timestamp: i64,
    #[serde(default)]
    pub metadata: FileMetadata,
}

/// The address family of a checkpoint's entries: which of an entry's `ipv4` / `ipv6`
/// fields holds the address.
pub trait PodAddr:
    Copy + Eq + Hash + Ord + std::fmt::Display + std::str::FromStr + Send + Sync + 'static
{
    /// "ipv4" or "ipv6", the entry's field.
    const FIELD: &'static str;
    /// The environment knob that serves the other family, for the refusal's message.
    const OTHER_KNOB: &'static str;
    /// This family's field of a pair `(ipv4, ipv6)`, and the other one.
    fn pick<T>(v4: T, v6: T) -> (T, T);
}

impl PodAddr for Ipv4Addr {
    const FIELD: &'static str = "ipv4";
    const OTHER_KNOB: &'static str = "ENABLE_IPv6=true";
    fn pick<T>(v4: T, v6: T) -> (T, T) {
        (v4, v6)
    }
}

impl PodAddr for Ipv6Addr {
    const FIELD: &'static str = "ipv6";
    const OTHER_KNOB: &'static str = "ENABLE_IPv4=true";
    fn pick<T>(v4: T, v6: T) -> (T, T) {
        (v6, v4)
    }
}

/// `(ipv4, ipv6)` fields holding `ip` in its family's one.
fn fields<A: PodAddr>(ip: &A) -> (Option<String>, Option<String>) {
    let (mine, _) = A::pick(0, 1);
    if mine == 0 {
        (Some(ip.to_string()), None)
    } else {
        (None, Some(ip.to_string()))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileCooldown {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    #[serde(rename = "releasedAt")]
    pub released_at: u64,
}

/// More allocations than any instance has addresses for pods (the largest types hold
/// 15 ENIs x 49 /28 prefixes = 11,760): a file with more is not this node's state, and
/// is set aside rather than loaded (400,000 allocations took 947 MB).
pub const MAX_ALLOCATIONS: usize = 16_384;
/// A snapshot of `MAX_ALLOCATIONS` is about 4 MB; a journal is compacted every 2,000
/// changes. Files larger than these are set aside unread.
pub const MAX_SNAPSHOT_BYTES: u64 = 32 << 20;
pub const MAX_JOURNAL_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Snapshot {
    version: String,
    #[serde(deserialize_with = "at_most_max_allocations")]
    allocations: Vec<FileAllocation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cooldowns: Vec<FileCooldown>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum JournalOp {
    Add(FileAllocation),
    Del {
        #[serde(rename = "networkName")]
        network: String,
        #[serde(rename = "containerID")]
        container_id: String,
        #[serde(rename = "ifName")]
        if_name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ipv4: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ipv6: Option<String>,
        #[serde(rename = "releasedAt")]
        released_at: u64,
    },
}

/// Deserialises the allocations, refusing (without allocating them) more than
/// `MAX_ALLOCATIONS`.
fn at_most_max_allocations<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<FileAllocation>, D::Error> {
    struct Capped;
    impl<'de> serde::de::Visitor<'de> for Capped {
        type Value = Vec<FileAllocation>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_ALLOCATIONS} allocations")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut v = Vec::new();
            while let Some(a) = seq.next_element()? {
                if v.len() == MAX_ALLOCATIONS {
                    return Err(serde::de::Error::custom(format!(
                        "more than {MAX_ALLOCATIONS} allocations, more than any instance has addresses for"
                    )));
                }
                v.push(a);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Capped)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no checkpoint at {0}")]
    Missing(PathBuf),
    /// Unusable as it is: not JSON of the format, a version we do not know, a file that
    /// is not a regular file (a directory, a FIFO) or too large to be a node's state.
    /// Set it aside and rebuild; never crash-loop on it.
    #[error("checkpoint {path} is unusable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot read checkpoint {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A = Ipv4Addr> {
    pub assignments: Vec<Assignment<A>>,
    pub cooldowns: Vec<(A, u64)>,
    /// Lines replayed from the journal.
    pub journal_ops: usize,
    /// A journal without its snapshot: the snapshot was lost, so what the journal says
    /// is only what changed since it (pods from before it are missing here).
    pub snapshot_missing: bool,
}

/// Reads a checkpoint file: `None` if there is none, `Corrupt` if what is there is not a
/// regular file or is larger than `max` (never opened then: a FIFO would block).
fn read_checkpoint_file(path: &Path, max: u64) -> Result<Option<Vec<u8>>, LoadError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LoadError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    let corrupt = |reason: String| LoadError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if !meta.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_block_device() || t.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(corrupt(format!("it is {kind}, not a regular file")));
    }
    if meta.len() > max {
        return Err(corrupt(format!(
            "it holds {} bytes, more than a node's state can ({max})",
            meta.len()
        )));
    }
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) => Err(LoadError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

pub fn journal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

impl<A> Default for Loaded<A> {
    fn default() -> Self {
        Loaded {
            assignments: Vec::new(),
            cooldowns: Vec::new(),
            journal_ops: 0,
            snapshot_missing: false,
        }
    }
}

fn to_assignment<A: PodAddr>(a: &FileAllocation) -> Result<Assignment<A>, String> {
    let (mine, other) = A::pick(&a.ipv4, &a.ipv6);
    let Some(text) = mine.as_deref() else {
        return Err(if other.is_some() {
            format!(
                "allocation of {} is not {} but the other family, which this node serves only with {}",
                a.container_id,
                A::FIELD,
                A::OTHER_KNOB
            )
        } else {
            format!("allocation of {} has no {}", a.container_id, A::FIELD)
        });
    };
    let ip: A = text.parse().map_err(|_| {
        format!(
            "allocation of {} has a bad {} {text:?}",
            a.container_id,
            A::FIELD
        )
    })?;
    Ok(Assignment {
        key: SandboxKey {
            network: a.network.clone(),
            container_id: a.container_id.clone(),
            if_name: a.if_name.clone(),
        },
        ip,
        eni: String::new(),
        device_number: 0,
        assigned_at_ns: a.allocation_timestamp.max(0) as u64,
        pod: PodRef {
            namespace: a.metadata.namespace.clone(),
            name: a.metadata.name.clone(),
        },
    })
}

pub fn to_file<A: PodAddr>(a: &Assignment<A>) -> FileAllocation {
    let (ipv4, ipv6) = fields(&a.ip);
    FileAllocation {
        network: a.key.network.clone(),
        container_id: a.key.container_id.clone(),
        if_name: a.key.if_name.clone(),
        ipv4,
        ipv6,
        allocation_timestamp: a.assigned_at_ns as i64,
        metadata: FileMetadata {
            namespace: a.pod.namespace.clone(),
            name: a.pod.name.clone(),
        },
    }
}

/// Reads an IPv4 node's checkpoint: the snapshot (upstream's file or ours) and our
/// journal replayed over it.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    load_family(path)
}

/// Reads a checkpoint of family `A` (see [`load`]).
pub fn load_family<A: PodAddr>(path: &Path) -> Result<Loaded<A>, LoadError> {
    let jpath = journal_path(path);
    let snap = read_checkpoint_file(path, MAX_SNAPSHOT_BYTES)?;
    let journal = read_checkpoint_file(&jpath, MAX_JOURNAL_BYTES)?.unwrap_or_default();
    if snap.is_none() && journal.is_empty() {
        return Err(LoadError::Missing(path.to_path_buf()));
    }
    parse_family(snap.as_deref(), &journal).map_err(|reason| LoadError::Corrupt {
        path: path.to_path_buf(),
        reason,
    })
}

/// The state a snapshot (if any) and a journal of an IPv4 node describe: no I/O, so it
/// is what the fuzzer drives. `Err` says why the bytes are not a usable checkpoint.
pub fn parse(snap: Option<&[u8]>, journal: &[u8]) -> Result<Loaded, String> {
    parse_family(snap, journal)
}

/// [`parse`] for a checkpoint of family `A`.
pub fn parse_family<A: PodAddr>(snap: Option<&[u8]>, journal: &[u8]) -> Result<Loaded<A>, String> {
    let corrupt = |reason: String| reason;
    let snapshot_missing = snap.is_none();
    let mut allocs: HashMap<SandboxKey, Assignment<A>> = HashMap::new();
    let mut cooldowns: HashMap<A, u64> = HashMap::new();
    if let Some(bytes) = snap {
        let s: Snapshot = serde_json::from_slice(bytes)
            .map_err(|e| corrupt(format!("not JSON of the expected shape: {e}")))?;
        if s.version != VERSION {
            return Err(corrupt(format!(
                "version {:?}, expected {VERSION:?}",
                s.version
            )));
        }
        for a in &s.allocations {
            let a = to_assignment(a).map_err(corrupt)?;
            allocs.insert(a.key.clone(), a);
        }
        for c in &s.cooldowns {
            let text = A::pick(c.ipv4.as_deref(), c.ipv6.as_deref()).0;
            let ip = text
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| corrupt(format!("bad cooldown {} {text:?}", A::FIELD)))?;
            cooldowns.insert(ip, c.released_at);
        }
    }
    let text = String::from_utf8_lossy(journal);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut ops = 0;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let op: JournalOp = match serde_json::from_str(trimmed) {
            Ok(op) => op,
            // Only the very last line may be cut short (a crash mid-write, never answered).
            Err(_) if i == lines.len() - 1 && !line.ends_with('\n') => break,
            Err(e) => {
                return Err(corrupt(format!(
                    "journal line {} is not a change record: {e}",
                    i + 1
                )));
            }
        };
        ops += 1;
        match op {
            JournalOp::Add(a) => {
                let a = to_assignment::<A>(&a).map_err(corrupt)?;
                cooldowns.remove(&a.ip);
                allocs.insert(a.key.clone(), a);
                if allocs.len() > MAX_ALLOCATIONS {
                    return Err(corrupt(format!(
                        "its journal holds more than {MAX_ALLOCATIONS} allocations, more than any instance has addresses for"
                    )));
                }
            }
            JournalOp::Del {
                network,
                container_id,
                if_name,
                ipv4,
                ipv6,
                released_at,
            } => {
                let key = SandboxKey {
                    network,
                    container_id,
                    if_name,
                };
                allocs.remove(&key);
                let text = A::pick(ipv4, ipv6).0;
                if let Some(ip) = text.and_then(|t| t.parse().ok()) {
                    cooldowns.insert(ip, released_at);
                }
            }
        }
    }
    let mut seen: HashMap<A, &SandboxKey> = HashMap::new();
    for a in allocs.values() {
        if let Some(other) = seen.insert(a.ip, &a.key) {
            return Err(corrupt(format!(
                "{} is held by both {} and {}",
                a.ip, other.container_id, a.key.container_id
            )));
        }
    }
    for ip in seen.keys() {
        cooldowns.remove(ip);
    }
    let mut assignments: Vec<Assignment<A>> = allocs.into_values().collect();
    assignments.sort_by(|a, b| a.key.cmp(&b.key));
    let mut cooldowns: Vec<(A, u64)> = cooldowns.into_iter().collect();
    cooldowns.sort();
    Ok(Loaded {
        assignments,
        cooldowns,
        journal_ops: ops,
        snapshot_missing,
    })
}

/// Moves an unusable checkpoint (and its journal) aside; returns where it went.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Never over an earlier one set aside in the same second.
    let to = (0..)
        .map(|n| {
            let mut to = path.as_os_str().to_owned();
            to.push(format!(".corrupt-{stamp}"));
            if n > 0 {
                to.push(format!(".{n}"));
            }
            PathBuf::from(to)
        })
        .find(|p| fs::symlink_metadata(p).is_err())
        .expect("a free name");
    // (symlink_metadata: a dangling link, or a FIFO, is moved too, never opened.)
    if fs::symlink_metadata(path).is_ok() {
        fs::rename(path, &to)?;
    }
    let j = journal_path(path);
    if fs::symlink_metadata(&j).is_ok() {
        let mut jt = to.as_os_str().to_owned();
        jt.push(".journal");
        fs::rename(&j, PathBuf::from(jt))?;
    }
    Ok(to)
}

fn snapshot_bytes<A: PodAddr>(assignments: &[Assignment<A>], cooldowns: &[(A, u64)]) -> Vec<u8> {
    let s = Snapshot {
        version: VERSION.to_string(),
        allocations: assignments.iter().map(to_file).collect(),
        cooldowns: cooldowns
            .iter()
            .map(|(ip, t)| {
                let (ipv4, ipv6) = fields(ip);
                FileCooldown {
                    ipv4,
                    ipv6,
                    released_at: *t,
                }
            })
            .collect(),
    };
    serde_json::to_vec(&s).expect("serialisable")
}

/// Writes a snapshot atomically: a reader sees the old file or the new one, never half.
pub fn write_snapshot<A: PodAddr>(
    path: &Path,
    assignments: &[Assignment<A>],
    cooldowns: &[(A, u64)],
    sync: bool,
) -> io::Result<()> {
    write_snapshot_bytes(path, &snapshot_bytes(assignments, cooldowns), sync)
}

fn write_snapshot_bytes(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A temp file left by a crash is ours to replace; anything else there (a directory, a
    // FIFO that would block the open, a link) is moved aside. create_new never follows a link.
    match fs::symlink_metadata(&tmp) {
        Ok(m) if m.is_file() => fs::remove_file(&tmp)?,
        Ok(_) => {
            let mut aside = tmp.as_os_str().to_owned();
            aside.push(format!(
                ".corrupt-{}",
                crate::clock::now_ns() / 1_000_000_000
            ));
            fs::rename(&tmp, PathBuf::from(aside))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    if sync && let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

enum Msg {
    Line(Vec<u8>, oneshot::Sender<io::Result<()>>),
    Compact {
        /// Serialises the snapshot: run by the writer thread, not under the caller's lock.
        bytes: Box<dyn FnOnce() -> Vec<u8> + Send>,
        done: oneshot::Sender<io::Result<()>>,
    },
}

/// The journal writer. Clone freely; all clones share one file.
#[derive(Clone)]
pub struct Journal {
    inner: std::sync::Arc<JournalInner>,
}

enum JournalInner {
    Inline {
        file: std::sync::Mutex<File>,
        snap_path: PathBuf,
    },
    Thread {
        tx: mpsc::Sender<Msg>,
    },
}

/// A change recorded in order; await it before answering the client.
pub enum Pending {
    /// Written inline already (tmpfs).
    Done(io::Result<()>),
    /// Queued for the writer thread (group commit with fdatasync).
    Queued(oneshot::Receiver<io::Result<()>>),
}

impl Pending {
    pub async fn durable(self) -> io::Result<()> {
        match self {
            Pending::Done(r) => r,
            Pending::Queued(rx) => rx
                .await
                .unwrap_or_else(|_| Err(io::Error::other("checkpoint writer stopped"))),
        }
    }
}

/// On tmpfs (where /var/run lives on a node) a completed write() already survives a
/// crash of the daemon and there is no device to sync: write inline, no thread hop.
fn on_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

impl Journal {
    /// Starts the writer for the checkpoint at `path`. `sync` adds fdatasync per batch
    /// (needed on a disk; on tmpfs, where /var/run lives, a write is already durable
    /// against a crash of the daemon).
    pub fn start(path: &Path, sync: bool) -> io::Result<Journal> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let jpath = journal_path(path);
        // Non-blocking: a FIFO put there must fail the open, not hang it.
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
                .open(&jpath)?
        };
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                jpath.display()
            )));
        }
        let snap_path = path.to_path_buf();
        if on_tmpfs(path.parent().unwrap_or(Path::new("/"))) {
            return Ok(Journal {
                inner: std::sync::Arc::new(JournalInner::Inline {
                    file: std::sync::Mutex::new(file),
                    snap_path,
                }),
            });
        }
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let flush =
                    |file: &mut File,
                     buf: &mut Vec<u8>,
                     acks: &mut Vec<oneshot::Sender<io::Result<()>>>| {
                        let r = (|| {
                            if !buf.is_empty() {
                                file.write_all(buf)?;
                                if sync {
                                    file.sync_data()?;
                                }
                            }
                            Ok::<(), io::Error>(())
                        })();
                        for a in acks.drain(..) {
                            let _ = a.send(
                                r.as_ref()
                                    .map(|_| ())
                                    .map_err(|e| io::Error::new(e.kind(), e.to_string())),
                            );
                        }
                        buf.clear();
                    };
                while let Ok(first) = rx.recv() {
                    // Group commit: everything queued meanwhile goes out in one write.
                    let mut batch = vec![first];
                    while let Ok(m) = rx.try_recv() {
                        batch.push(m);
                    }
                    let mut buf = Vec::new();
                    let mut acks = Vec::new();
                    for m in batch {
                        match m {
                            Msg::Line(l, ack) => {
                                buf.extend_from_slice(&l);
                                acks.push(ack);
                            }
                            Msg::Compact { bytes, done } => {
                                // Lines queued before the snapshot are in it; write them first
                                // so the order holds however the compaction ends.
                                flush(&mut file, &mut buf, &mut acks);
                                let r = write_snapshot_bytes(&snap_path, &bytes(), sync).and_then(
                                    |_| {
                                        file.set_len(0)?;
                                        if sync {
                                            file.sync_data()?;
                                        }
                                        Ok(())
                                    },
                                );
                                let _ = done.send(r);
                            }
                        }
                    }
                    flush(&mut file, &mut buf, &mut acks);
                }
            })?;
        Ok(Journal {
            inner: std::sync::Arc::new(JournalInner::Thread { tx }),
        })
    }

    /// Whether changes are written inline (tmpfs) rather than by the writer thread.
    pub fn inline(&self) -> bool {
        matches!(*self.inner, JournalInner::Inline { .. })
    }

    fn send_line(&self, op: &JournalOp) -> Pending {
        let mut line = serde_json::to_vec(op).expect("serialisable");
        line.push(b'\n');
        match &*self.inner {
            JournalInner::Inline { file, .. } => {
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                Pending::Done(f.write_all(&line))
            }
            JournalInner::Thread { tx } => {
                let (ack, rx) = oneshot::channel();
                if tx.send(Msg::Line(line, ack)).is_err() {
                    return Pending::Done(Err(io::Error::other("checkpoint writer stopped")));
                }
                Pending::Queued(rx)
            }
        }
    }

    /// Records an assignment. Call under the datastore lock, so the journal's order is
    /// the datastore's; await the result outside it.
    pub fn record_add<A: PodAddr>(&self, a: &Assignment<A>) -> Pending {
        self.send_line(&JournalOp::Add(to_file(a)))
    }

    pub fn record_del<A: PodAddr>(&self, a: &Assignment<A>, released_ns: u64) -> Pending {
        let f = to_file(a);
        self.send_line(&JournalOp::Del {
            network: f.network,
            container_id: f.container_id,
            if_name: f.if_name,
            ipv4: f.ipv4,
            ipv6: f.ipv6,
            released_at: released_ns,
        })
    }

    /// Completes once every change recorded before it is durable (it records nothing).
    pub fn barrier(&self) -> Pending {
        match &*self.inner {
            // Inline writes are done by the time their record call returns.
            JournalInner::Inline { .. } => Pending::Done(Ok(())),
            JournalInner::Thread { tx } => {
                let (ack, rx) = oneshot::channel();
                if tx.send(Msg::Line(Vec::new(), ack)).is_err() {
                    return Pending::Done(Err(io::Error::other("checkpoint writer stopped")));
                }
                Pending::Queued(rx)
            }
        }
    }

    /// Writes a snapshot of this state and empties the journal (call under the lock
    /// with the datastore's current state; await outside it).
    pub fn compact<A: PodAddr>(
        &self,
        assignments: Vec<Assignment<A>>,
        cooldowns: Vec<(A, u64)>,
    ) -> Pending {
        match &*self.inner {
            JournalInner::Inline { file, snap_path } => {
                let f = file.lock().unwrap_or_else(|p| p.into_inner());
                Pending::Done(
                    write_snapshot(snap_path, &assignments, &cooldowns, false)
                        .and_then(|_| f.set_len(0)),
                )
            }
            JournalInner::Thread { tx } => {
                let (done, rx) = oneshot::channel();
                let _ = tx.send(Msg::Compact {
                    bytes: Box::new(move || snapshot_bytes(&assignments, &cooldowns)),
                    done,
                });
                Pending::Queued(rx)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(c: &str, ip: &str) -> Assignment {
        Assignment {
            key: SandboxKey {
                network: "aws-cni".into(),
                container_id: c.into(),
                if_name: "eth0".into(),
            },
            ip: ip.parse().unwrap(),
            eni: String::new(),
            device_number: 0,
            assigned_at_ns: 1_700_000_000_000_000_000,
            pod: PodRef {
                namespace: "default".into(),
                name: format!("pod-{c}"),
            },
        }
    }

    #[test]
    fn reads_upstream_aws_node_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        // As aws-node v1.23 writes it.
        fs::write(
            &p,
            r#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"3e1b","ifName":"eth0","ipv4":"192.168.9.71","allocationTimestamp":1716812345123456789,"metadata":{"k8sPodNamespace":"kube-system","k8sPodName":"coredns-5d8f"}},{"networkName":"aws-cni","containerID":"77aa","ifName":"eth0","ipv4":"192.168.9.12","allocationTimestamp":1716812399000000000}]}"#,
        )
        .unwrap();
        let l = load(&p).unwrap();
        assert_eq!(l.assignments.len(), 2);
        let c = l
            .assignments
            .iter()
            .find(|x| x.key.container_id == "3e1b")
            .unwrap();
        assert_eq!(c.ip.to_string(), "192.168.9.71");
        assert_eq!(c.pod.name, "coredns-5d8f");
        assert_eq!(c.assigned_at_ns, 1716812345123456789);
    }

    #[tokio::test]
    async fn journal_replay_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        let j = Journal::start(&p, true).unwrap();
        j.record_add(&a("c1", "10.0.0.5")).durable().await.unwrap();
        j.record_add(&a("c2", "10.0.0.6")).durable().await.unwrap();
        j.record_del(&a("c1", "10.0.0.5"), 42)
            .durable()
            .await
            .unwrap();
        let l = load(&p).unwrap();
        assert_eq!(l.assignments, vec![a("c2", "10.0.0.6")]);
        assert_eq!(l.cooldowns, vec![("10.0.0.5".parse().unwrap(), 42)]);
        assert_eq!(l.journal_ops, 3);
        j.compact(l.assignments.clone(), l.cooldowns.clone())
            .durable()
            .await
            .unwrap();
        assert_eq!(fs::metadata(journal_path(&p)).unwrap().len(), 0);
        let again = load(&p).unwrap();
        assert_eq!(
            (again.assignments, again.cooldowns),
            (l.assignments, l.cooldowns)
        );
        // The snapshot stays readable by upstream's shape.
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["version"], VERSION);
        assert_eq!(v["allocations"][0]["containerID"], "c2");
        assert_eq!(v["allocations"][0]["metadata"]["k8sPodName"], "pod-c2");
    }

    #[tokio::test]
    async fn inline_on_tmpfs_behaves_the_same() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let p = dir.path().join("ipam.json");
        let j = Journal::start(&p, true).unwrap();
        assert!(j.inline(), "/dev/shm is tmpfs");
        j.record_add(&a("c1", "10.0.0.5")).durable().await.unwrap();
        j.record_add(&a("c2", "10.0.0.6")).durable().await.unwrap();
        j.record_del(&a("c1", "10.0.0.5"), 7)
            .durable()
            .await
            .unwrap();
        let l = load(&p).unwrap();
        assert_eq!(l.assignments, vec![a("c2", "10.0.0.6")]);
        j.compact(l.assignments.clone(), l.cooldowns.clone())
            .durable()
            .await
            .unwrap();
        assert_eq!(fs::metadata(journal_path(&p)).unwrap().len(), 0);
        assert_eq!(load(&p).unwrap().assignments, l.assignments);
    }

    #[tokio::test]
    async fn lines_after_a_compaction_in_one_batch_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        let j = Journal::start(&p, false).unwrap();
        let p1 = j.record_add(&a("c1", "10.0.0.5"));
        let p2 = j.compact(vec![a("c1", "10.0.0.5")], vec![]);
        let p3 = j.record_add(&a("c2", "10.0.0.6"));
        p1.durable().await.unwrap();
        p2.durable().await.unwrap();
        p3.durable().await.unwrap();
        assert_eq!(
            load(&p).unwrap().assignments,
            vec![a("c1", "10.0.0.5"), a("c2", "10.0.0.6")]
        );
    }

    fn a6(c: &str, ip: &str) -> Assignment<Ipv6Addr> {
        let v4 = a(c, "10.0.0.1");
        Assignment {
            key: v4.key,
            ip: ip.parse().unwrap(),
            eni: v4.eni,
            device_number: 0,
            assigned_at_ns: v4.assigned_at_ns,
            pod: v4.pod,
        }
    }

    #[test]
    fn reads_upstream_ipv6_file_and_refuses_the_other_family() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        // As aws-node v1.23 writes it with ENABLE_IPv6=true: only `ipv6` in each entry.
        fs::write(
            &p,
            r#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"9c2f","ifName":"eth0","ipv6":"2600:1f14:0:100:4a3e::2","allocationTimestamp":1716812345123456789,"metadata":{"k8sPodNamespace":"kube-system","k8sPodName":"coredns-5d8f"}}]}"#,
        )
        .unwrap();
        let l = load_family::<Ipv6Addr>(&p).unwrap();
        assert_eq!(l.assignments.len(), 1);
        assert_eq!(l.assignments[0].ip.to_string(), "2600:1f14:0:100:4a3e::2");
        assert_eq!(l.assignments[0].pod.name, "coredns-5d8f");
        // An IPv4 node refuses it, naming the knob; an IPv6 node refuses an IPv4 file.
        match load(&p) {
            Err(LoadError::Corrupt { reason, .. }) => {
                assert!(reason.contains("ENABLE_IPv6=true"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        write_snapshot(&p, &[a("c1", "10.0.0.5")], &[], false).unwrap();
        match load_family::<Ipv6Addr>(&p) {
            Err(LoadError::Corrupt { reason, .. }) => {
                assert!(reason.contains("ENABLE_IPv4=true"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn ipv6_journal_replays_and_compacts_as_upstream_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        let j = Journal::start(&p, true).unwrap();
        let (x, y) = (
            a6("c1", "2600:1f14:0:100:1::1"),
            a6("c2", "2600:1f14:0:100:1::2"),
        );
        j.record_add(&x).durable().await.unwrap();
        j.record_add(&y).durable().await.unwrap();
        j.record_del(&x, 42).durable().await.unwrap();
        let l = load_family::<Ipv6Addr>(&p).unwrap();
        assert_eq!(l.assignments, vec![y.clone()]);
        assert_eq!(l.cooldowns, vec![(x.ip, 42)]);
        j.compact(l.assignments.clone(), l.cooldowns.clone())
            .durable()
            .await
            .unwrap();
        let text = fs::read_to_string(&p).unwrap();
        assert!(
            text.contains(r#""ipv6":"2600:1f14:0:100:1::2""#) && !text.contains("ipv4"),
            "{text}"
        );
        assert_eq!(load_family::<Ipv6Addr>(&p).unwrap().assignments, vec![y]);
    }

    #[test]
    fn stale_journal_over_newer_snapshot_converges() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        // Crash after the snapshot rename, before the journal was emptied.
        write_snapshot(&p, &[a("c1", "10.0.0.7")], &[], false).unwrap();
        let lines = [
            serde_json::to_string(&JournalOp::Add(to_file(&a("c1", "10.0.0.5")))).unwrap(),
            serde_json::to_string(&JournalOp::Del {
                network: "aws-cni".into(),
                container_id: "c1".into(),
                if_name: "eth0".into(),
                ipv4: Some("10.0.0.5".into()),
                ipv6: None,
                released_at: 1,
            })
            .unwrap(),
            serde_json::to_string(&JournalOp::Add(to_file(&a("c1", "10.0.0.7")))).unwrap(),
        ];
        fs::write(journal_path(&p), lines.join("\n") + "\n").unwrap();
        let l = load(&p).unwrap();
        assert_eq!(l.assignments, vec![a("c1", "10.0.0.7")]);
    }

    #[test]
    fn torn_last_line_is_ignored_but_a_bad_middle_line_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        let good = serde_json::to_string(&JournalOp::Add(to_file(&a("c1", "10.0.0.5")))).unwrap();
        fs::write(journal_path(&p), format!("{good}\n{{\"op\":\"add\",\"netw")).unwrap();
        assert_eq!(load(&p).unwrap().assignments.len(), 1);
        fs::write(journal_path(&p), format!("garbage\n{good}\n")).unwrap();
        assert!(matches!(load(&p), Err(LoadError::Corrupt { .. })));
    }

    #[test]
    fn corrupt_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        assert!(matches!(load(&p), Err(LoadError::Missing(_))));
        fs::write(&p, b"{\"version\":\"vpc-cni-ipam/1\",\"allocations\":[").unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.to_string().contains("ipam.json"), "{e}");
        fs::write(&p, br#"{"version":"vpc-cni-ipam/9","allocations":[]}"#).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("vpc-cni-ipam/9"));
        let to = set_aside(&p).unwrap();
        assert!(to.exists() && !p.exists());
        // Two keys holding one address is corruption, not something to serve.
        write_snapshot(&p, &[a("c1", "10.0.0.5"), a("c2", "10.0.0.5")], &[], false).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("held by both"));
    }
}
