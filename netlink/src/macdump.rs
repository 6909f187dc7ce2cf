//! A link dump that reads nothing but each link's MAC (`IFLA_ADDRESS`), on a non-blocking
//! NETLINK_ROUTE socket of its own driven by tokio, so it runs beside other requests.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_GETLINK: u16 = 18;
const RTM_NEWLINK: u16 = 16;
const IFLA_ADDRESS: u16 = 1;
const IFLA_EXT_MASK: u16 = 29;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The dump request: nlmsghdr, ifinfomsg (family AF_UNSPEC), IFLA_EXT_MASK.
fn request(seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + IFINFOMSG_LEN + 8;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0u8; IFINFOMSG_LEN]);
    m.extend_from_slice(&8u16.to_ne_bytes());
    m.extend_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
    m.extend_from_slice(&RTEXT_FILTER_SKIP_STATS.to_ne_bytes());
    m
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("link dump: {what}"))
}

/// Walks the messages in one datagram; `Ok(true)` once NLMSG_DONE is seen.
fn parse(buf: &[u8], seq: u32, macs: &mut Vec<[u8; 6]>) -> io::Result<bool> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        let mseq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(bad("truncated message"));
        }
        let body = &buf[off + NLMSG_HDRLEN..off + len];
        off += align4(len);
        if mseq != seq {
            continue;
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                    .ok_or_else(|| bad("short error"))?;
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            RTM_NEWLINK if body.len() >= IFINFOMSG_LEN => {
                let mut a = IFINFOMSG_LEN;
                while a + 4 <= body.len() {
                    let alen = u16::from_ne_bytes(body[a..a + 2].try_into().unwrap()) as usize;
                    let akind = u16::from_ne_bytes(body[a + 2..a + 4].try_into().unwrap()) & 0x3fff;
                    if alen < 4 || a + alen > body.len() {
                        break;
                    }
                    if akind == IFLA_ADDRESS && alen == 4 + 6 {
                        macs.push(body[a + 4..a + 10].try_into().unwrap());
                    }
                    a += align4(alen);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

pub(crate) async fn link_macs() -> io::Result<Vec<[u8; 6]>> {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else; the OwnedFd
    // keeps it open, unchanged, for as long as the AsyncFd that owns it lives.
    let sock =
        unsafe { AsyncFd::register_with_interest(OwnedFd::from_raw_fd(fd), Interest::READABLE) }
            .map_err(io::Error::from)?;
    let seq = 1;
    let req = request(seq);
    // SAFETY: the buffer is valid for its length; the kernel's address is all zeros.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut macs = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut guard = sock.readable().await?;
        // SAFETY: the buffer is valid for its length.
        let n = match guard.try_io(|s| {
            let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(r) => r?,
            Err(_would_block) => continue,
        };
        if n == 0 {
            return Err(bad("socket closed"));
        }
        if parse(&buf[..n], seq, &mut macs)? {
            return Ok(macs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_stops_at_done() {
        let mut msg = Vec::new();
        let mut link = |mac: &[u8]| {
            let attr_len = 4 + mac.len();
            let len = NLMSG_HDRLEN + IFINFOMSG_LEN + align4(attr_len) + 8;
            msg.extend_from_slice(&(len as u32).to_ne_bytes());
            msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
            msg.extend_from_slice(&[0, 0]);
            msg.extend_from_slice(&7u32.to_ne_bytes());
            msg.extend_from_slice(&[0; 4]);
            msg.extend_from_slice(&[0; IFINFOMSG_LEN]);
            // An attribute before the address (IFLA_MTU), then IFLA_ADDRESS.
            msg.extend_from_slice(&8u16.to_ne_bytes());
            msg.extend_from_slice(&4u16.to_ne_bytes());
            msg.extend_from_slice(&1500u32.to_ne_bytes());
            msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
            msg.extend_from_slice(&IFLA_ADDRESS.to_ne_bytes());
            msg.extend_from_slice(mac);
            msg.resize(msg.len() + align4(attr_len) - attr_len, 0);
        };
        link(&[2, 0, 0, 0, 0, 1]);
        link(&[0; 0]); // no usable address (a tunnel's may be 4 bytes, or none)
        link(&[2, 0, 0, 0, 0, 2]);
        let mut macs = vec![];
        assert!(!parse(&msg, 7, &mut macs).unwrap());
        assert_eq!(macs, vec![[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]]);
        let mut done = vec![];
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0, 0]);
        done.extend_from_slice(&7u32.to_ne_bytes());
        done.extend_from_slice(&[0; 8]);
        assert!(parse(&done, 7, &mut macs).unwrap());
        // A message claiming more bytes than arrived is refused, not read past.
        let mut short = msg.clone();
        short.truncate(30);
        assert!(parse(&short, 7, &mut vec![]).is_err());
    }

    #[test]
    fn dumps_this_namespaces_links() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Loopback's MAC is all zeros; every namespace has it.
        let macs = rt.block_on(link_macs()).unwrap();
        assert!(macs.contains(&[0; 6]), "{macs:?}");
    }
}
