//! One WebSocket session: a single task that reads the client and writes its
//! queue. Frames arrive pre-built and shared; up to `limits.write_batch` of
//! them go out per vectored write. Nothing is buffered while idle, and
//! nothing a client does can make a session hold more than a bounded amount
//! of memory or outlive its close deadline.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::config::EndpointCfg;
use crate::control::Control;
use crate::queue::{Outbound, SessionQueue};
use crate::state::GatewayState;
use crate::ws::{self, FrameReader, FrameWriter, Incoming, ReadError, close};

/// Once a Close is queued, the session ends within this long, whether or not
/// the client reads it or answers.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Everything a session needs.
pub struct SessionCtx {
    /// Connection id (for logs).
    pub conn_id: u64,
    /// Client address.
    pub peer: SocketAddr,
    /// The endpoint connected to.
    pub endpoint: Arc<EndpointCfg>,
    /// The path requested.
    pub path: Arc<str>,
    /// Keyed stream (key and parameters JSON), for keyed channels.
    pub key: Option<(Arc<str>, Vec<u8>)>,
    /// Path parameters as a JSON object.
    pub params: serde_json::Value,
    /// Who connected (None: in-band authentication pending).
    pub principal: Option<Principal>,
    /// Gateway state.
    pub state: Arc<GatewayState>,
    /// Shutdown signal.
    pub shutdown: CancellationToken,
}

async fn maybe_sleep(s: &mut Option<Pin<Box<Sleep>>>) {
    match s {
        Some(s) => s.await,
        None => std::future::pending().await,
    }
}

enum Event {
    Shutdown,
    Written(std::io::Result<()>),
    Queued,
    Read(std::io::Result<Result<bool, ReadError>>),
    LingerOver,
    AuthTimeout,
}

/// What the client side and the close handshake have done so far.
#[derive(Default)]
struct Flags {
    /// A Close frame is in the writer; nothing else may follow it.
    close_queued: bool,
    /// Our Close frame was written.
    close_sent: bool,
    /// Nothing more will be read: the client sent Close or its side ended.
    read_done: bool,
    /// After a protocol error: read and drop input until the client goes.
    discard: bool,
    /// Shutdown has begun.
    shutting: bool,
    /// The newest unanswered Ping payload: at most one Pong waits (RFC 6455
    /// §5.5.3), so a client pinging without reading cannot grow our memory.
    pong: Option<Vec<u8>>,
}

impl Flags {
    fn queue_close(&mut self, writer: &mut FrameWriter, code: u16, reason: &str) {
        if !self.close_queued {
            writer.push(ws::close_frame(code, reason));
            self.close_queued = true;
            self.pong = None;
        }
    }
}

/// Run a session until either side closes or the gateway shuts down.
/// `early` holds bytes the client sent right behind its handshake.
pub async fn run(mut tcp: TcpStream, early: Vec<u8>, ctx: SessionCtx) {
    let m = ctx.state.metrics.clone();
    m.connections.fetch_add(1, Relaxed);
    m.connections_total.fetch_add(1, Relaxed);
    let limits = &ctx.state.config.limits;
    let batch_max = limits.write_batch;
    tracing::debug!(conn_id = ctx.conn_id, peer = %ctx.peer, path = %ctx.path, principal = ?ctx.principal, "session opened");

    let queue = Arc::new(SessionQueue::new(limits.session_queue));
    let info = ctx.state.register(
        ctx.conn_id,
        ctx.path.clone(),
        ctx.peer,
        ctx.principal.as_ref().and_then(|p| p.0.clone()),
    );
    let mut control = Control::new(
        ctx.endpoint.clone(),
        ctx.state.clone(),
        queue.clone(),
        info,
        ctx.key.clone(),
        ctx.params.clone(),
        ctx.principal.clone(),
    );
    let mut reader = FrameReader::new(limits.max_message_size);
    let mut writer = FrameWriter::new();
    let mut incoming = Vec::new();
    let mut linger: Option<Pin<Box<Sleep>>> = None;
    let mut f = Flags::default();
    let (mut rd, mut wr) = tcp.split();
    let mut replies = Vec::new();
    control.start(&mut replies);
    for r in replies.drain(..) {
        writer.push(r);
    }
    // In-band authentication must arrive in time.
    let mut auth_deadline: Option<Pin<Box<Sleep>>> = control
        .awaiting_auth()
        .then(|| ctx.endpoint.auth.inband().map(|ib| ib.timeout))
        .flatten()
        .map(|d| Box::pin(tokio::time::sleep(d)));

    if !early.is_empty() {
        let r = reader.feed(&early, &mut incoming);
        handle_read(
            Ok(r.map(|_| true)),
            &mut incoming,
            &mut writer,
            &mut f,
            &ctx,
            &mut control,
        );
    }
    drop(early);

    loop {
        // The close deadline starts when a Close is queued, not when it is
        // written: a client that stops reading cannot keep the session.
        if linger.is_none() && (f.close_queued || queue.is_closing()) {
            linger = Some(Box::pin(tokio::time::sleep(CLOSE_LINGER)));
        }
        if let Some(p) = f.pong.take() {
            if writer.len() < batch_max {
                writer.push(ws::frame(ws::OP_PONG, &p));
            } else {
                f.pong = Some(p);
            }
        }
        // Move queued frames to the writer: one batch, one vectored write.
        if !f.close_queued && writer.len() < batch_max {
            queue.take_each(batch_max - writer.len(), |item| match item {
                Outbound::Frame(frame) => {
                    writer.push(frame);
                    true
                }
                Outbound::Close(code, reason) => {
                    f.queue_close(&mut writer, code, reason);
                    false
                }
            });
        }
        if f.close_sent && f.read_done {
            break;
        }
        let reading = !f.read_done && !f.discard && writer.len() < batch_max;
        let discarding = !f.read_done && f.discard;
        let ev = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled(), if !f.shutting => Event::Shutdown,
            r = poll_fn(|cx| {
                if discarding {
                    ws::poll_discard(cx, &mut rd).map(|r| r.map(Ok))
                } else {
                    ws::poll_read_frames(cx, &mut rd, &mut reader, &mut incoming)
                }
            }), if reading || discarding => Event::Read(r),
            r = poll_fn(|cx| writer.poll_write_all(cx, &mut wr)), if !writer.is_empty() => Event::Written(r),
            _ = queue.notified(), if writer.is_empty() && !f.close_queued => Event::Queued,
            _ = maybe_sleep(&mut linger) => Event::LingerOver,
            _ = maybe_sleep(&mut auth_deadline) => Event::AuthTimeout,
        };
        match ev {
            Event::Shutdown => {
                f.shutting = true;
                queue.close(close::GOING_AWAY, "server shutting down");
            }
            Event::Written(Ok(())) => {
                if f.close_queued && writer.is_empty() {
                    f.close_sent = true;
                }
            }
            Event::Written(Err(e)) => {
                tracing::debug!(conn_id = ctx.conn_id, error = %e, "write failed");
                break;
            }
            Event::Queued => {}
            Event::AuthTimeout => {
                auth_deadline = None;
                if control.awaiting_auth() {
                    m.auth_timeouts.fetch_add(1, Relaxed);
                    f.queue_close(&mut writer, close::POLICY, "authentication timeout");
                }
            }
            Event::Read(r) => {
                if !handle_read(r, &mut incoming, &mut writer, &mut f, &ctx, &mut control) {
                    break;
                }
                if incoming.capacity() > 4 {
                    incoming = Vec::new();
                }
            }
            Event::LingerOver => break,
        }
    }
    drop(control);
    ctx.state.unregister(ctx.conn_id);
    m.connections.fetch_sub(1, Relaxed);
    tracing::debug!(conn_id = ctx.conn_id, "session closed");
}

/// React to what one read produced. Returns false when the connection is gone.
fn handle_read(
    r: std::io::Result<Result<bool, ReadError>>,
    incoming: &mut Vec<Incoming>,
    writer: &mut FrameWriter,
    f: &mut Flags,
    ctx: &SessionCtx,
    control: &mut Control,
) -> bool {
    let mut replies = Vec::new();
    // Messages parsed before an error are still handled.
    for msg in incoming.drain(..) {
        match msg {
            Incoming::Ping(p) if !f.close_queued => f.pong = Some(p),
            Incoming::Close(c) => {
                f.read_done = true;
                // Echo the client's code, as RFC 6455 asks; refuse codes a
                // client may not send.
                let code = match c {
                    None => close::NORMAL,
                    Some((code, _)) if ws::valid_close_code(code) => code,
                    Some(_) => close::PROTOCOL,
                };
                f.queue_close(writer, code, "");
            }
            // Text goes to the control protocol; stream endpoints ignore
            // it once authenticated: never an error, never a close.
            Incoming::Text(t) if !f.close_queued && !f.discard => {
                control.on_text(t.as_bytes(), &mut replies);
                for r in replies.drain(..) {
                    writer.push(r);
                }
            }
            Incoming::Text(_) | Incoming::Binary(_) | Incoming::Pong(_) | Incoming::Ping(_) => {}
        }
    }
    match r {
        Ok(Ok(true)) => true,
        // The client's side ended without a Close: nothing more to say.
        Ok(Ok(false)) => {
            f.read_done = true;
            f.close_queued
        }
        Ok(Err(e)) => {
            let (code, reason) = e.close();
            if e == ReadError::TooBig {
                ctx.state.metrics.closed_too_big.fetch_add(1, Relaxed);
            }
            tracing::debug!(conn_id = ctx.conn_id, ?e, "closing on a bad client frame");
            f.discard = true;
            f.queue_close(writer, code, reason);
            true
        }
        Err(e) => {
            tracing::debug!(conn_id = ctx.conn_id, error = %e, "read failed");
            false
        }
    }
}
