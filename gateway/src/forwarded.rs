//! The client's address behind trusted reverse proxies
//! (`listeners.NAME.trusted_proxies`).
//!
//! A connection from a trusted proxy carries the client's address in
//! `X-Forwarded-For`, each proxy appending the address it got the request
//! from. The client is the rightmost address that is not a trusted proxy:
//! walking from the right, each trusted hop vouches for the entry before it,
//! and the first untrusted one is as far as anything can be believed (what a
//! client writes into the header itself sits to its left). A connection from
//! anywhere else keeps its socket address, whatever headers it sends.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// An address or network, e.g. `10.0.0.5`, `10.0.0.0/8` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parse `a.b.c.d`, `a.b.c.d/n`, an IPv6 address, or `x::/n`.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let t = text.trim();
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let written: IpAddr = addr.parse().map_err(|_| {
            format!("{text:?} is not an IP address or network: write e.g. 10.0.0.5, 10.0.0.0/8 or fd00::/8")
        })?;
        let addr = written.to_canonical();
        if addr != written && prefix.is_some() {
            return Err(format!(
                "{text:?} is an IPv4-mapped address with a prefix: write the IPv4 network, e.g. {addr}/24"
            ));
        }
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(0) => {
                    return Err(format!(
                        "{text:?} would trust every address, so any client could name any address it likes: list the proxies' own addresses"
                    ));
                }
                Ok(n) if n <= max => n,
                _ => {
                    return Err(format!(
                        "{text:?}: the prefix length must be a number from 1 to {max}"
                    ));
                }
            },
        };
        let cidr = Cidr { addr, prefix };
        if cidr.network() != addr {
            return Err(format!(
                "{text:?} has bits set past its /{prefix} prefix: write {}/{prefix}",
                cidr.network()
            ));
        }
        Ok(cidr)
    }

    /// The address with the bits past the prefix cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as
    /// their IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let probe = Cidr {
            addr: ip,
            prefix: self.prefix,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && probe.network() == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Whether `ip` is one of `trusted`.
pub fn is_trusted(trusted: &[Cidr], ip: IpAddr) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// The client's address for a connection from `peer` with request
/// `headers`: `peer` itself unless it is one of `trusted`, else the
/// rightmost `X-Forwarded-For` entry that is not (port 0: the header carries
/// none). An entry that is not an address ends the walk at the last trusted
/// hop, as does a missing header. With `trusted`, an IPv4-mapped IPv6
/// address is given as its IPv4 address, from a proxy or not, so that one
/// client is one key for per-IP limits.
pub fn client_addr(peer: SocketAddr, headers: &HeaderMap, trusted: &[Cidr]) -> SocketAddr {
    let is_trusted = |ip: IpAddr| is_trusted(trusted, ip);
    if trusted.is_empty() {
        return peer;
    }
    let socket = peer.ip().to_canonical();
    if !is_trusted(socket) {
        return SocketAddr::new(socket, peer.port());
    }
    let mut client = socket;
    // Several headers are one list, in order (RFC 9110 §5.3). Entries are
    // split on the raw bytes: a client's own bytes that are not text spoil
    // only its entry, not the one a proxy appended to the same line.
    let entries: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .collect();
    for entry in entries.iter().rev() {
        if !is_trusted(client) {
            break;
        }
        match parse_entry(entry) {
            Some(ip) => client = ip.to_canonical(),
            None => break,
        }
    }
    if client == socket {
        SocketAddr::new(socket, peer.port())
    } else {
        SocketAddr::new(client, 0)
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:5678`).
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let e = std::str::from_utf8(entry).ok()?.trim();
    e.parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| Cidr::parse(c).unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.200.3.4".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(
            c.contains("::ffff:10.1.2.3".parse().unwrap()),
            "IPv4-mapped"
        );
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let one = Cidr::parse("192.168.1.7").unwrap();
        assert!(one.contains("192.168.1.7".parse().unwrap()));
        assert!(!one.contains("192.168.1.8".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12:3456::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(
            Cidr::parse("128.0.0.0/1")
                .unwrap()
                .contains("200.1.1.1".parse().unwrap())
        );
        assert!(
            !Cidr::parse("128.0.0.0/1")
                .unwrap()
                .contains("100.1.1.1".parse().unwrap())
        );
        assert!(
            Cidr::parse("::1/128")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        assert_eq!(v6.to_string(), "fd00::/8");
        for (bad, says) in [
            (
                "10.0.0.1/8",
                "has bits set past its /8 prefix: write 10.0.0.0/8",
            ),
            ("0.0.0.0/0", "would trust every address"),
            ("::/0", "would trust every address"),
            (
                "10.0.0.0/33",
                "the prefix length must be a number from 1 to 32",
            ),
            ("fd00::/129", "from 1 to 128"),
            ("proxy.local", "is not an IP address or network"),
            ("::ffff:10.0.0.0/104", "write the IPv4 network"),
            ("10.0.0.0/x", "the prefix length must be"),
        ] {
            let e = Cidr::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1"]);
        let client = |p: &str, h: &[&str]| client_addr(peer(p), &xff(h), &trusted).to_string();
        // From a trusted proxy: the address it got the request from.
        assert_eq!(client("10.0.0.5", &["203.0.113.9"]), "203.0.113.9:0");
        // Through two trusted proxies.
        assert_eq!(
            client("10.0.0.5", &["203.0.113.9, 10.0.0.6"]),
            "203.0.113.9:0"
        );
        // What the client wrote itself sits left of what the proxy saw.
        assert_eq!(
            client("127.0.0.1", &["1.1.1.1, 203.0.113.9"]),
            "203.0.113.9:0"
        );
        // Several headers are one list.
        assert_eq!(
            client("10.0.0.5", &["1.1.1.1", "203.0.113.9"]),
            "203.0.113.9:0"
        );
        // With ports, IPv6.
        assert_eq!(client("10.0.0.5", &["203.0.113.9:5555"]), "203.0.113.9:0");
        assert_eq!(
            client("10.0.0.5", &["[2001:db8::1]:5555"]),
            "[2001:db8::1]:0"
        );
        assert_eq!(client("10.0.0.5", &["2001:db8::1"]), "[2001:db8::1]:0");
        // Not from a trusted proxy: the header is anybody's to write.
        assert_eq!(
            client("198.51.100.1", &["203.0.113.9"]),
            "198.51.100.1:40000"
        );
        // No header, or nothing usable: the proxy itself.
        assert_eq!(client("10.0.0.5", &[]), "10.0.0.5:40000");
        assert_eq!(client("10.0.0.5", &["unknown"]), "10.0.0.5:40000");
        // An unusable entry ends the walk at the last trusted hop.
        assert_eq!(
            client("10.0.0.5", &["203.0.113.9, garbage, 10.0.0.7"]),
            "10.0.0.7:0"
        );
        // An IPv4-mapped peer is the IPv4 proxy, and is given as IPv4
        // when it is the answer too.
        assert_eq!(client("::ffff:10.0.0.5", &["203.0.113.9"]), "203.0.113.9:0");
        assert_eq!(client("::ffff:10.0.0.5", &[]), "10.0.0.5:40000");
        assert_eq!(
            client("::ffff:198.51.100.1", &["203.0.113.9"]),
            "198.51.100.1:40000"
        );
        assert_eq!(client("10.0.0.5", &["::ffff:203.0.113.9"]), "203.0.113.9:0");
        // Bytes that are not text in the client's own entry do not hide the
        // entry the proxy appended to the same line (nginx's
        // $proxy_add_x_forwarded_for does).
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.9").unwrap(),
        );
        assert_eq!(
            client_addr(peer("10.0.0.5"), &h, &trusted).to_string(),
            "203.0.113.9:0"
        );
        // Nothing trusted: the socket's address, always.
        assert_eq!(
            client_addr(peer("10.0.0.5"), &xff(&["203.0.113.9"]), &[]).to_string(),
            "10.0.0.5:40000"
        );
    }
}
