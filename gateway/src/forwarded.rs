//! The client's address behind trusted reverse proxies
//! (`listeners.NAME.trusted_proxies`).
//!
//! A connection from a trusted proxy carries the client's address in a
//! header (`client_ip_header`): `X-Forwarded-For` or `Forwarded` (RFC 7239),
//! each proxy appending the address it got the request from, or
//! `X-Real-IP`, one address the proxy sets. The client is the rightmost
//! address that is not a trusted proxy: walking from the right, each
//! trusted hop vouches for the entry before it, and the first untrusted one
//! is as far as anything can be believed (what a client writes into the
//! header itself sits to its left). A connection from anywhere else keeps
//! its socket address, whatever headers it sends.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

use crate::config::types::ClientIpHeader;

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
/// rightmost entry of `header` that is not (port 0: the header's port, if
/// any, is not the client's socket). An entry that is not an address
/// (`unknown`, an obfuscated name, garbage) ends the walk at the last
/// trusted hop, as does a missing header. With `trusted`, an IPv4-mapped
/// IPv6 address is given as its IPv4 address, from a proxy or not, so that
/// one client is one key for per-IP limits.
pub fn client_addr(
    peer: SocketAddr,
    headers: &HeaderMap,
    trusted: &[Cidr],
    header: ClientIpHeader,
) -> SocketAddr {
    let is_trusted = |ip: IpAddr| is_trusted(trusted, ip);
    if trusted.is_empty() {
        return peer;
    }
    let socket = peer.ip().to_canonical();
    if !is_trusted(socket) {
        return SocketAddr::new(socket, peer.port());
    }
    let mut client = socket;
    // Several headers are one list, in order (RFC 9110 §5.3).
    let entries: Vec<Option<IpAddr>> = match header {
        // Entries are split on the raw bytes: a client's own bytes that are
        // not text spoil only its entry, not the one a proxy appended to
        // the same line.
        ClientIpHeader::XForwardedFor => headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(parse_entry)
            .collect(),
        ClientIpHeader::Forwarded => headers
            .get_all("forwarded")
            .iter()
            .flat_map(|v| forwarded_nodes(v.as_bytes()))
            .collect(),
        // One address, set by the proxy in front: two headers are no
        // answer.
        ClientIpHeader::XRealIp => {
            let mut it = headers.get_all("x-real-ip").iter();
            match (it.next(), it.next()) {
                (Some(v), None) => vec![parse_entry(v.as_bytes())],
                (Some(_), Some(_)) => vec![None],
                _ => Vec::new(),
            }
        }
    };
    for entry in entries.iter().rev() {
        if !is_trusted(client) {
            break;
        }
        match entry {
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

/// One entry: an address, possibly with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:5678`), or an IPv6 address in brackets.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let e = std::str::from_utf8(entry).ok()?.trim();
    e.parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            e.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })
}

/// The address each element of one `Forwarded` line names in its `for`
/// parameter, in order (RFC 7239 §4): None for an element without exactly
/// one `for`, or whose node is not an address (`unknown`, an obfuscated
/// name). A line that is not well formed stands for one element naming
/// nobody: an unclosed quote in what a client wrote could otherwise swallow
/// the element a proxy appended to the same line, and leave the client's
/// own to be believed.
fn forwarded_nodes(line: &[u8]) -> Vec<Option<IpAddr>> {
    match parse_forwarded(line) {
        Some(elements) => elements
            .into_iter()
            .map(|fors| match fors.as_slice() {
                [one] => parse_node(one),
                _ => None,
            })
            .collect(),
        None => vec![None],
    }
}

/// The values of the `for` parameters of each element of a `Forwarded`
/// line, unquoted; None if the line does not follow the grammar:
/// elements separated by commas (empty ones skipped), each pairs
/// `token=token` or `token="quoted string"` separated by semicolons.
fn parse_forwarded(line: &[u8]) -> Option<Vec<Vec<Vec<u8>>>> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let ows = |i: &mut usize| {
        while line.get(*i).is_some_and(|b| *b == b' ' || *b == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while line.get(*i).copied().is_some_and(tchar) {
            *i += 1;
        }
        (*i > start).then(|| &line[start..*i])
    };
    let mut elements = Vec::new();
    let mut i = 0;
    loop {
        ows(&mut i);
        let mut fors = Vec::new();
        let mut empty = true;
        // Pairs, separated by semicolons (empty ones allowed).
        loop {
            if line.get(i).is_some_and(|b| tchar(*b)) {
                empty = false;
                let name = token(&mut i)?;
                if line.get(i) != Some(&b'=') {
                    return None;
                }
                i += 1;
                let value = if line.get(i) == Some(&b'"') {
                    i += 1;
                    let mut v = Vec::new();
                    loop {
                        match *line.get(i)? {
                            b'"' => break,
                            b'\\' => {
                                i += 1;
                                v.push(*line.get(i)?);
                            }
                            b => v.push(b),
                        }
                        i += 1;
                    }
                    i += 1;
                    v
                } else {
                    token(&mut i)?.to_vec()
                };
                if name.eq_ignore_ascii_case(b"for") {
                    fors.push(value);
                }
            }
            if line.get(i) == Some(&b';') {
                i += 1;
            } else {
                break;
            }
        }
        if !empty {
            elements.push(fors);
        }
        ows(&mut i);
        match line.get(i) {
            None => return Some(elements),
            Some(b',') => i += 1,
            Some(_) => return None,
        }
    }
}

/// A `for` node (RFC 7239 §6): an IPv4 address or an IPv6 address in
/// brackets, either with an optional port (digits, or an obfuscated `_name`).
/// `unknown`, an obfuscated node name, or an IPv6 address without
/// brackets (its last group could be a port) names no address.
fn parse_node(node: &[u8]) -> Option<IpAddr> {
    let n = std::str::from_utf8(node).ok()?;
    let (ip, port) = match n.strip_prefix('[') {
        Some(rest) => {
            let (v6, port) = rest.split_once(']')?;
            (IpAddr::V6(v6.parse().ok()?), port)
        }
        None => {
            let (v4, port) = n.find(':').map_or((n, ""), |at| n.split_at(at));
            (IpAddr::V4(v4.parse().ok()?), port)
        }
    };
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(p) => match p.strip_prefix('_') {
            Some(obf) => {
                !obf.is_empty()
                    && obf
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            }
            None => (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()),
        },
    };
    port_ok.then_some(ip)
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
        let client = |p: &str, h: &[&str]| {
            client_addr(peer(p), &xff(h), &trusted, ClientIpHeader::XForwardedFor).to_string()
        };
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
            client_addr(
                peer("10.0.0.5"),
                &h,
                &trusted,
                ClientIpHeader::XForwardedFor
            )
            .to_string(),
            "203.0.113.9:0"
        );
        // Nothing trusted: the socket's address, always.
        assert_eq!(
            client_addr(
                peer("10.0.0.5"),
                &xff(&["203.0.113.9"]),
                &[],
                ClientIpHeader::XForwardedFor
            )
            .to_string(),
            "10.0.0.5:40000"
        );
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwarded_names_the_client_in_its_for_parameters() {
        let trusted = nets(&["10.0.0.0/8"]);
        let client = |p: &str, h: &[&str]| {
            client_addr(
                peer(p),
                &headers("forwarded", h),
                &trusted,
                ClientIpHeader::Forwarded,
            )
            .to_string()
        };
        // RFC 7239's own examples.
        assert_eq!(client("10.0.0.5", &["for=192.0.2.43"]), "192.0.2.43:0");
        assert_eq!(
            client("10.0.0.5", &[r#"For="[2001:db8:cafe::17]:4711""#]),
            "[2001:db8:cafe::17]:0"
        );
        assert_eq!(
            client("10.0.0.5", &["for=192.0.2.60;proto=http;by=203.0.113.43"]),
            "192.0.2.60:0"
        );
        // Through two trusted proxies; a client's own element on the left
        // is not believed; several headers are one list.
        assert_eq!(
            client(
                "10.0.0.5",
                &["for=198.51.100.7, for=192.0.2.43, for=10.1.2.3"]
            ),
            "192.0.2.43:0"
        );
        assert_eq!(
            client(
                "10.0.0.5",
                &["for=198.51.100.7", "for=192.0.2.43;proto=https"]
            ),
            "192.0.2.43:0"
        );
        // An IPv6 address in brackets without a port; a quoted IPv4 with one.
        assert_eq!(
            client("10.0.0.5", &[r#"for="[2001:db8::1]""#]),
            "[2001:db8::1]:0"
        );
        assert_eq!(
            client("10.0.0.5", &[r#"for="192.0.2.43:8080""#]),
            "192.0.2.43:0"
        );
        // A comma or semicolon inside a quoted string splits nothing; an
        // escaped character is itself; empty elements are skipped.
        assert_eq!(
            client("10.0.0.5", &[r#"for=192.0.2.43;ext="a,b", for=10.0.0.6"#]),
            "192.0.2.43:0"
        );
        assert_eq!(
            client("10.0.0.5", &[r#"for=192.0.2.43;ext="a;for=198.51.100.9""#]),
            "192.0.2.43:0"
        );
        assert_eq!(
            client("10.0.0.5", &[r#"for="192.0.2.\43""#]),
            "192.0.2.43:0"
        );
        assert_eq!(
            client("10.0.0.5", &["for=192.0.2.43, , for=10.0.0.6"]),
            "192.0.2.43:0"
        );
        // An obfuscated port is a port.
        assert_eq!(
            client("10.0.0.5", &[r#"for="192.0.2.43:_p1""#]),
            "192.0.2.43:0"
        );
        // `unknown`, an obfuscated node, an element without `for`, or one
        // with two, ends the walk at the last trusted hop.
        assert_eq!(client("10.0.0.5", &["for=unknown"]), "10.0.0.5:40000");
        assert_eq!(
            client("10.0.0.5", &["for=192.0.2.1, for=_hidden, for=10.0.0.7"]),
            "10.0.0.7:0"
        );
        assert_eq!(
            client("10.0.0.5", &["for=192.0.2.1, proto=https"]),
            "10.0.0.5:40000"
        );
        assert_eq!(
            client("10.0.0.5", &["for=192.0.2.1;for=192.0.2.2"]),
            "10.0.0.5:40000"
        );
        // An IPv6 address without brackets (its last group could be a
        // port) names nobody.
        assert_eq!(
            client("10.0.0.5", &[r#"for="2001:db8::1""#]),
            "10.0.0.5:40000"
        );
        // Not from a trusted proxy: anybody's to write.
        assert_eq!(
            client("198.51.100.1", &["for=192.0.2.43"]),
            "198.51.100.1:40000"
        );
    }

    /// A line that does not follow the grammar names nobody: a quote the
    /// client left open would otherwise swallow the element a proxy
    /// appended to the same line and leave the client's own `for` to be
    /// believed.
    #[test]
    fn a_malformed_forwarded_line_names_nobody() {
        let trusted = nets(&["10.0.0.0/8"]);
        let client = |h: HeaderMap| {
            client_addr(peer("10.0.0.5"), &h, &trusted, ClientIpHeader::Forwarded).to_string()
        };
        for line in [
            r#"for=6.6.6.6;x=", for=203.0.113.50"#,
            r#"for=6.6.6.6;x=", for="[2001:db8::9]""#,
            r#"for="6.6.6.6, for=203.0.113.50"#,
            "for=192.0.2.43:80, for=203.0.113.50",
            "for=192.0.2.43 junk, for=203.0.113.50",
            "for=, for=203.0.113.50",
        ] {
            assert_eq!(
                client(headers("forwarded", &[line])),
                "10.0.0.5:40000",
                "{line}"
            );
        }
        // Bytes that are not text: the line is not well formed either.
        let mut h = HeaderMap::new();
        h.append(
            "forwarded",
            http::HeaderValue::from_bytes(b"for=\xff, for=203.0.113.50").unwrap(),
        );
        assert_eq!(client(h), "10.0.0.5:40000");
        // The same client text on a line of its own, and the proxy's
        // element on the next (as HAProxy appends to a line it cannot
        // validate): the proxy's element is read.
        assert_eq!(
            client(headers(
                "forwarded",
                &[r#"for=6.6.6.6;x=""#, "for=203.0.113.50"]
            )),
            "203.0.113.50:0"
        );
    }

    #[test]
    fn x_real_ip_is_the_one_address_the_proxy_in_front_set() {
        let trusted = nets(&["10.0.0.0/8"]);
        let client = |p: &str, h: &[&str]| {
            client_addr(
                peer(p),
                &headers("x-real-ip", h),
                &trusted,
                ClientIpHeader::XRealIp,
            )
            .to_string()
        };
        assert_eq!(client("10.0.0.5", &["203.0.113.9"]), "203.0.113.9:0");
        assert_eq!(client("10.0.0.5", &["2001:db8::1"]), "[2001:db8::1]:0");
        // Two headers, or no address: no answer, the proxy itself.
        assert_eq!(
            client("10.0.0.5", &["203.0.113.9", "198.51.100.7"]),
            "10.0.0.5:40000"
        );
        assert_eq!(
            client("10.0.0.5", &["203.0.113.9, 1.2.3.4"]),
            "10.0.0.5:40000"
        );
        assert_eq!(client("10.0.0.5", &[]), "10.0.0.5:40000");
        assert_eq!(
            client("198.51.100.1", &["203.0.113.9"]),
            "198.51.100.1:40000"
        );
    }

    /// Only the listener's header is read: the others are anybody's to
    /// write, since the proxies neither set nor clear them.
    #[test]
    fn only_the_configured_header_is_read() {
        let trusted = nets(&["10.0.0.0/8"]);
        let mut h = headers("x-forwarded-for", &["203.0.113.1"]);
        h.append("forwarded", "for=203.0.113.2".parse().unwrap());
        h.append("x-real-ip", "203.0.113.3".parse().unwrap());
        let client =
            |h: &HeaderMap, header| client_addr(peer("10.0.0.5"), h, &trusted, header).to_string();
        assert_eq!(client(&h, ClientIpHeader::XForwardedFor), "203.0.113.1:0");
        assert_eq!(client(&h, ClientIpHeader::Forwarded), "203.0.113.2:0");
        assert_eq!(client(&h, ClientIpHeader::XRealIp), "203.0.113.3:0");
        // Without the chosen header the others do not stand in for it.
        for (name, header) in [
            ("x-forwarded-for", ClientIpHeader::XForwardedFor),
            ("forwarded", ClientIpHeader::Forwarded),
            ("x-real-ip", ClientIpHeader::XRealIp),
        ] {
            let mut without = h.clone();
            without.remove(name);
            assert_eq!(client(&without, header), "10.0.0.5:40000", "{name}");
        }
    }
}
