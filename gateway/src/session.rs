//! One WebSocket session: a single task that reads the client and writes
//! queued frames in batches (several frames, one flush).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Future, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::channel::ChannelRuntime;
use crate::config::EndpointCfg;
use crate::queue::{Outbound, SessionQueue};
use crate::state::GatewayState;

/// How long to wait for the client's Close reply after ours.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Everything a session needs.
pub struct SessionCtx {
    /// Connection id (for logs).
    pub conn_id: u64,
    /// Client address.
    pub peer: SocketAddr,
    /// The endpoint connected to.
    pub endpoint: Arc<EndpointCfg>,
    /// Its channel.
    pub channel: Arc<ChannelRuntime>,
    /// Keyed stream (key and parameters JSON), for keyed channels.
    pub key: Option<(Arc<str>, Vec<u8>)>,
    /// Who connected.
    pub principal: Principal,
    /// Gateway state.
    pub state: Arc<GatewayState>,
    /// Shutdown signal.
    pub shutdown: CancellationToken,
}

type WriteResult<S> = (
    SplitSink<WebSocketStream<S>, WsMessage>,
    Vec<Outbound>,
    Result<bool, WsError>,
);
type WriteFut<S> = Pin<Box<dyn Future<Output = WriteResult<S>> + Send>>;

/// Write one batch and flush once. Returns whether a Close frame was sent.
fn write_batch<S>(
    mut sink: SplitSink<WebSocketStream<S>, WsMessage>,
    mut batch: Vec<Outbound>,
) -> WriteFut<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(async move {
        let mut res = Ok(false);
        for item in batch.drain(..) {
            let r = match item {
                Outbound::Text(t) => sink.feed(WsMessage::Text(t)).await,
                Outbound::Flush => Ok(()),
                Outbound::Close(code, reason) => {
                    let frame = CloseFrame {
                        code,
                        reason: reason.into(),
                    };
                    res = sink.send(WsMessage::Close(Some(frame))).await.map(|_| true);
                    break;
                }
            };
            if let Err(e) = r {
                res = Err(e);
                break;
            }
        }
        batch.clear();
        if matches!(res, Ok(false)) {
            res = sink.flush().await.map(|_| false);
        }
        (sink, batch, res)
    })
}

async fn maybe<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn maybe_sleep(s: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match s {
        Some(s) => s.await,
        None => std::future::pending().await,
    }
}

enum Event<S> {
    Shutdown,
    Written(WriteResult<S>),
    Queued,
    Read(Option<Result<WsMessage, WsError>>),
    LingerOver,
}

/// Run a session until either side closes or the gateway shuts down.
pub async fn run<S>(ws: WebSocketStream<S>, ctx: SessionCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let m = ctx.state.metrics.clone();
    m.connections.fetch_add(1, Relaxed);
    m.connections_total.fetch_add(1, Relaxed);
    let limits = &ctx.state.config.limits;
    let batch_max = limits.write_batch;
    tracing::debug!(conn_id = ctx.conn_id, peer = %ctx.peer, path = %ctx.endpoint.path.as_str(), channel = %ctx.channel.cfg.name, principal = ?ctx.principal.0, "session opened");

    let queue = Arc::new(SessionQueue::new(limits.session_queue));
    let subscription = ctx.channel.subscribe(ctx.key.clone(), queue.clone());
    let (sink, mut stream) = ws.split::<WsMessage>();
    let mut sink: Option<SplitSink<WebSocketStream<S>, WsMessage>> = Some(sink);
    let mut batch: Vec<Outbound> = Vec::new();
    let mut writing: Option<WriteFut<S>> = None;
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut close_sent = false;
    let mut client_closed = false;
    let mut shutting = false;
    let stream: &mut SplitStream<WebSocketStream<S>> = &mut stream;

    loop {
        if writing.is_none() && !close_sent {
            queue.take(&mut batch, batch_max);
            if !batch.is_empty()
                && let Some(s) = sink.take()
            {
                writing = Some(write_batch(s, std::mem::take(&mut batch)));
            }
        }
        if client_closed && writing.is_none() && queue.is_empty() {
            break;
        }
        let ev = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled(), if !shutting => Event::Shutdown,
            r = maybe(&mut writing) => Event::Written(r),
            _ = queue.notified(), if writing.is_none() && !close_sent => Event::Queued,
            r = stream.next(), if !client_closed => Event::Read(r),
            _ = maybe_sleep(&mut linger) => Event::LingerOver,
        };
        match ev {
            Event::Shutdown => {
                shutting = true;
                queue.close(CloseCode::Away, "server shutting down");
                linger = Some(Box::pin(tokio::time::sleep(CLOSE_LINGER)));
            }
            Event::Written((s, b, r)) => {
                writing = None;
                sink = Some(s);
                batch = b;
                match r {
                    Ok(false) => {}
                    Ok(true) => {
                        close_sent = true;
                        if linger.is_none() {
                            linger = Some(Box::pin(tokio::time::sleep(CLOSE_LINGER)));
                        }
                    }
                    Err(e) => {
                        tracing::debug!(conn_id = ctx.conn_id, error = %e, "write failed");
                        break;
                    }
                }
            }
            Event::Queued => {}
            Event::Read(None) => break,
            Event::Read(Some(Err(WsError::Capacity(e)))) => {
                let too_big = matches!(e, CapacityError::MessageTooLong { .. });
                if too_big {
                    m.closed_too_big.fetch_add(1, Relaxed);
                }
                tracing::debug!(conn_id = ctx.conn_id, error = %e, "inbound message too large");
                queue.close(CloseCode::Size, "message too big");
                client_closed = true;
            }
            Event::Read(Some(Err(e))) => {
                tracing::debug!(conn_id = ctx.conn_id, error = %e, "read failed");
                if close_sent {
                    break;
                }
                queue.close(CloseCode::Protocol, "protocol error");
                client_closed = true;
            }
            Event::Read(Some(Ok(msg))) => match msg {
                WsMessage::Close(_) => {
                    // tungstenite queued the Close reply; flush it out.
                    if close_sent {
                        break;
                    }
                    queue.push_control(Outbound::Flush);
                    client_closed = true;
                }
                WsMessage::Ping(_) => queue.push_control(Outbound::Flush),
                // Stream endpoints ignore what clients send (never an error,
                // never a close); control protocols come with the endpoint
                // protocols.
                WsMessage::Text(_)
                | WsMessage::Binary(_)
                | WsMessage::Pong(_)
                | WsMessage::Frame(_) => {}
            },
            Event::LingerOver => break,
        }
    }
    drop(subscription);
    m.connections.fetch_sub(1, Relaxed);
    tracing::debug!(conn_id = ctx.conn_id, "session closed");
}
