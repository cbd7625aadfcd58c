//! The client side of the NATS text protocol, as a byte-stream parser.
//!
//! Over WebSocket, nats-server sends binary frames that carry a plain byte
//! stream: a protocol line or a message payload may be split across frames,
//! and one frame may batch many messages. [`Parser::feed`] accepts the
//! stream in arbitrary pieces. When nothing is buffered it parses straight
//! from the caller's slice and only copies an incomplete tail.

/// The CONNECT line the generator sends (no echo needed: it never publishes
/// on the connection it subscribes with).
pub const CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n";

/// Longest protocol line accepted (INFO lines can be a few KB).
pub const MAX_LINE: usize = 64 * 1024;
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// Something the server said, other than a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    Info(&'a [u8]),
    Ping,
    Pong,
    Ok,
    Err(&'a [u8]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsError {
    LineTooLong,
    BadLine(String),
    BadPayload,
}

impl std::fmt::Display for NatsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsError::LineTooLong => write!(f, "nats: protocol line too long"),
            NatsError::BadLine(l) => write!(f, "nats: unexpected protocol line: {l}"),
            NatsError::BadPayload => write!(f, "nats: message payload not followed by CRLF"),
        }
    }
}

impl std::error::Error for NatsError {}

/// Incremental parser state.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    /// While reading a message body: (header bytes to skip, total bytes).
    pending: Option<(usize, usize)>,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held back waiting for the rest of a line or payload.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds the next piece of the stream. `on_msg(payload)` is called for
    /// each `MSG` (and the body of each `HMSG`, headers stripped), `on_event`
    /// for everything else.
    pub fn feed<M, E>(
        &mut self,
        data: &[u8],
        mut on_msg: M,
        mut on_event: E,
    ) -> Result<(), NatsError>
    where
        M: FnMut(&[u8]),
        E: FnMut(Event<'_>),
    {
        if self.buf.is_empty() {
            let used = self.parse(data, &mut on_msg, &mut on_event)?;
            self.buf.extend_from_slice(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.buf);
            buf.extend_from_slice(data);
            let res = self.parse(&buf, &mut on_msg, &mut on_event);
            match res {
                Ok(used) => {
                    buf.drain(..used);
                    if buf.is_empty() && buf.capacity() > 64 * 1024 {
                        buf = Vec::new();
                    }
                    self.buf = buf;
                }
                Err(e) => return Err(e),
            }
        }
        if self.pending.is_none() && self.buf.len() > MAX_LINE {
            return Err(NatsError::LineTooLong);
        }
        Ok(())
    }

    /// Parses complete items from `data`; returns how many bytes were used.
    fn parse<M, E>(
        &mut self,
        data: &[u8],
        on_msg: &mut M,
        on_event: &mut E,
    ) -> Result<usize, NatsError>
    where
        M: FnMut(&[u8]),
        E: FnMut(Event<'_>),
    {
        let mut pos = 0;
        loop {
            if let Some((hdr, total)) = self.pending {
                if data.len() - pos < total + 2 {
                    return Ok(pos);
                }
                let body = &data[pos..pos + total];
                if &data[pos + total..pos + total + 2] != b"\r\n" {
                    return Err(NatsError::BadPayload);
                }
                on_msg(&body[hdr..]);
                pos += total + 2;
                self.pending = None;
                continue;
            }
            let rest = &data[pos..];
            let Some(nl) = find_crlf(rest) else {
                return Ok(pos);
            };
            let line = &rest[..nl];
            pos += nl + 2;
            let (op, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
                Some(i) => (&line[..i], trim(&line[i + 1..])),
                None => (line, &line[line.len()..]),
            };
            if op.eq_ignore_ascii_case(b"MSG") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let n = last_number(args).ok_or_else(|| bad(line))?;
                if n > MAX_PAYLOAD {
                    return Err(bad(line));
                }
                self.pending = Some((0, n));
            } else if op.eq_ignore_ascii_case(b"HMSG") {
                // HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
                let mut it = args.split(|&b| b == b' ').filter(|t| !t.is_empty()).rev();
                let total = it.next().and_then(num).ok_or_else(|| bad(line))?;
                let hdr = it.next().and_then(num).ok_or_else(|| bad(line))?;
                if hdr > total || total > MAX_PAYLOAD {
                    return Err(bad(line));
                }
                self.pending = Some((hdr, total));
            } else if op.eq_ignore_ascii_case(b"PING") {
                on_event(Event::Ping);
            } else if op.eq_ignore_ascii_case(b"PONG") {
                on_event(Event::Pong);
            } else if op.eq_ignore_ascii_case(b"INFO") {
                on_event(Event::Info(args));
            } else if op.eq_ignore_ascii_case(b"+OK") {
                on_event(Event::Ok);
            } else if op.eq_ignore_ascii_case(b"-ERR") {
                on_event(Event::Err(args));
            } else if !line.is_empty() {
                return Err(bad(line));
            }
        }
    }
}

fn bad(line: &[u8]) -> NatsError {
    let l = &line[..line.len().min(200)];
    NatsError::BadLine(String::from_utf8_lossy(l).into_owned())
}

#[inline]
fn find_crlf(s: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].iter().position(|&b| b == b'\n') {
        let at = from + i;
        if at > 0 && s[at - 1] == b'\r' {
            return Some(at - 1);
        }
        from = at + 1;
    }
    None
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &s[start..end]
}

fn num(t: &[u8]) -> Option<usize> {
    if t.is_empty() || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(t).ok()?.parse().ok()
}

fn last_number(args: &[u8]) -> Option<usize> {
    let tok = args
        .split(|&b| b == b' ' || b == b'\t')
        .rfind(|t| !t.is_empty())?;
    num(tok)
}

/// Appends `SUB <subject> <sid>\r\n`.
pub fn sub_line(out: &mut Vec<u8>, subject: &str, sid: u32) {
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(sid.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `PUB <subject> <len>\r\n<payload>\r\n`.
pub fn pub_msg(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    struct Seen {
        msgs: Vec<Vec<u8>>,
        events: Vec<String>,
    }

    fn feed(p: &mut Parser, seen: &mut Seen, data: &[u8]) -> Result<(), NatsError> {
        let Seen { msgs, events } = seen;
        p.feed(
            data,
            |m| msgs.push(m.to_vec()),
            |e| {
                events.push(match e {
                    Event::Info(i) => format!("INFO {}", String::from_utf8_lossy(i)),
                    Event::Ping => "PING".into(),
                    Event::Pong => "PONG".into(),
                    Event::Ok => "+OK".into(),
                    Event::Err(e) => format!("-ERR {}", String::from_utf8_lossy(e)),
                })
            },
        )
    }

    const STREAM: &[u8] = b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\n\
PING\r\n\
MSG bench 1 16\r\n{\"seq\":1,\"ts\":2}\r\n\
+OK\r\n\
MSG bench 1 reply.to 9\r\nhas\r\ncrlf\r\n\
HMSG bench 1 23 32\r\nNATS/1.0\r\nA: bcdefg\r\n\r\n{\"seq\":3}\r\n\
MSG bench 1 0\r\n\r\n\
PONG\r\n\
-ERR 'Slow Consumer'\r\n";

    fn expected() -> Seen {
        Seen {
            msgs: vec![
                b"{\"seq\":1,\"ts\":2}".to_vec(),
                b"has\r\ncrlf".to_vec(),
                b"{\"seq\":3}".to_vec(),
                Vec::new(),
            ],
            events: vec![
                "INFO {\"server_id\":\"x\",\"max_payload\":1048576}".into(),
                "PING".into(),
                "+OK".into(),
                "PONG".into(),
                "-ERR 'Slow Consumer'".into(),
            ],
        }
    }

    #[test]
    fn whole_stream_at_once() {
        let mut p = Parser::new();
        let mut seen = Seen::default();
        feed(&mut p, &mut seen, STREAM).unwrap();
        assert_eq!(seen, expected());
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn stream_split_at_every_offset_and_byte_by_byte() {
        for split in 0..=STREAM.len() {
            let mut p = Parser::new();
            let mut seen = Seen::default();
            feed(&mut p, &mut seen, &STREAM[..split]).unwrap();
            feed(&mut p, &mut seen, &STREAM[split..]).unwrap();
            assert_eq!(seen, expected(), "split={split}");
            assert_eq!(p.buffered(), 0);
        }
        let mut p = Parser::new();
        let mut seen = Seen::default();
        for b in STREAM {
            feed(&mut p, &mut seen, std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(seen, expected());
    }

    #[test]
    fn errors() {
        let mut seen = Seen::default();
        assert!(feed(&mut Parser::new(), &mut seen, b"WHAT 1\r\n").is_err());
        assert!(feed(&mut Parser::new(), &mut seen, b"MSG a 1 x\r\n").is_err());
        assert!(feed(&mut Parser::new(), &mut seen, b"MSG a 1 2\r\nabcd").is_err());
        assert!(feed(&mut Parser::new(), &mut seen, &vec![b'I'; MAX_LINE + 1]).is_err());
    }

    #[test]
    fn writers() {
        let mut out = Vec::new();
        sub_line(&mut out, "bench", 1);
        pub_msg(&mut out, "bench", b"{}");
        assert_eq!(out, b"SUB bench 1\r\nPUB bench 2\r\n{}\r\n");
    }
}
