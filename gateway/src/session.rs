//! One WebSocket session: a single task that reads the client and writes its
//! queue. Frames arrive pre-built and shared; up to `limits.write_batch` of
//! them go out per vectored write. Nothing is buffered while idle, and
//! nothing a client does can make a session hold more than a bounded amount
//! of memory or outlive its close deadline.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;

use crate::config::types::OnInboundLimit;

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
    /// Connection-limit slots held for the session's life.
    pub guards: Vec<crate::limits::CountGuard>,
    /// The principal's slots (`max_connections_per_principal`), taken at the
    /// upgrade; they move with the principal if the client authenticates
    /// again in-band as another.
    pub principal_guards: Vec<crate::limits::CountGuard>,
    /// Gateway state (shutdown reaches the session through its queue:
    /// [`GatewayState::begin_shutdown`]).
    pub state: Arc<GatewayState>,
}

/// The instant of wall-clock time `t`, from `now` (at once if it is past).
fn instant_at(now: Instant, t: SystemTime) -> Instant {
    now + t
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// Ready when the sleep is set and due; never while it is unset.
fn poll_sleep(s: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    match s {
        Some(s) => s.as_mut().poll(cx),
        None => Poll::Pending,
    }
}

enum Event {
    Written(std::io::Result<()>),
    Queued,
    Read(std::io::Result<Result<bool, ReadError>>),
    LingerOver,
    PaceOver,
    Timer,
}

/// The session's deadlines, served by one timer.
struct Timers {
    /// In-band authentication must succeed by then.
    auth_due: Option<Instant>,
    /// The connection's lifetime ends then.
    end_of_life: Option<Instant>,
    /// Its token expires then (`close_at_exp`).
    token_due: Option<Instant>,
    /// A deadline moved: the timer is set again after this read.
    rearm: bool,
    /// Longest silence, and when the client was last heard.
    idle: Option<Duration>,
    last_read: Instant,
    /// Next server Ping, and the Pong deadline of the last one.
    ping_every: Option<Duration>,
    next_ping: Option<Instant>,
    pong_timeout: Duration,
    pong_due: Option<Instant>,
}

/// What a timer deadline asks for.
enum Due {
    Nothing,
    Ping,
    Close(u16, &'static str, Limit),
}

/// Which limit closed the connection (for metrics).
enum Limit {
    Auth,
    Token,
    Lifetime,
    Idle,
    Pong,
}

impl Timers {
    fn next(&self) -> Option<Instant> {
        [
            self.auth_due,
            self.token_due,
            self.end_of_life,
            self.idle.map(|d| self.last_read + d),
            self.next_ping,
            self.pong_due,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn fire(&mut self, now: Instant, authed: bool) -> Due {
        if let Some(t) = self.auth_due
            && now >= t
        {
            self.auth_due = None;
            if !authed {
                return Due::Close(close::POLICY, "authentication timeout", Limit::Auth);
            }
        }
        if self.token_due.is_some_and(|t| now >= t) {
            self.token_due = None;
            return Due::Close(close::POLICY, "token expired", Limit::Token);
        }
        if self.end_of_life.is_some_and(|t| now >= t) {
            self.end_of_life = None;
            return Due::Close(
                close::GOING_AWAY,
                "maximum connection duration reached",
                Limit::Lifetime,
            );
        }
        if let Some(d) = self.idle
            && now >= self.last_read + d
        {
            self.idle = None;
            return Due::Close(close::GOING_AWAY, "idle timeout", Limit::Idle);
        }
        if self.pong_due.is_some_and(|t| now >= t) {
            self.pong_due = None;
            return Due::Close(close::GOING_AWAY, "ping timeout", Limit::Pong);
        }
        if let (Some(t), Some(every)) = (self.next_ping, self.ping_every)
            && now >= t
        {
            self.next_ping = Some(now + every);
            if self.pong_due.is_none() {
                self.pong_due = Some(now + self.pong_timeout);
            }
            return Due::Ping;
        }
        Due::Nothing
    }
}

/// What the client side and the close handshake have done so far.
#[derive(Default)]
struct Flags<'a> {
    /// A Close frame is in the writer; nothing else may follow it.
    close_queued: bool,
    /// Our Close frame was written.
    close_sent: bool,
    /// Nothing more will be read: the client sent Close or its side ended.
    read_done: bool,
    /// After a protocol error: read and drop input until the client goes.
    discard: bool,
    /// The queue woke the session while a write waited (or its interval
    /// ended then): for a Close (the close deadline starts), not for
    /// frames, which wait for the write.
    queued_while_writing: bool,
    /// The newest unanswered Ping payload: at most one Pong waits (RFC 6455
    /// §5.5.3), so a client pinging without reading cannot grow our memory.
    pong: Option<Vec<u8>>,
    /// The endpoint's `close_codes`: codes sent as others.
    close_codes: &'a [(u16, u16)],
    /// A ping went into the writer: give the writer's memory back once it is
    /// written (a session idle but for pings then holds none).
    release_after_write: bool,
    /// `write_interval`: frames were written less than the interval ago;
    /// the queue is not taken from until the pace timer fires.
    paced: bool,
}

impl Flags<'_> {
    /// Queue our Close (its code mapped by the endpoint's `close_codes`).
    fn queue_close(&mut self, writer: &mut FrameWriter, code: u16, reason: &str) {
        let code = self
            .close_codes
            .iter()
            .find(|(from, _)| *from == code)
            .map_or(code, |(_, to)| *to);
        self.queue_close_as_is(writer, code, reason);
    }

    /// Queue a Close with exactly this code (the echo of the client's).
    fn queue_close_as_is(&mut self, writer: &mut FrameWriter, code: u16, reason: &str) {
        if !self.close_queued {
            writer.push(ws::close_frame(code, reason));
            self.close_queued = true;
            self.pong = None;
        }
    }
}

// The session functions return `async move` blocks rather than being
// `async fn`s: an async fn keeps each argument twice for its whole life (as
// the argument and as the local it is moved into), and the session's state
// machine is the largest part of an idle connection's memory.

/// Run a session over plain TCP until either side closes or the gateway
/// shuts down. `early` holds bytes the client sent right behind its
/// handshake.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps each argument twice; see above"
)]
pub fn run_tcp(
    mut tcp: TcpStream,
    mut early: Vec<u8>,
    mut ctx: Box<SessionCtx>,
) -> impl Future<Output = ()> + Send {
    async move {
        // Borrowed halves of the socket itself: no lock, no extra buffer.
        let (mut rd, mut wr) = tcp.split();
        run(&mut rd, &mut wr, &mut early, &mut ctx, true).await;
    }
}

/// [`run_tcp`] over TLS. The halves share the TLS state through
/// `tokio::io::split`; at the end the client gets a TLS close_notify, if it
/// takes it within [`CLOSE_NOTIFY_WAIT`].
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps each argument twice; see above"
)]
pub fn run_tls(
    mut tls: TlsStream<TcpStream>,
    mut early: Vec<u8>,
    mut ctx: Box<SessionCtx>,
) -> impl Future<Output = ()> + Send {
    async move {
        let (mut rd, mut wr) = tokio::io::split(&mut tls);
        run(&mut rd, &mut wr, &mut early, &mut ctx, false).await;
        drop((rd, wr));
        // The session's connection slots go back now, not after the wait.
        drop(ctx);
        let _ = tokio::time::timeout(CLOSE_NOTIFY_WAIT, tls.shutdown()).await;
    }
}

/// How long a TLS session's end waits to hand its close_notify to the socket.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_millis(500);

/// Run a session on a connection's two halves. `early` is emptied (its
/// memory given back) once handled. `copy_small_batches`: see
/// [`FrameWriter::new`] (plain TCP yes, TLS no).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps each argument twice; see above"
)]
fn run<'a, R, W>(
    rd: &'a mut R,
    wr: &'a mut W,
    early: &'a mut Vec<u8>,
    ctx: &'a mut SessionCtx,
    copy_small_batches: bool,
) -> impl Future<Output = ()> + Send + 'a
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    async move {
        let m = ctx.state.metrics.clone();
        m.connections.fetch_add(1, Relaxed);
        m.connections_total.fetch_add(1, Relaxed);
        let config = ctx.state.config();
        let limits = &config.limits;
        let batch_max = limits.write_batch;
        tracing::debug!(conn_id = ctx.conn_id, peer = %ctx.peer, path = %ctx.path, principal = ?ctx.principal, "session opened");

        let el = &ctx.endpoint.limits;
        // `write_interval`: after a write of queued frames, what comes next
        // waits in the queue until the interval is up (`pace_timer`).
        let queue = Arc::new(match el.write_interval {
            Some(_) => SessionQueue::paced(limits.session_queue),
            None => SessionQueue::new(limits.session_queue),
        });
        let info = ctx.state.register(
            ctx.conn_id,
            ctx.path.clone(),
            ctx.peer,
            ctx.principal.as_ref().and_then(|p| p.0.clone()),
            &queue,
        );
        let mut control = Control::new(
            ctx.endpoint.clone(),
            ctx.state.clone(),
            queue.clone(),
            info,
            // Moved, not cloned: the session keeps one copy, in `control`.
            ctx.key.take(),
            std::mem::take(&mut ctx.params),
            ctx.principal.take(),
            std::mem::take(&mut ctx.principal_guards),
        );
        let mut reader = FrameReader::new(el.max_message_size);
        let mut writer = FrameWriter::new(copy_small_batches);
        let mut incoming = Vec::new();
        let mut linger: Option<Pin<Box<Sleep>>> = None;
        let mut pace_timer: Option<Pin<Box<Sleep>>> = None;
        let mut f = Flags {
            close_codes: &ctx.endpoint.close_codes,
            ..Flags::default()
        };
        {
            let mut replies = Vec::new();
            control.start(&mut replies);
            for r in replies {
                writer.push(r);
            }
        }
        // In a block of its own, so `now` takes no room in the state machine.
        let mut timers = {
            let now = Instant::now();
            Timers {
                // In-band authentication must arrive in time.
                auth_due: control
                    .awaiting_auth()
                    .then(|| ctx.endpoint.auth.inband().map(|ib| now + ib.timeout))
                    .flatten(),
                // The handshake's token, if it expires (`close_at_exp`).
                token_due: control.take_expiry().flatten().map(|t| instant_at(now, t)),
                rearm: false,
                end_of_life: el.max_duration.map(|d| now + d),
                idle: el.idle_timeout,
                last_read: now,
                ping_every: el.ping_interval,
                next_ping: el.ping_interval.map(|d| now + d),
                pong_timeout: el.pong_timeout,
                pong_due: None,
            }
        };
        // Boxed: a session without an inbound limit pays 8 bytes, not 72.
        let mut inbound = el
            .inbound
            .map(|r| Box::new(governor::RateLimiter::direct(r.quota())));

        if !early.is_empty() {
            let r = reader.feed(early, &mut incoming);
            handle_read(
                Ok(r.map(|_| true)),
                &mut incoming,
                &mut writer,
                &mut f,
                ctx,
                &mut control,
                &mut timers,
                inbound.as_deref_mut(),
            );
        }
        *early = Vec::new();
        timers.rearm = false;
        let mut timer: Option<Pin<Box<Sleep>>> =
            timers.next().map(|t| Box::pin(tokio::time::sleep_until(t)));

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
            // Move queued frames to the writer: one batch, one write. Not
            // on a wake-up during a write: frames taken then would fill the
            // writer of a client that stopped reading, and a full writer
            // stops reads (its own Close would go unread).
            if !f.paced
                && !f.close_queued
                && writer.len() < batch_max
                && !std::mem::take(&mut f.queued_while_writing)
            {
                let took = queue.take_each(batch_max - writer.len(), |item| match item {
                    Outbound::Frame(frame) => {
                        writer.push(frame);
                        true
                    }
                    Outbound::Close(code, reason) => {
                        f.queue_close(&mut writer, code, reason);
                        false
                    }
                });
                if let Some(stamp) = took.oldest {
                    ctx.state.metrics.delivery_delay.observe_since(stamp);
                }
                // Paced only once the queue is drained: a backlog goes out
                // batch after batch, as without an interval (the queue does
                // not wake the session for it; the write's end does).
                if let Some(p) = ctx.endpoint.limits.write_interval
                    && took.frames > 0
                    && took.drained
                    && !f.close_queued
                {
                    let at = Instant::now() + p;
                    match &mut pace_timer {
                        Some(t) => t.as_mut().reset(at),
                        None => pace_timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    f.paced = true;
                }
            }
            if f.close_sent && f.read_done {
                break;
            }
            let reading = !f.read_done && !f.discard && writer.len() < batch_max;
            let discarding = !f.read_done && f.discard;
            let ev = tokio::select! {
                biased;
                r = poll_fn(|cx| {
                    if discarding {
                        ws::poll_discard(cx, rd).map(|r| r.map(Ok))
                    } else {
                        ws::poll_read_frames(cx, rd, &mut reader, &mut incoming)
                    }
                }), if reading || discarding => Event::Read(r),
                r = poll_fn(|cx| writer.poll_write_all(cx, wr)), if !writer.is_empty() => Event::Written(r),
                // Armed while a write waits too: a Close queued then
                // (shutdown, a slow-consumer policy) must start the close
                // deadline even for a client that stopped reading. The queue
                // wakes only when it stops being empty (not while a paced
                // session waits for its interval), or closes, so a stalled
                // writer is not woken per message.
                _ = queue.notified(), if !f.close_queued => Event::Queued,
                _ = poll_fn(|cx| poll_sleep(&mut linger, cx)) => Event::LingerOver,
                _ = poll_fn(|cx| poll_sleep(&mut timer, cx)) => Event::Timer,
                _ = poll_fn(|cx| poll_sleep(&mut pace_timer, cx)), if f.paced => Event::PaceOver,
            };
            match ev {
                Event::Written(Ok(())) => {
                    // The writer is empty now: take what was queued while
                    // it wrote (the flag may have survived a full writer,
                    // and a queue that stays non-empty never wakes it again).
                    f.queued_while_writing = false;
                    if f.close_queued && writer.is_empty() {
                        f.close_sent = true;
                    }
                    if f.release_after_write && writer.is_empty() {
                        f.release_after_write = false;
                        writer.release();
                    }
                }
                Event::Written(Err(e)) => {
                    tracing::debug!(conn_id = ctx.conn_id, error = %e, "write failed");
                    break;
                }
                Event::Queued => {
                    f.queued_while_writing = !writer.is_empty();
                    // A paced session's queue wakes it only for a Close,
                    // which goes out without waiting for the interval.
                    if f.paced && queue.is_closing() {
                        f.paced = false;
                    }
                }
                Event::Timer if f.close_queued => timer = None,
                Event::Timer => {
                    match timers.fire(Instant::now(), !control.awaiting_auth()) {
                        Due::Nothing => {}
                        Due::Ping => {
                            if !f.close_queued {
                                writer.push(ws::frame(ws::OP_PING, b"gw"));
                                f.release_after_write = true;
                            }
                            // A ring kept for earlier batches goes back while
                            // the session is quiet, and so does the pace timer.
                            queue.release();
                            if !f.paced {
                                pace_timer = None;
                            }
                        }
                        Due::Close(code, reason, which) => {
                            match which {
                                Limit::Auth => &m.auth_timeouts,
                                Limit::Token => &m.closed_token_expired,
                                Limit::Lifetime => &m.closed_lifetime,
                                Limit::Idle => &m.closed_idle,
                                Limit::Pong => &m.closed_ping_timeout,
                            }
                            .fetch_add(1, Relaxed);
                            tracing::debug!(
                                conn_id = ctx.conn_id,
                                reason,
                                "closing: limit reached"
                            );
                            f.queue_close(&mut writer, code, reason);
                        }
                    }
                    timer = timers.next().map(|t| Box::pin(tokio::time::sleep_until(t)));
                }
                Event::Read(r) => {
                    timers.last_read = Instant::now();
                    if !handle_read(
                        r,
                        &mut incoming,
                        &mut writer,
                        &mut f,
                        ctx,
                        &mut control,
                        &mut timers,
                        inbound.as_deref_mut(),
                    ) {
                        break;
                    }
                    if std::mem::take(&mut timers.rearm) {
                        timer = timers.next().map(|t| Box::pin(tokio::time::sleep_until(t)));
                    }
                    // Clients send little (control messages, pongs): keep no
                    // memory between reads.
                    if incoming.capacity() > 0 {
                        incoming = Vec::new();
                    }
                }
                Event::PaceOver => {
                    f.paced = false;
                    // Frames wait for a write in progress (a client that
                    // stopped reading must not fill the writer).
                    f.queued_while_writing = !writer.is_empty();
                }
                Event::LingerOver => break,
            }
        }
        drop(control);
        ctx.state.unregister(ctx.conn_id);
        m.connections.fetch_sub(1, Relaxed);
        tracing::debug!(conn_id = ctx.conn_id, "session closed");
    }
}

/// React to what one read produced. Returns false when the connection is gone.
#[allow(clippy::too_many_arguments)]
fn handle_read(
    r: std::io::Result<Result<bool, ReadError>>,
    incoming: &mut Vec<Incoming>,
    writer: &mut FrameWriter,
    f: &mut Flags<'_>,
    ctx: &SessionCtx,
    control: &mut Control,
    timers: &mut Timers,
    mut inbound: Option<&mut governor::DefaultDirectRateLimiter>,
) -> bool {
    let mut replies = Vec::new();
    let m = &ctx.state.metrics;
    // Messages parsed before an error are still handled.
    for msg in incoming.drain(..) {
        if matches!(msg, Incoming::Pong(_)) {
            timers.pong_due = None;
        }
        if matches!(
            msg,
            Incoming::Text(_) | Incoming::Binary(_) | Incoming::Ping(_)
        ) && !f.close_queued
            && let Some(lim) = inbound.as_deref_mut()
            && lim.check().is_err()
        {
            match ctx.endpoint.limits.on_inbound {
                OnInboundLimit::Close => {
                    m.closed_inbound_rate.fetch_add(1, Relaxed);
                    tracing::debug!(
                        conn_id = ctx.conn_id,
                        "closing: inbound message rate exceeded"
                    );
                    f.discard = true;
                    f.queue_close(writer, close::POLICY, "rate limit exceeded");
                }
                OnInboundLimit::Error => {
                    m.inbound_rate_errors.fetch_add(1, Relaxed);
                    if matches!(msg, Incoming::Text(_)) {
                        control.rate_limited(&mut replies);
                        for r in replies.drain(..) {
                            writer.push(r);
                        }
                    }
                }
            }
            continue;
        }
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
                f.queue_close_as_is(writer, code, "");
            }
            // Text goes to the control protocol; stream endpoints ignore
            // it once authenticated: never an error, never a close.
            Incoming::Text(t) if !f.close_queued && !f.discard => {
                control.on_text(t.as_bytes(), &mut replies);
                for r in replies.drain(..) {
                    writer.push(r);
                }
                if let Some((code, reason)) = control.take_close() {
                    f.queue_close(writer, code, reason);
                }
                if let Some(expires) = control.take_expiry() {
                    timers.token_due = expires.map(|t| instant_at(Instant::now(), t));
                    timers.rearm = true;
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
