//! The server side of RFC 6455, written for fan-out.
//!
//! - Server frames are unmasked, so a frame is the same bytes for every
//!   subscriber: it is built once ([`frame`]) and shared.
//! - [`FrameWriter`] writes queued frames with one system call per batch: on
//!   plain TCP small frames are copied into one per-thread buffer first (the
//!   kernel then copies one segment, not one per frame); otherwise, and for
//!   larger batches, as one vectored write.
//! - [`FrameReader`] parses client frames from whatever a read returned. It
//!   holds no buffer while idle: only the tail of a partial frame, or a
//!   fragmented message being assembled, is kept on the heap.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Opcode of a text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

/// Largest header of a server frame (no mask).
pub const MAX_HEADER: usize = 10;

/// Length of the header of an unmasked frame carrying `len` payload bytes.
pub fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    }
}

/// Write the header of a final, unmasked frame.
pub fn put_header(buf: &mut BytesMut, opcode: u8, len: usize) {
    buf.put_u8(0x80 | opcode);
    if len < 126 {
        buf.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        buf.put_u8(126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
}

/// A complete, final, unmasked server frame.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut b, opcode, payload.len());
    b.extend_from_slice(payload);
    b.freeze()
}

/// A text frame for `json`, and where the payload starts in it: the one copy
/// a message gets at the plugin boundary.
pub fn text_frame(json: &[u8]) -> (Bytes, usize) {
    (frame(OP_TEXT, json), header_len(json.len()))
}

/// A Close frame with a status code and a reason (truncated to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut r = reason;
    while r.len() > 123 {
        let mut cut = 123;
        while !r.is_char_boundary(cut) {
            cut -= 1;
        }
        r = &r[..cut];
    }
    let mut p = Vec::with_capacity(2 + r.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(r.as_bytes());
    frame(OP_CLOSE, &p)
}

/// Close codes the gateway sends.
pub mod close {
    /// The stream ended (keyed stream reached a terminal state).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the protocol.
    pub const PROTOCOL: u16 = 1002;
    /// A text message was not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy: e.g. the client's queue was full.
    pub const POLICY: u16 = 1008;
    /// A message was larger than allowed.
    pub const TOO_BIG: u16 = 1009;
}

/// A message from the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A complete text message (valid UTF-8).
    Text(String),
    /// A complete binary message.
    Binary(Vec<u8>),
    /// A Ping (answer with a Pong carrying the same payload).
    Ping(Vec<u8>),
    /// A Pong.
    Pong(Vec<u8>),
    /// A Close, with its code and reason if it had any.
    Close(Option<(u16, String)>),
}

/// Why reading stopped; each maps to a close code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// A protocol violation (1002).
    Protocol(&'static str),
    /// A message larger than the limit (1009).
    TooBig,
    /// Text that is not UTF-8 (1007).
    InvalidUtf8,
}

impl ReadError {
    /// The close code and reason to send.
    pub fn close(&self) -> (u16, &'static str) {
        match self {
            ReadError::Protocol(r) => (close::PROTOCOL, r),
            ReadError::TooBig => (close::TOO_BIG, "message too big"),
            ReadError::InvalidUtf8 => (close::INVALID_DATA, "text is not UTF-8"),
        }
    }
}

/// Parses masked client frames incrementally.
#[derive(Debug)]
pub struct FrameReader {
    max_message: usize,
    /// Bytes of an incomplete frame carried over to the next read.
    partial: Vec<u8>,
    /// Opcode and payload of a fragmented message being assembled.
    assembling: Option<(u8, Vec<u8>)>,
}

enum Parsed {
    /// A frame of `consumed` bytes.
    Frame { consumed: usize },
    /// More bytes are needed.
    Incomplete,
}

impl FrameReader {
    /// A reader refusing messages larger than `max_message` bytes.
    pub fn new(max_message: usize) -> FrameReader {
        FrameReader {
            max_message,
            partial: Vec::new(),
            assembling: None,
        }
    }

    /// Whether nothing is buffered (the idle state costs no heap memory).
    pub fn is_idle(&self) -> bool {
        self.partial.capacity() == 0 && self.assembling.is_none()
    }

    /// Parse everything in `data` (appended to any partial frame); complete
    /// messages are pushed to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        if self.partial.is_empty() {
            let used = self.parse_all(data, out)?;
            if used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let used = self.parse_all(&buf, out)?;
            buf.drain(..used);
            self.partial = buf;
        }
        if self.partial.is_empty() {
            // Give the memory back: an idle connection holds no buffer.
            self.partial = Vec::new();
        }
        Ok(())
    }

    fn parse_all(&mut self, mut data: &[u8], out: &mut Vec<Incoming>) -> Result<usize, ReadError> {
        let total = data.len();
        while !data.is_empty() {
            match self.parse_one(data, out)? {
                Parsed::Frame { consumed } => data = &data[consumed..],
                Parsed::Incomplete => break,
            }
        }
        Ok(total - data.len())
    }

    fn parse_one(&mut self, d: &[u8], out: &mut Vec<Incoming>) -> Result<Parsed, ReadError> {
        if d.len() < 2 {
            return Ok(Parsed::Incomplete);
        }
        let fin = d[0] & 0x80 != 0;
        if d[0] & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        let opcode = d[0] & 0x0F;
        if d[1] & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let (len, mut pos) = match d[1] & 0x7F {
            126 => {
                if d.len() < 4 {
                    return Ok(Parsed::Incomplete);
                }
                (u16::from_be_bytes([d[2], d[3]]) as u64, 4)
            }
            127 => {
                if d.len() < 10 {
                    return Ok(Parsed::Incomplete);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&d[2..10]);
                let l = u64::from_be_bytes(b);
                if l >> 63 != 0 {
                    return Err(ReadError::Protocol("frame length has its top bit set"));
                }
                (l, 10)
            }
            l => (l as u64, 2),
        };
        let control = opcode & 0x8 != 0;
        if control {
            if !fin {
                return Err(ReadError::Protocol("fragmented control frame"));
            }
            if len > 125 {
                return Err(ReadError::Protocol("control frame longer than 125 bytes"));
            }
        } else {
            // Refuse oversized messages from the header, before buffering them.
            let already = self.assembling.as_ref().map_or(0, |(_, b)| b.len()) as u64;
            if already + len > self.max_message as u64 {
                return Err(ReadError::TooBig);
            }
        }
        if d.len() < pos + 4 {
            return Ok(Parsed::Incomplete);
        }
        let mask = [d[pos], d[pos + 1], d[pos + 2], d[pos + 3]];
        pos += 4;
        let len = len as usize;
        if d.len() < pos + len {
            return Ok(Parsed::Incomplete);
        }
        let mut payload = d[pos..pos + len].to_vec();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
        let consumed = pos + len;
        match opcode {
            OP_PING => out.push(Incoming::Ping(payload)),
            OP_PONG => out.push(Incoming::Pong(payload)),
            OP_CLOSE => out.push(Incoming::Close(parse_close(&payload)?)),
            OP_TEXT | OP_BINARY => {
                if self.assembling.is_some() {
                    return Err(ReadError::Protocol(
                        "new message before the previous one finished",
                    ));
                }
                if fin {
                    out.push(finish(opcode, payload)?);
                } else {
                    self.assembling = Some((opcode, payload));
                }
            }
            0x0 => {
                let Some((op, mut buf)) = self.assembling.take() else {
                    return Err(ReadError::Protocol("continuation frame without a message"));
                };
                buf.extend_from_slice(&payload);
                if fin {
                    out.push(finish(op, buf)?);
                } else {
                    self.assembling = Some((op, buf));
                }
            }
            _ => return Err(ReadError::Protocol("unknown opcode")),
        }
        Ok(Parsed::Frame { consumed })
    }
}

fn finish(opcode: u8, payload: Vec<u8>) -> Result<Incoming, ReadError> {
    if opcode == OP_TEXT {
        String::from_utf8(payload)
            .map(Incoming::Text)
            .map_err(|_| ReadError::InvalidUtf8)
    } else {
        Ok(Incoming::Binary(payload))
    }
}

fn parse_close(p: &[u8]) -> Result<Option<(u16, String)>, ReadError> {
    match p.len() {
        0 => Ok(None),
        1 => Err(ReadError::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([p[0], p[1]]);
            let reason = std::str::from_utf8(&p[2..]).map_err(|_| ReadError::InvalidUtf8)?;
            Ok(Some((code, reason.to_string())))
        }
    }
}

/// Read once into a buffer that lives only for this call (so an idle
/// connection holds none) and hand what was read to `f`. Ready(Ok(None))
/// means the peer closed the connection.
fn poll_read_once<R: AsyncRead + Unpin, T>(
    cx: &mut Context<'_>,
    rd: &mut R,
    f: impl FnOnce(&[u8]) -> T,
) -> Poll<io::Result<Option<T>>> {
    // Left uninitialized: a socket fills only what it reads, and most polls
    // (every wake-up to write) find nothing to read. Zeroing the 4 KiB on
    // each poll had been 1.4% of the gateway's CPU at 10k clients × 5 msg/s.
    let mut tmp = [const { std::mem::MaybeUninit::<u8>::uninit() }; 4096];
    let mut rb = ReadBuf::uninit(&mut tmp);
    match Pin::new(rd).poll_read(cx, &mut rb) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Ok(None)),
        Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(f(rb.filled())))),
    }
}

/// Read once and parse what came. Ready(Ok(Ok(false))) means the peer
/// closed the connection.
pub fn poll_read_frames<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    rd: &mut R,
    reader: &mut FrameReader,
    out: &mut Vec<Incoming>,
) -> Poll<io::Result<Result<bool, ReadError>>> {
    poll_read_once(cx, rd, |bytes| reader.feed(bytes, out)).map_ok(|r| match r {
        None => Ok(false),
        Some(parsed) => parsed.map(|_| true),
    })
}

/// Read once and throw the bytes away (after a protocol error, so that the
/// client's unread data does not turn our Close into a connection reset).
/// Ready(Ok(false)) means the peer closed the connection.
pub fn poll_discard<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    rd: &mut R,
) -> Poll<io::Result<bool>> {
    poll_read_once(cx, rd, |_| ()).map_ok(|r| r.is_some())
}

/// Whether a client may send this close code (RFC 6455 §7.4 and the IANA
/// registry); anything else is answered with 1002.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Frames waiting to be written, many per write.
#[derive(Debug, Default)]
pub struct FrameWriter {
    pending: VecDeque<Bytes>,
    /// Bytes of the first pending frame already written.
    offset: usize,
    /// Written but not flushed yet: a TLS stream may hold the tail of a
    /// write in its own buffer until flushed (plain TCP never does).
    unflushed: bool,
    /// Copy batches of small frames into one buffer before writing them.
    copy_small_batches: bool,
    /// Frames written since the writer was last empty.
    batch: usize,
}

/// Most frames gathered into one write.
const MAX_IOV: usize = 64;

/// Several frames that come to at most this many bytes are copied into one
/// buffer and written from there: the kernel copies one segment instead of
/// one per frame (small frames are the common case, and a copy in user
/// space costs less than a segment in the kernel).
const COALESCE_MAX: usize = 16 * 1024;

thread_local! {
    /// The buffer frames are copied into for one write: one per worker
    /// thread, none per session; at most [`COALESCE_MAX`] bytes. Taken out
    /// for the write, so no borrow is held across it.
    static COALESCE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl FrameWriter {
    /// An empty writer (no heap memory until a frame is queued). With
    /// `copy_small_batches` (for plain TCP), a batch of several frames of
    /// at most 16 KiB in all is copied into one buffer and written from
    /// there; otherwise, and for larger batches, batches are written as
    /// they are with one vectored write. (TLS copies what it is given into
    /// its records anyway: a copy first would only add one.)
    pub fn new(copy_small_batches: bool) -> FrameWriter {
        FrameWriter {
            copy_small_batches,
            ..FrameWriter::default()
        }
    }

    /// Queue a frame.
    pub fn push(&mut self, frame: Bytes) {
        self.pending.push_back(frame);
    }

    /// Frames not fully written yet.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether everything was written (and flushed).
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && !self.unflushed
    }

    /// Write until everything queued is written (Ready) or the socket is
    /// full (Pending). Progress is kept here, so dropping the future that
    /// polls this loses nothing.
    pub fn poll_write_all<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        wr: &mut W,
    ) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = {
                let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
                let mut k = 0;
                let mut total = 0;
                for (i, f) in self.pending.iter().take(MAX_IOV).enumerate() {
                    let part = if i == 0 { &f[self.offset..] } else { &f[..] };
                    total += part.len();
                    iov[k] = IoSlice::new(part);
                    k += 1;
                }
                let written = if self.copy_small_batches && k > 1 && total <= COALESCE_MAX {
                    let mut buf = COALESCE.take();
                    buf.clear();
                    buf.reserve_exact(total);
                    for part in &iov[..k] {
                        buf.extend_from_slice(part);
                    }
                    let written = Pin::new(&mut *wr).poll_write(cx, &buf);
                    COALESCE.set(buf);
                    written
                } else {
                    Pin::new(&mut *wr).poll_write_vectored(cx, &iov[..k])
                };
                match written {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => n,
                }
            };
            self.advance(n);
            self.unflushed = true;
        }
        if self.unflushed {
            // A no-op for TCP; TLS writes out what it still holds.
            match Pin::new(&mut *wr).poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => self.unflushed = false,
            }
        }
        if let Some(keep) = crate::queue::keep_capacity(self.pending.capacity(), self.batch) {
            // Sessions keep (almost) nothing after a burst.
            self.pending.shrink_to(keep);
        }
        self.batch = 0;
        Poll::Ready(Ok(()))
    }

    /// Give the frame queue's memory back once everything is written (an
    /// idle session then holds no writer memory between pings).
    pub fn release(&mut self) {
        if self.is_empty() {
            self.pending = VecDeque::new();
        }
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.pending.front() else {
                break;
            };
            let left = front.len() - self.offset;
            if n >= left {
                n -= left;
                self.offset = 0;
                self.pending.pop_front();
                self.batch += 1;
            } else {
                self.offset += n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            v.push(0x80 | len as u8);
        } else if len <= 65535 {
            v.push(0x80 | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        v
    }

    fn parse(reader: &mut FrameReader, bytes: &[u8]) -> Result<Vec<Incoming>, ReadError> {
        let mut out = Vec::new();
        reader.feed(bytes, &mut out).map(|_| out)
    }

    #[test]
    fn server_frames_have_the_right_headers() {
        assert_eq!(&frame(OP_TEXT, b"hi")[..], b"\x81\x02hi");
        let f = frame(OP_TEXT, &[b'x'; 200]);
        assert_eq!(&f[..4], &[0x81, 126, 0, 200]);
        assert_eq!(f.len(), 204);
        let f = frame(OP_BINARY, &vec![0u8; 70_000]);
        assert_eq!(&f[..2], &[0x82, 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
        assert_eq!(&close_frame(1001, "bye")[..], b"\x88\x05\x03\xe9bye");
        assert!(close_frame(1000, &"é".repeat(100)).len() <= 127);
    }

    #[test]
    fn parses_every_length_encoding_and_several_frames_per_read() {
        let mut r = FrameReader::new(1 << 20);
        let mut bytes = client(true, OP_TEXT, b"short");
        bytes.extend(client(true, OP_TEXT, &[b'a'; 300]));
        bytes.extend(client(true, OP_BINARY, &[7u8; 70_000]));
        let out = parse(&mut r, &bytes).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], Incoming::Text("short".into()));
        assert_eq!(out[1], Incoming::Text("a".repeat(300)));
        assert_eq!(out[2], Incoming::Binary(vec![7u8; 70_000]));
        assert!(r.is_idle());
    }

    #[test]
    fn a_frame_split_at_every_byte_still_parses() {
        let bytes = client(true, OP_TEXT, &[b'z'; 200]);
        for cut in 0..bytes.len() {
            let mut r = FrameReader::new(1024);
            let mut out = parse(&mut r, &bytes[..cut]).unwrap();
            assert!(out.is_empty());
            out = parse(&mut r, &bytes[cut..]).unwrap();
            assert_eq!(out, vec![Incoming::Text("z".repeat(200))], "cut at {cut}");
            assert!(r.is_idle());
        }
    }

    #[test]
    fn fragments_are_assembled_with_control_frames_between() {
        let mut r = FrameReader::new(1024);
        let mut bytes = client(false, OP_TEXT, b"hel");
        bytes.extend(client(true, OP_PING, b"p"));
        bytes.extend(client(false, 0, b"lo "));
        bytes.extend(client(true, 0, b"world"));
        let out = parse(&mut r, &bytes).unwrap();
        assert_eq!(
            out,
            vec![
                Incoming::Ping(b"p".to_vec()),
                Incoming::Text("hello world".into())
            ]
        );
    }

    #[test]
    fn close_frames_carry_code_and_reason() {
        let mut r = FrameReader::new(1024);
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"done");
        assert_eq!(
            parse(&mut r, &client(true, OP_CLOSE, &p)).unwrap(),
            vec![Incoming::Close(Some((1000, "done".into())))]
        );
        assert_eq!(
            parse(&mut r, &client(true, OP_CLOSE, b"")).unwrap(),
            vec![Incoming::Close(None)]
        );
        assert_eq!(
            parse(&mut r, &client(true, OP_CLOSE, b"x")),
            Err(ReadError::Protocol("close payload of one byte"))
        );
    }

    #[test]
    fn protocol_violations_are_refused() {
        let cases: Vec<(Vec<u8>, ReadError)> = vec![
            (
                vec![0x81, 0x02, b'h', b'i'],
                ReadError::Protocol("client frames must be masked"),
            ),
            (
                {
                    let mut f = client(true, OP_TEXT, b"x");
                    f[0] |= 0x40;
                    f
                },
                ReadError::Protocol("reserved bits set"),
            ),
            (
                client(true, 0x3, b"x"),
                ReadError::Protocol("unknown opcode"),
            ),
            (
                client(false, OP_PING, b"x"),
                ReadError::Protocol("fragmented control frame"),
            ),
            (
                client(true, OP_PING, &[0u8; 126]),
                ReadError::Protocol("control frame longer than 125 bytes"),
            ),
            (
                client(true, 0, b"x"),
                ReadError::Protocol("continuation frame without a message"),
            ),
            (
                {
                    let mut f = client(false, OP_TEXT, b"a");
                    f.extend(client(true, OP_TEXT, b"b"));
                    f
                },
                ReadError::Protocol("new message before the previous one finished"),
            ),
            (client(true, OP_TEXT, &[0xff, 0xfe]), ReadError::InvalidUtf8),
        ];
        for (bytes, want) in cases {
            let mut r = FrameReader::new(1024);
            assert_eq!(parse(&mut r, &bytes), Err(want.clone()), "{want:?}");
        }
    }

    #[test]
    fn oversized_messages_are_refused_from_the_header() {
        let mut r = FrameReader::new(100);
        // Only the header of a 1 GiB frame: refused before any payload arrives.
        let header = [0x82, 0x80 | 127, 0, 0, 0, 0, 0x40, 0, 0, 0];
        assert_eq!(parse(&mut r, &header), Err(ReadError::TooBig));
        let mut r = FrameReader::new(100);
        let mut bytes = client(false, OP_TEXT, &[b'a'; 60]);
        bytes.extend(client(true, 0, &[b'a'; 60]));
        assert_eq!(parse(&mut r, &bytes), Err(ReadError::TooBig));
        let mut r = FrameReader::new(100);
        assert!(parse(&mut r, &client(true, OP_TEXT, &[b'a'; 100])).is_ok());
    }

    #[tokio::test]
    async fn the_writer_writes_everything_in_order_through_a_small_pipe() {
        for copy in [false, true] {
            let frames = (0..50)
                .map(|i| frame(OP_TEXT, format!("message {i}").as_bytes()))
                .collect();
            through_a_pipe(7, frames, copy).await;
        }
    }

    /// Frames of every size, in any mix: batches small enough are copied
    /// into one buffer, larger ones written as they are; the bytes that
    /// arrive are the same, in order, through a pipe that takes a little at
    /// a time (partial writes, in the copied and the vectored case).
    #[tokio::test]
    async fn the_writer_writes_small_and_large_frames_alike() {
        let sizes = [10, 20_000, 5, 7, 3_000, 70_000, 1, 2, 3, 16_000, 40];
        for copy in [false, true] {
            let frames = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| frame(OP_BINARY, &vec![i as u8; *n]))
                .collect();
            through_a_pipe(999, frames, copy).await;
        }
    }

    /// Write `frames` through a pipe of `size` bytes; what comes out must
    /// be their bytes, in order.
    async fn through_a_pipe(size: usize, frames: Vec<Bytes>, copy_small_batches: bool) {
        let (mut a, mut b) = tokio::io::duplex(size);
        let mut w = FrameWriter::new(copy_small_batches);
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        for f in frames {
            w.push(f);
        }
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
                .await
                .unwrap();
            got
        });
        std::future::poll_fn(|cx| w.poll_write_all(cx, &mut a))
            .await
            .unwrap();
        assert!(w.is_empty());
        drop(a);
        assert!(
            reader.await.unwrap() == expected,
            "the bytes differ (copy_small_batches: {copy_small_batches})"
        );
    }

    /// A stream that takes every write whole and records it: its bytes and
    /// how many segments it had (0: a plain write of one buffer).
    #[derive(Default)]
    struct Recording {
        writes: Vec<(usize, usize)>,
        out: Vec<u8>,
    }

    impl tokio::io::AsyncWrite for Recording {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push((buf.len(), 0));
            self.out.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let n = bufs.iter().map(|b| b.len()).sum();
            self.writes.push((n, bufs.len()));
            for b in bufs {
                self.out.extend_from_slice(b);
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// With `copy_small_batches`, several frames of at most 16 KiB in all
    /// go out as one buffer; a batch larger than that, a lone frame, and
    /// every batch without it as one vectored write of a segment per frame.
    #[tokio::test]
    async fn small_batches_are_copied_into_one_buffer_only_when_asked() {
        for copy in [false, true] {
            let mut s = Recording::default();
            let mut w = FrameWriter::new(copy);
            let mut expected = Vec::new();
            let mut batch = |w: &mut FrameWriter, frames: Vec<Bytes>| {
                for f in frames {
                    expected.extend_from_slice(&f);
                    w.push(f);
                }
            };
            let small: Vec<Bytes> = (0..5).map(|i| frame(OP_TEXT, &[b'a' + i; 150])).collect();
            let small_len = small.iter().map(Bytes::len).sum();
            batch(&mut w, small);
            std::future::poll_fn(|cx| w.poll_write_all(cx, &mut s))
                .await
                .unwrap();
            let large: Vec<Bytes> = (0..2).map(|_| frame(OP_BINARY, &[7; 10_000])).collect();
            let large_len = large.iter().map(Bytes::len).sum();
            batch(&mut w, large);
            std::future::poll_fn(|cx| w.poll_write_all(cx, &mut s))
                .await
                .unwrap();
            let lone = frame(OP_TEXT, b"lone");
            let lone_len = lone.len();
            batch(&mut w, vec![lone]);
            std::future::poll_fn(|cx| w.poll_write_all(cx, &mut s))
                .await
                .unwrap();
            let copied = if copy { 0 } else { 5 };
            assert_eq!(
                s.writes,
                [(small_len, copied), (large_len, 2), (lone_len, 1)],
                "copy_small_batches: {copy}"
            );
            assert!(s.out == expected, "the bytes differ");
        }
    }

    /// A stream that, like TLS, takes writes into its own buffer and hands
    /// them on only when flushed; its flush needs two polls.
    #[derive(Default)]
    struct Buffering {
        held: Vec<u8>,
        out: Vec<u8>,
        flush_polls: usize,
    }

    impl tokio::io::AsyncWrite for Buffering {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            // At most 10 bytes per call, so frames end up split.
            let n = buf.len().min(10);
            self.held.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flush_polls += 1;
            if self.flush_polls % 2 == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let held = std::mem::take(&mut self.held);
            self.out.extend(held);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_writer_is_empty_only_once_everything_is_flushed() {
        let mut s = Buffering::default();
        let mut w = FrameWriter::new(false);
        let frames: Vec<Bytes> = (0..5)
            .map(|i| frame(OP_TEXT, format!("message {i}").as_bytes()))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        for f in &frames {
            w.push(f.clone());
        }
        // Every frame is taken by the stream, but the flush is still pending.
        let first = std::future::poll_fn(|cx| Poll::Ready(w.poll_write_all(cx, &mut s))).await;
        assert!(first.is_pending());
        assert_eq!(w.len(), 0);
        assert!(!w.is_empty(), "written but not flushed is not empty");
        std::future::poll_fn(|cx| w.poll_write_all(cx, &mut s))
            .await
            .unwrap();
        assert!(w.is_empty());
        assert_eq!(s.out, expected);
        assert!(s.held.is_empty());
    }
}
