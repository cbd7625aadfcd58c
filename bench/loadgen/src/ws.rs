//! A minimal WebSocket (RFC 6455) client: the opening handshake, a frame
//! parser that works on whatever bytes one `read` returned (several frames
//! per read, frames split across reads), and masked client frames.
//!
//! The parser is deliberately allocation-free on the common path: a complete
//! unfragmented frame is handed to the caller as a slice of the read buffer.
//! Only fragmented messages are reassembled into a per-connection buffer.
//! Text payloads are not UTF-8 validated (the generator never needs `str`).

use std::fmt;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest message (or frame) accepted: 64 MiB.
pub const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsError {
    /// Reserved bits set (no extension was negotiated).
    ReservedBits,
    UnknownOpcode(u8),
    /// Control frame fragmented or longer than 125 bytes.
    BadControlFrame,
    /// Continuation without a started message, or a new data frame while a
    /// fragmented message is in progress.
    BadFragmentation,
    TooLarge(u64),
    Handshake(String),
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WsError::ReservedBits => write!(f, "websocket: reserved bits set"),
            WsError::UnknownOpcode(op) => write!(f, "websocket: unknown opcode {op:#x}"),
            WsError::BadControlFrame => write!(f, "websocket: malformed control frame"),
            WsError::BadFragmentation => write!(f, "websocket: bad fragmentation"),
            WsError::TooLarge(n) => write!(f, "websocket: frame of {n} bytes is too large"),
            WsError::Handshake(m) => write!(f, "websocket handshake: {m}"),
        }
    }
}

impl std::error::Error for WsError {}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub header_len: usize,
    pub payload_len: usize,
}

impl Header {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Result of looking at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// The whole frame (header and payload) is in the buffer.
    Frame(Header),
    /// More bytes are needed; `total` is the frame's full length when the
    /// header is complete, else a lower bound.
    Incomplete { total: usize },
}

/// Parses the frame header at the start of `buf`.
pub fn peek(buf: &[u8]) -> Result<Peek, WsError> {
    if buf.len() < 2 {
        return Ok(Peek::Incomplete { total: 2 });
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(WsError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONT | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || b1 & 0x7F > 125 {
                return Err(WsError::BadControlFrame);
            }
        }
        op => return Err(WsError::UnknownOpcode(op)),
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(Peek::Incomplete { total: 4 });
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(Peek::Incomplete { total: 10 });
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_MESSAGE as u64 {
        return Err(WsError::TooLarge(len));
    }
    let payload_len = len as usize;
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(Peek::Incomplete { total: pos + 4 });
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    let h = Header {
        fin,
        opcode,
        mask,
        header_len: pos,
        payload_len,
    };
    if buf.len() < h.frame_len() {
        Ok(Peek::Incomplete {
            total: h.frame_len(),
        })
    } else {
        Ok(Peek::Frame(h))
    }
}

/// XORs `data` with `mask` (the same operation masks and unmasks).
#[inline]
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ m;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Appends one masked client frame (FIN set) to `out`.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// A small xorshift generator for masking keys and handshake nonces. RFC
/// 6455 asks for unpredictable masks to protect intermediaries; a load
/// generator talking to its own server only needs them to vary.
#[derive(Debug, Clone)]
pub struct MaskRng(u64);

impl MaskRng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        MaskRng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

/// What the connection should do after feeding it bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fed {
    /// Bytes of the input consumed (whole frames); the rest must be kept and
    /// presented again, followed by more data.
    pub consumed: usize,
    /// The size the unconsumed frame will have once complete (0 if none is
    /// pending). Lets the caller grow its buffer for large frames.
    pub need: usize,
    /// A close frame arrived (a close reply has been queued).
    pub closed: bool,
}

/// Per-connection frame state: fragment reassembly and queued replies.
#[derive(Debug, Default)]
pub struct Conn {
    frag: Vec<u8>,
    frag_opcode: Option<u8>,
    /// Bytes to write to the server (pongs, close replies, user frames).
    pub out: Vec<u8>,
    rng: Option<MaskRng>,
    /// The close code the server sent, if any (1005 when it sent none).
    pub close_code: Option<u16>,
    pub pings: u64,
}

impl Conn {
    pub fn new(seed: u64) -> Self {
        Conn {
            rng: Some(MaskRng::new(seed)),
            ..Default::default()
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        self.rng.get_or_insert_with(|| MaskRng::new(0)).mask()
    }

    /// Queues a masked frame for the server.
    pub fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.next_mask();
        write_frame(&mut self.out, opcode, payload, mask);
    }

    /// Queues a close frame with `code`.
    pub fn queue_close(&mut self, code: u16) {
        self.queue(OP_CLOSE, &code.to_be_bytes());
    }

    /// Parses every complete frame in `buf`, calling `on_message(opcode,
    /// payload)` for each complete data message (text or binary; for a
    /// fragmented message once, with the reassembled payload). Pings are
    /// answered (queued in `out`), pongs ignored, a close is answered and
    /// stops parsing. `buf` is mutable so masked frames (which a server must
    /// not send, but a sloppy one might) can be unmasked in place.
    ///
    /// With `raw_stream`, every data frame's payload is handed over as it
    /// arrives, fragments included (for protocols that treat the WebSocket
    /// as a byte stream, like NATS).
    pub fn feed<F>(
        &mut self,
        buf: &mut [u8],
        raw_stream: bool,
        mut on_message: F,
    ) -> Result<Fed, WsError>
    where
        F: FnMut(u8, &[u8]),
    {
        let mut pos = 0;
        loop {
            let h = match peek(&buf[pos..])? {
                Peek::Frame(h) => h,
                Peek::Incomplete { total } => {
                    let need = if pos < buf.len() { total } else { 0 };
                    return Ok(Fed {
                        consumed: pos,
                        need,
                        closed: false,
                    });
                }
            };
            let start = pos + h.header_len;
            let end = start + h.payload_len;
            pos = end;
            let payload = &mut buf[start..end];
            if let Some(m) = h.mask {
                apply_mask(payload, m);
            }
            match h.opcode {
                OP_TEXT | OP_BINARY => {
                    if self.frag_opcode.is_some() {
                        return Err(WsError::BadFragmentation);
                    }
                    if h.fin || raw_stream {
                        on_message(h.opcode, payload);
                    }
                    if !h.fin {
                        self.frag_opcode = Some(h.opcode);
                        if !raw_stream {
                            self.frag.clear();
                            self.frag.extend_from_slice(payload);
                        }
                    }
                }
                OP_CONT => {
                    let Some(op) = self.frag_opcode else {
                        return Err(WsError::BadFragmentation);
                    };
                    if raw_stream {
                        on_message(op, payload);
                    } else {
                        if self.frag.len() + payload.len() > MAX_MESSAGE {
                            return Err(WsError::TooLarge(
                                (self.frag.len() + payload.len()) as u64,
                            ));
                        }
                        self.frag.extend_from_slice(payload);
                        if h.fin {
                            on_message(op, &self.frag);
                            self.frag.clear();
                            if self.frag.capacity() > 64 * 1024 {
                                self.frag.shrink_to(4096);
                            }
                        }
                    }
                    if h.fin {
                        self.frag_opcode = None;
                    }
                }
                OP_PING => {
                    self.pings += 1;
                    let mask = self.next_mask();
                    write_frame(&mut self.out, OP_PONG, payload, mask);
                }
                OP_PONG => {}
                OP_CLOSE => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    self.close_code = Some(code);
                    // Echo the code (1005 must not be sent on the wire).
                    if payload.len() >= 2 {
                        self.queue_close(code);
                    } else {
                        let mask = self.next_mask();
                        write_frame(&mut self.out, OP_CLOSE, &[], mask);
                    }
                    return Ok(Fed {
                        consumed: pos,
                        need: 0,
                        closed: true,
                    });
                }
                _ => unreachable!("peek rejects unknown opcodes"),
            }
        }
    }
}

/// A parsed `ws://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// Host as written (without brackets for IPv6).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Value for the Host header.
    pub host_header: String,
}

impl WsUrl {
    pub fn parse(url: &str) -> Result<WsUrl, String> {
        let rest = if let Some(r) = url.strip_prefix("ws://") {
            r
        } else if url.starts_with("wss://") {
            return Err("wss:// is not supported (plain ws:// only)".into());
        } else {
            return Err(format!("not a ws:// URL: {url}"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("bad host in URL: {url}"));
        }
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let close = r
                .find(']')
                .ok_or_else(|| format!("bad IPv6 host in URL: {url}"))?;
            let host = &r[..close];
            let after = &r[close + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("bad port in URL: {url}"))?,
                None if after.is_empty() => 80,
                None => return Err(format!("bad host in URL: {url}")),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("bad port in URL: {url}"))?,
                ),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty() {
            return Err(format!("bad host in URL: {url}"));
        }
        Ok(WsUrl {
            host,
            port,
            path,
            host_header: authority.to_string(),
        })
    }
}

/// Builds the opening handshake request.
pub fn handshake_request(url: &WsUrl, key: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
        url.path, url.host_header, key
    );
    for (k, v) in headers {
        req.push_str(k);
        req.push_str(": ");
        req.push_str(v);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// A random-looking 16-byte nonce, base64-encoded.
pub fn handshake_key(rng: &mut MaskRng) -> String {
    use base64::Engine;
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&rng.next_u64().to_ne_bytes());
    nonce[8..].copy_from_slice(&rng.next_u64().to_ne_bytes());
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

/// The `Sec-WebSocket-Accept` value for `key`.
pub fn accept_key(key: &str) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Checks the server's handshake response in `buf`. Returns `Ok(None)` if
/// the response head is not complete yet, else the head's length (bytes after
/// it are already WebSocket frames).
pub fn parse_handshake_response(buf: &[u8], key: &str) -> Result<Option<usize>, WsError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(WsError::Handshake(format!("bad HTTP response: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        let reason = resp.reason.unwrap_or("");
        return Err(WsError::Handshake(format!("HTTP {code} {reason}")));
    }
    let expected = accept_key(key);
    let accept = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    match accept {
        Some(v) if v == expected.as_bytes() => {}
        Some(_) => return Err(WsError::Handshake("wrong Sec-WebSocket-Accept".into())),
        None => return Err(WsError::Handshake("no Sec-WebSocket-Accept".into())),
    }
    if let Some(ext) = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
        && !ext.value.is_empty()
    {
        return Err(WsError::Handshake(
            "server negotiated an extension that was not offered".into(),
        ));
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server (unmasked) frame.
    fn sframe(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let n = payload.len();
        if n < 126 {
            v.push(n as u8);
        } else if n <= 0xFFFF {
            v.push(126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    /// Decodes one client frame from `buf`: (opcode, unmasked payload, len).
    fn decode_client(buf: &[u8]) -> (u8, Vec<u8>, usize) {
        let Peek::Frame(h) = peek(buf).unwrap() else {
            panic!("incomplete client frame")
        };
        assert!(h.fin);
        let mask = h.mask.expect("client frames must be masked");
        let mut p = buf[h.header_len..h.frame_len()].to_vec();
        apply_mask(&mut p, mask);
        (h.opcode, p, h.frame_len())
    }

    fn feed_all(conn: &mut Conn, buf: &[u8]) -> (Vec<(u8, Vec<u8>)>, Fed) {
        let mut got = Vec::new();
        let mut b = buf.to_vec();
        let fed = conn
            .feed(&mut b, false, |op, p| got.push((op, p.to_vec())))
            .unwrap();
        (got, fed)
    }

    #[test]
    fn lengths_7_16_64_bit() {
        for n in [0usize, 1, 125, 126, 127, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let f = sframe(true, OP_BINARY, &payload);
            let expect_hdr = if n < 126 {
                2
            } else if n <= 0xFFFF {
                4
            } else {
                10
            };
            let Peek::Frame(h) = peek(&f).unwrap() else {
                panic!()
            };
            assert_eq!(h.header_len, expect_hdr, "n={n}");
            assert_eq!(h.payload_len, n);
            let mut c = Conn::new(1);
            let (got, fed) = feed_all(&mut c, &f);
            assert_eq!(got, vec![(OP_BINARY, payload)], "n={n}");
            assert_eq!(fed.consumed, f.len());
            assert_eq!(fed.need, 0);
        }
    }

    #[test]
    fn several_frames_per_read() {
        let mut buf = Vec::new();
        for i in 0..5 {
            buf.extend(sframe(true, OP_TEXT, format!("{{\"seq\":{i}}}").as_bytes()));
        }
        let mut c = Conn::new(1);
        let (got, fed) = feed_all(&mut c, &buf);
        assert_eq!(got.len(), 5);
        assert_eq!(got[3].1, b"{\"seq\":3}");
        assert_eq!(fed.consumed, buf.len());
    }

    #[test]
    fn frame_split_across_reads_at_every_offset() {
        let mut stream = Vec::new();
        stream.extend(sframe(true, OP_TEXT, b"first"));
        stream.extend(sframe(true, OP_TEXT, &[b'x'; 300])); // 16-bit length
        stream.extend(sframe(true, OP_TEXT, b"third"));
        for split in 0..=stream.len() {
            let mut c = Conn::new(1);
            let mut got = Vec::new();
            // First read.
            let mut buf = stream[..split].to_vec();
            let fed = c
                .feed(&mut buf, false, |op, p| got.push((op, p.to_vec())))
                .unwrap();
            assert!(!fed.closed);
            if fed.consumed < buf.len() {
                assert!(fed.need > buf.len() - fed.consumed, "split={split}");
            }
            // Keep the unconsumed tail, append the second read.
            let mut buf2 = buf[fed.consumed..].to_vec();
            buf2.extend_from_slice(&stream[split..]);
            let fed2 = c
                .feed(&mut buf2, false, |op, p| got.push((op, p.to_vec())))
                .unwrap();
            assert_eq!(fed2.consumed, buf2.len(), "split={split}");
            assert_eq!(fed2.need, 0);
            assert_eq!(got.len(), 3, "split={split}");
            assert_eq!(got[0].1, b"first");
            assert_eq!(got[1].1, vec![b'x'; 300]);
            assert_eq!(got[2].1, b"third");
        }
    }

    #[test]
    fn incomplete_reports_needed_size() {
        let f = sframe(true, OP_BINARY, &[7u8; 70000]);
        let mut c = Conn::new(1);
        for cut in [1usize, 2, 9, 10, 500] {
            let (got, fed) = feed_all(&mut c, &f[..cut]);
            assert!(got.is_empty());
            assert_eq!(fed.consumed, 0);
            if cut >= 10 {
                assert_eq!(fed.need, f.len());
            } else {
                assert!(fed.need > cut);
            }
        }
    }

    #[test]
    fn ping_gets_masked_pong_with_same_payload() {
        let mut buf = sframe(true, OP_PING, b"hello");
        buf.extend(sframe(true, OP_TEXT, b"data"));
        let mut c = Conn::new(7);
        let (got, fed) = feed_all(&mut c, &buf);
        assert_eq!(got, vec![(OP_TEXT, b"data".to_vec())]);
        assert_eq!(fed.consumed, buf.len());
        assert_eq!(c.pings, 1);
        let (op, payload, n) = decode_client(&c.out);
        assert_eq!(op, OP_PONG);
        assert_eq!(payload, b"hello");
        assert_eq!(n, c.out.len());
    }

    #[test]
    fn close_is_echoed_and_stops_parsing() {
        let mut buf = sframe(true, OP_CLOSE, &[0x03, 0xE9, b'b', b'y', b'e']); // 1001
        buf.extend(sframe(true, OP_TEXT, b"after close"));
        let mut c = Conn::new(3);
        let (got, fed) = feed_all(&mut c, &buf);
        assert!(got.is_empty());
        assert!(fed.closed);
        assert_eq!(c.close_code, Some(1001));
        let (op, payload, _) = decode_client(&c.out);
        assert_eq!(op, OP_CLOSE);
        assert_eq!(payload, vec![0x03, 0xE9]);

        // A close without a code is answered with an empty close.
        let mut c = Conn::new(3);
        let (_, fed) = feed_all(&mut c, &sframe(true, OP_CLOSE, &[]));
        assert!(fed.closed);
        assert_eq!(c.close_code, Some(1005));
        let (op, payload, _) = decode_client(&c.out);
        assert_eq!((op, payload.len()), (OP_CLOSE, 0));
    }

    #[test]
    fn fragmented_message_with_interleaved_ping() {
        let mut buf = sframe(false, OP_TEXT, b"{\"seq\":");
        buf.extend(sframe(true, OP_PING, b""));
        buf.extend(sframe(false, OP_CONT, b"12,"));
        buf.extend(sframe(true, OP_CONT, b"\"ts\":3}"));
        let mut c = Conn::new(1);
        let (got, _) = feed_all(&mut c, &buf);
        assert_eq!(got, vec![(OP_TEXT, b"{\"seq\":12,\"ts\":3}".to_vec())]);
        assert_eq!(c.pings, 1);
        // Raw-stream mode hands over every fragment.
        let mut c = Conn::new(1);
        let mut got = Vec::new();
        let mut b = buf.clone();
        c.feed(&mut b, true, |op, p| got.push((op, p.to_vec())))
            .unwrap();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|(op, _)| *op == OP_TEXT));
        assert_eq!(got.concat_payloads(), b"{\"seq\":12,\"ts\":3}");
    }

    trait Concat {
        fn concat_payloads(&self) -> Vec<u8>;
    }
    impl Concat for Vec<(u8, Vec<u8>)> {
        fn concat_payloads(&self) -> Vec<u8> {
            self.iter().flat_map(|(_, p)| p.iter().copied()).collect()
        }
    }

    #[test]
    fn protocol_errors() {
        let mut c = Conn::new(1);
        let mut b = sframe(true, OP_CONT, b"x");
        assert_eq!(
            c.feed(&mut b, false, |_, _| {}),
            Err(WsError::BadFragmentation)
        );
        let mut b = vec![0x80 | 0x3, 0];
        assert_eq!(peek(&b), Err(WsError::UnknownOpcode(3)));
        assert!(Conn::new(1).feed(&mut b, false, |_, _| {}).is_err());
        assert_eq!(peek(&[0xC1, 0]), Err(WsError::ReservedBits));
        assert_eq!(peek(&[0x09, 0]), Err(WsError::BadControlFrame)); // fragmented ping
        assert_eq!(peek(&[0x89, 126, 0, 200]), Err(WsError::BadControlFrame));
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(u64::MAX).to_be_bytes());
        assert!(matches!(peek(&huge), Err(WsError::TooLarge(_))));
    }

    #[test]
    fn masked_server_frame_is_unmasked() {
        let mut out = Vec::new();
        write_frame(&mut out, OP_TEXT, b"masked payload!", [1, 2, 3, 4]);
        let mut c = Conn::new(1);
        let (got, _) = feed_all(&mut c, &out);
        assert_eq!(got, vec![(OP_TEXT, b"masked payload!".to_vec())]);
    }

    #[test]
    fn client_frames_round_trip_all_lengths() {
        for n in [0usize, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            write_frame(&mut out, OP_TEXT, &payload, [0xde, 0xad, 0xbe, 0xef]);
            let (op, p, len) = decode_client(&out);
            assert_eq!((op, len), (OP_TEXT, out.len()));
            assert_eq!(p, payload);
        }
    }

    #[test]
    fn url_parsing() {
        let u = WsUrl::parse("ws://127.0.0.1:9900/bench?x=1").unwrap();
        assert_eq!(
            u,
            WsUrl {
                host: "127.0.0.1".into(),
                port: 9900,
                path: "/bench?x=1".into(),
                host_header: "127.0.0.1:9900".into()
            }
        );
        let u = WsUrl::parse("ws://localhost").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("localhost", 80, "/")
        );
        let u = WsUrl::parse("ws://[::1]:8080?q").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 8080, "/?q")
        );
        assert!(WsUrl::parse("http://x/").is_err());
        assert!(WsUrl::parse("wss://x/").is_err());
        assert!(WsUrl::parse("ws://:80/").is_err());
        assert!(WsUrl::parse("ws://h:notaport/").is_err());
    }

    #[test]
    fn handshake_accept_and_response() {
        // RFC 6455 section 1.3 example.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi";
        assert_eq!(parse_handshake_response(ok, key), Ok(Some(ok.len() - 4)));
        assert_eq!(parse_handshake_response(&ok[..20], key), Ok(None));
        let denied = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            parse_handshake_response(denied, key),
            Err(WsError::Handshake(m)) if m.contains("401")
        ));
        let wrong = b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(parse_handshake_response(wrong, key).is_err());
        let req = handshake_request(
            &WsUrl::parse("ws://h:1/p").unwrap(),
            key,
            &[("X-Api-Key".into(), "k".into())],
        );
        let req = String::from_utf8(req).unwrap();
        assert!(req.starts_with("GET /p HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(req.contains("\r\nX-Api-Key: k\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }
}
