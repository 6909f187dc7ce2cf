//! IPv4 prefixes: parsing and enumerating, without a dependency.

use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Net {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        };
        (u32::from(ip) & mask) == (u32::from(self.addr) & mask)
    }

    /// Every address of the prefix (a /28 holds 16).
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.addr);
        let n: u64 = 1u64 << (32 - self.len as u32);
        (0..n).map(move |i| Ipv4Addr::from(base + i as u32))
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

pub fn parse_cidr(s: &str) -> Option<Ipv4Net> {
    let (a, l) = s.trim().split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let len: u8 = l.parse().ok()?;
    (len <= 32).then_some(Ipv4Net { addr, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let n = parse_cidr("10.0.1.16/28").unwrap();
        assert_eq!(n.addresses().count(), 16);
        assert!(n.contains("10.0.1.31".parse().unwrap()));
        assert!(!n.contains("10.0.1.32".parse().unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("banana").is_none());
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
    }
}
