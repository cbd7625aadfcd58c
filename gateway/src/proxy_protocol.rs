//! The PROXY protocol (`listeners.NAME.proxy_protocol`), versions 1 and 2.
//!
//! A TCP load balancer (HAProxy, AWS NLB, …) that forwards connections
//! without reading them can say whom it forwards for in a header it writes
//! before the client's first byte. On a listener with `proxy_protocol: true`
//! every connection must begin with one; its source address becomes the
//! connection's peer, for per-IP limits, logs and `client.peer`.
//!
//! Exactly the header's bytes are consumed: what follows (a TLS handshake, an
//! HTTP request) is left in the socket for the next layer. The header is
//! found by peeking, so nothing has to be pushed back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The version 2 signature.
const SIG_V2: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// The version 1 prefix.
const PREFIX_V1: &[u8] = b"PROXY ";
/// The longest version 1 header, CRLF included (the specification's limit).
const MAX_V1: usize = 107;
/// The most address and TLV bytes taken after a version 2 header's fixed
/// 16 (TLVs from cloud load balancers are well under this).
const MAX_V2_PAYLOAD: usize = 4096;

/// What a header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// The connection is for this client.
    Proxied(SocketAddr),
    /// The proxy speaks for itself (version 2 `LOCAL`, e.g. a health check;
    /// version 1 `UNKNOWN`; a family without addresses): keep the socket's
    /// address.
    Local,
}

/// The outcome of parsing the bytes at hand.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of this many bytes.
    Done(usize, Header),
    /// Not enough bytes to tell yet; `Some(n)`: the header is `n` bytes.
    Incomplete(Option<usize>),
    /// Not a header the specification allows.
    Invalid(String),
}

/// Parse the start of a connection.
pub fn parse(buf: &[u8]) -> Parsed {
    let n = buf.len();
    if n > 0 && buf[0] == SIG_V2[0] {
        if buf[..n.min(12)] != SIG_V2[..n.min(12)] {
            return Parsed::Invalid("does not begin with a PROXY protocol header".into());
        }
        return parse_v2(buf);
    }
    if buf[..n.min(PREFIX_V1.len())] != PREFIX_V1[..n.min(PREFIX_V1.len())] {
        return Parsed::Invalid("does not begin with a PROXY protocol header".into());
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= MAX_V1 {
            return Parsed::Invalid(format!(
                "version 1 header has no CRLF within {MAX_V1} bytes"
            ));
        }
        return Parsed::Incomplete(None);
    };
    let len = end + 2;
    if len > MAX_V1 {
        return Parsed::Invalid(format!("version 1 header is longer than {MAX_V1} bytes"));
    }
    let rest = &buf[PREFIX_V1.len()..end];
    if rest == b"UNKNOWN" || rest.starts_with(b"UNKNOWN ") {
        // The rest of the line, whatever it is, is to be ignored.
        return Parsed::Done(len, Header::Local);
    }
    let Ok(line) = std::str::from_utf8(rest) else {
        return Parsed::Invalid("version 1 header is not text".into());
    };
    let mut parts = line.split(' ');
    let proto = parts.next().unwrap_or("");
    let fields: Vec<&str> = parts.collect();
    let v4 = match proto {
        "TCP4" => true,
        "TCP6" => false,
        _ => {
            return Parsed::Invalid(format!(
                "version 1 protocol {proto:?} is not TCP4, TCP6 or UNKNOWN"
            ));
        }
    };
    let [src, dst, sport, dport] = fields[..] else {
        return Parsed::Invalid(format!(
            "version 1 {proto} header needs source, destination and two ports"
        ));
    };
    let addr = |t: &str| -> Option<IpAddr> {
        if v4 {
            t.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
        } else {
            t.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        }
    };
    // Ports are decimal without leading zeros; u16 bounds them.
    let port = |t: &str| -> Option<u16> {
        if t.is_empty()
            || (t.len() > 1 && t.starts_with('0'))
            || !t.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        t.parse().ok()
    };
    match (addr(src), addr(dst), port(sport), port(dport)) {
        (Some(ip), Some(_), Some(p), Some(_)) => {
            Parsed::Done(len, Header::Proxied(SocketAddr::new(ip, p)))
        }
        _ => Parsed::Invalid(format!(
            "version 1 {proto} header has a malformed address or port"
        )),
    }
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Incomplete(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid(format!("version 2 signature with version {}", ver_cmd >> 4));
    }
    let payload = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if payload > MAX_V2_PAYLOAD {
        return Parsed::Invalid(format!(
            "version 2 header carries {payload} bytes after its first 16; at most {MAX_V2_PAYLOAD} are taken"
        ));
    }
    let len = 16 + payload;
    if buf.len() < len {
        return Parsed::Incomplete(Some(len));
    }
    match ver_cmd & 0x0F {
        // The proxy's own connection (a health check): whatever the rest
        // says, the specification says to ignore it.
        0 => return Parsed::Done(len, Header::Local),
        1 => {}
        c => return Parsed::Invalid(format!("version 2 command {c} is not LOCAL or PROXY")),
    }
    let fam = buf[13];
    let need = match fam {
        0x00 => 0,
        0x11 => 12,
        0x21 => 36,
        0x31 => 216,
        0x12 | 0x22 | 0x32 => {
            return Parsed::Invalid("version 2 header is for a datagram (UDP) connection".into());
        }
        f => {
            return Parsed::Invalid(format!(
                "version 2 address family and protocol 0x{f:02x} are not ones the specification defines"
            ));
        }
    };
    let a = &buf[16..len];
    if a.len() < need {
        return Parsed::Invalid(format!(
            "version 2 header's addresses need {need} bytes, it carries {}",
            a.len()
        ));
    }
    let header = match fam >> 4 {
        1 => {
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Header::Proxied(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        2 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[..16]);
            let ip = Ipv6Addr::from(o);
            Header::Proxied(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // Unspecified or a Unix socket: no IP address to take, the
        // specification says to use the real connection's.
        _ => Header::Local,
    };
    Parsed::Done(len, header)
}

/// The client of a connection from `peer` to a `proxy_protocol` listener:
/// the address its header names (an IPv4-mapped address as its IPv4
/// address: one client, one key for per-IP limits), or `peer` itself for a
/// LOCAL or UNKNOWN header. Refused, unread, unless `trusted` (`peer` is
/// one of the listener's `trusted_proxies`). The caller bounds the time.
pub async fn client(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    trusted: bool,
) -> Result<SocketAddr, String> {
    if !trusted {
        return Err("not from a trusted proxy".into());
    }
    Ok(match read_header(tcp).await? {
        Header::Proxied(c) => SocketAddr::new(c.ip().to_canonical(), c.port()),
        Header::Local => peer,
    })
}

/// Read a connection's header, consuming exactly its bytes.
///
/// What has come is peeked, not read, until it holds a whole header, so
/// that the bytes after it stay in the socket. Part of a header is all
/// header: it is read out of the socket, so that the next peek waits for
/// more instead of returning the same bytes at once. The caller bounds the
/// time this takes (a client that sends part of a header and stops would
/// otherwise hold the task).
pub async fn read_header(tcp: &mut TcpStream) -> Result<Header, String> {
    let io = |e: std::io::Error| e.to_string();
    // The first `got` bytes of `buf` are header already taken out of the
    // socket; after them, what a peek saw. A version 1 header fits (it is
    // invalid without a CRLF in 107 bytes), as do the first 16 bytes of a
    // version 2 one, which give its length.
    let mut buf = [0u8; MAX_V1 + 1];
    let mut got = 0;
    loop {
        let n = tcp.peek(&mut buf[got..]).await.map_err(io)?;
        if n == 0 {
            return Err("closed before sending a whole PROXY protocol header".into());
        }
        match parse(&buf[..got + n]) {
            Parsed::Done(len, header) => {
                tcp.read_exact(&mut buf[got..len]).await.map_err(io)?;
                return Ok(header);
            }
            Parsed::Incomplete(Some(len)) => {
                // A version 2 header says its length: read the rest of it.
                let mut whole = vec![0u8; len];
                whole[..got].copy_from_slice(&buf[..got]);
                tcp.read_exact(&mut whole[got..]).await.map_err(io)?;
                return match parse(&whole) {
                    Parsed::Done(_, header) => Ok(header),
                    Parsed::Invalid(m) => Err(m),
                    Parsed::Incomplete(_) => Err("version 2 header cut short".into()),
                };
            }
            Parsed::Incomplete(None) => {
                tcp.read_exact(&mut buf[got..got + n]).await.map_err(io)?;
                got += n;
            }
            Parsed::Invalid(m) => return Err(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, addr: &[u8], tlv: &[u8]) -> Vec<u8> {
        let mut b = SIG_V2.to_vec();
        b.push(0x20 | cmd);
        b.push(fam);
        b.extend_from_slice(&((addr.len() + tlv.len()) as u16).to_be_bytes());
        b.extend_from_slice(addr);
        b.extend_from_slice(tlv);
        b
    }

    #[test]
    fn version_1() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Parsed::Done(43, Header::Proxied("203.0.113.7:51234".parse().unwrap()))
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 80\r\n";
        assert_eq!(
            parse(h),
            Parsed::Done(
                h.len(),
                Header::Proxied("[2001:db8::1]:4000".parse().unwrap())
            )
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parsed::Done(15, Header::Local));
        // After UNKNOWN anything goes, text or not.
        assert_eq!(
            parse(b"PROXY UNKNOWN \xff\xfe\r\n"),
            Parsed::Done(18, Header::Local)
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"),
            Parsed::Done(35, Header::Local)
        );
        // Every prefix of a header is incomplete, not invalid.
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Parsed::Incomplete(None), "{i}");
        }
    }

    #[test]
    fn version_1_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 203.0.113.7 2001:db8::2 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 0443 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 +443 443\r\n",
            b"PROXY TCP4  203.0.113.7 10.0.0.1 1 443\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 1 2\r\n",
            b"proxy TCP4 203.0.113.7 10.0.0.1 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // No CRLF within 107 bytes.
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100]].concat();
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
    }

    #[test]
    fn version_2() {
        let mut a4 = vec![203, 0, 113, 7, 10, 0, 0, 1];
        a4.extend_from_slice(&51234u16.to_be_bytes());
        a4.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x11, &a4, &[]);
        assert_eq!(
            parse(&h),
            Parsed::Done(28, Header::Proxied("203.0.113.7:51234".parse().unwrap()))
        );
        // TLVs (here AWS's VPC endpoint ID) are skipped.
        let tlv = [&[0xEA, 0, 5][..], b"\x01vpce"].concat();
        let h = v2(1, 0x11, &a4, &tlv);
        assert_eq!(
            parse(&h),
            Parsed::Done(
                h.len(),
                Header::Proxied("203.0.113.7:51234".parse().unwrap())
            )
        );
        // A prefix is incomplete; once 16 bytes are in, the length is known.
        for i in 0..16 {
            assert_eq!(parse(&h[..i]), Parsed::Incomplete(None), "{i}");
        }
        for i in 16..h.len() {
            assert_eq!(parse(&h[..i]), Parsed::Incomplete(Some(h.len())), "{i}");
        }
        let mut a6 = vec![0x20, 0x01, 0x0d, 0xb8];
        a6.extend_from_slice(&[0; 11]);
        a6.push(1);
        a6.extend_from_slice(&[0; 16]);
        a6.extend_from_slice(&4000u16.to_be_bytes());
        a6.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &a6, &[])),
            Parsed::Done(52, Header::Proxied("[2001:db8::1]:4000".parse().unwrap()))
        );
        // LOCAL (a health check), unspecified family, Unix sockets: the
        // socket's own address.
        assert_eq!(
            parse(&v2(0, 0x11, &a4, &[])),
            Parsed::Done(28, Header::Local)
        );
        assert_eq!(
            parse(&v2(0, 0x00, &[], &[])),
            Parsed::Done(16, Header::Local)
        );
        assert_eq!(
            parse(&v2(1, 0x31, &[0; 216], &[])),
            Parsed::Done(232, Header::Local)
        );
    }

    #[test]
    fn version_2_local_ignores_the_rest() {
        // LOCAL with a family the specification does not define, and with
        // addresses too short for the family it names.
        assert_eq!(
            parse(&v2(0, 0x77, &[], &[])),
            Parsed::Done(16, Header::Local)
        );
        assert_eq!(
            parse(&v2(0, 0x21, &[0; 4], &[])),
            Parsed::Done(20, Header::Local)
        );
    }

    #[test]
    fn version_2_refused() {
        let a4 = [203, 0, 113, 7, 10, 0, 0, 1, 0, 1, 0, 2];
        // Version 1 in the version nibble, command 2, family 4, UDP, short addresses.
        let mut bad_version = v2(1, 0x11, &a4, &[]);
        bad_version[12] = 0x11;
        for bad in [
            bad_version,
            v2(2, 0x11, &a4, &[]),
            v2(1, 0x41, &a4, &[]),
            v2(1, 0x12, &a4, &[]),
            v2(1, 0x10, &a4, &[]),
            v2(1, 0x13, &a4, &[]),
            v2(1, 0x1F, &a4, &[]),
            v2(1, 0x11, &a4[..8], &[]),
            v2(1, 0x21, &a4, &[]),
        ] {
            assert!(matches!(parse(&bad), Parsed::Invalid(_)), "{bad:?}");
        }
        // A signature that goes wrong part way.
        assert!(matches!(parse(b"\r\n\r\n\0\r\nQUIX"), Parsed::Invalid(_)));
        // Too long to take.
        let mut big = SIG_V2.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert!(matches!(parse(&big), Parsed::Invalid(_)));
    }

    /// A connected pair: (the gateway's side, the client's side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (l.accept().await.unwrap().0, client)
    }

    /// What follows the header is left in the socket.
    async fn rest(tcp: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        tcp.read_exact(&mut b).await.unwrap();
        b
    }

    #[tokio::test]
    async fn read_header_takes_exactly_the_header() {
        use tokio::io::AsyncWriteExt;
        // Whole, with the request behind it in the same write.
        let (mut gw, mut c) = pair().await;
        c.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET /")
            .await
            .unwrap();
        assert_eq!(
            read_header(&mut gw).await,
            Ok(Header::Proxied("203.0.113.7:51234".parse().unwrap()))
        );
        assert_eq!(rest(&mut gw, 5).await, b"GET /");

        // In pieces, apart (the pause lets the reader see each one alone;
        // if it saw them together the test passes the same way): each
        // piece is taken and the reader waits for the next. The last piece
        // carries the request's first bytes.
        let (mut gw, mut c) = pair().await;
        let reader = tokio::spawn(async move {
            let h = read_header(&mut gw).await;
            (h, rest(&mut gw, 3).await)
        });
        for piece in [
            &b"PRO"[..],
            b"XY TCP4 203.0.113.8 ",
            b"10.0.0.1 4 443\r\nGET",
        ] {
            c.write_all(piece).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (h, after) = reader.await.unwrap();
        assert_eq!(h, Ok(Header::Proxied("203.0.113.8:4".parse().unwrap())));
        assert_eq!(after, b"GET");

        // A version 2 header longer than a peek (TLVs), in two pieces.
        let (mut gw, mut c) = pair().await;
        let mut a4 = vec![198, 51, 100, 9, 10, 0, 0, 1];
        a4.extend_from_slice(&7u16.to_be_bytes());
        a4.extend_from_slice(&443u16.to_be_bytes());
        let tlv = [&[0xEA, 0, 200][..], &[b'v'; 200]].concat();
        let mut h = v2(1, 0x11, &a4, &tlv);
        h.extend_from_slice(b"\x16\x03");
        let reader = tokio::spawn(async move {
            let h = read_header(&mut gw).await;
            (h, rest(&mut gw, 2).await)
        });
        c.write_all(&h[..10]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        c.write_all(&h[10..]).await.unwrap();
        let (got, after) = reader.await.unwrap();
        assert_eq!(got, Ok(Header::Proxied("198.51.100.9:7".parse().unwrap())));
        assert_eq!(after, b"\x16\x03");
    }

    #[tokio::test]
    async fn read_header_refuses_and_ends() {
        use tokio::io::AsyncWriteExt;
        // Not a header: refused at its first byte, without waiting for more.
        let (mut gw, mut c) = pair().await;
        c.write_all(b"G").await.unwrap();
        assert!(read_header(&mut gw).await.is_err());
        // Part of a header, then the client goes: an error, not a wait.
        let (mut gw, mut c) = pair().await;
        c.write_all(b"PROXY TCP4 1.2").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(
            tokio::time::timeout(std::time::Duration::from_secs(5), read_header(&mut gw))
                .await
                .expect("at once, not at the caller's timeout"),
            Err("closed before sending a whole PROXY protocol header".into())
        );
    }
}
