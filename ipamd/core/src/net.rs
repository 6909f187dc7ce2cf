//! IPv4 and IPv6 prefixes: parsing and enumerating, without a dependency.

use std::net::{Ipv4Addr, Ipv6Addr};

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

/// An IPv6 prefix (a delegated /80, a subnet's /64, a VPC's /56).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6Net {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Ipv6Net {
    fn mask(&self) -> u128 {
        if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - self.len as u32)
        }
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        (u128::from(ip) & self.mask()) == (u128::from(self.addr) & self.mask())
    }

    /// The prefix's first address (host bits cleared).
    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    /// The address at `offset` from the network address, if the prefix holds it.
    pub fn nth(&self, offset: u128) -> Option<Ipv6Addr> {
        let host_bits = 128 - self.len as u32;
        (host_bits == 128 || offset >> host_bits == 0)
            .then(|| Ipv6Addr::from(u128::from(self.network()) | offset))
    }

    /// The offset of `ip` from the network address, if the prefix holds it.
    pub fn offset_of(&self, ip: Ipv6Addr) -> Option<u128> {
        self.contains(ip).then(|| u128::from(ip) & !self.mask())
    }
}

impl std::fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

pub fn parse_cidr6(s: &str) -> Option<Ipv6Net> {
    let (a, l) = s.trim().split_once('/')?;
    let addr: Ipv6Addr = a.parse().ok()?;
    let len: u8 = l.parse().ok()?;
    (len <= 128).then_some(Ipv6Net { addr, len })
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

    #[test]
    fn cidrs6() {
        let n = parse_cidr6("2600:1f14:0:100:1::/80").unwrap();
        assert!(n.contains("2600:1f14:0:100:1:ffff:ffff:ffff".parse().unwrap()));
        assert!(!n.contains("2600:1f14:0:100:2::".parse().unwrap()));
        assert_eq!(n.nth(5).unwrap().to_string(), "2600:1f14:0:100:1::5");
        assert_eq!(n.nth(1 << 48), None);
        assert_eq!(
            n.offset_of("2600:1f14:0:100:1::1:0".parse().unwrap()),
            Some(1 << 16)
        );
        assert_eq!(n.offset_of("2600:1f14::".parse().unwrap()), None);
        assert!(parse_cidr6("2600::/129").is_none());
        assert!(parse_cidr6("10.0.0.0/8").is_none());
        assert_eq!(
            parse_cidr6("::/0").unwrap().nth(u128::MAX).unwrap(),
            Ipv6Addr::from(u128::MAX)
        );
    }
}
