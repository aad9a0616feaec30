//! The proxy: each client connection is relayed, frame by frame, over a
//! connection of its own to the upstream runtime. SETTINGS, flow control,
//! PING and GOAWAY are the two peers' own; message bytes pass unchanged, so
//! fields this shim does not know survive and streaming methods work; header
//! blocks are decoded and re-encoded ([`super::headers`]), which is where an
//! `:authority` no server should have to take is made valid.
//!
//! The calls the shim answers itself ([`Owner`]) are taken out of the stream
//! before the upstream sees them: their request is collected, handed to the
//! owner, and the reply is written back on the client's stream. The upstream
//! sees a gap in the stream numbers, which HTTP/2 allows. Two flow-control
//! windows need care: the client's bytes for such a call never reach the
//! upstream, so the relay returns their credit to the client itself; and the
//! reply's bytes use the client's window without the upstream knowing, so the
//! relay takes that much out of the client's next connection WINDOW_UPDATEs.
//!
//! PING is answered by the relay on each side and never passed on. It belongs
//! to one connection, not to any call, and the two connections differ: the
//! client's carries the shim's own replies, the upstream's does not. grpc-go
//! (the kubelet, crictl, critest) sends a BDP PING whenever it receives DATA,
//! and containerd's grpc-go server counts a PING as a strike unless it has sent
//! HEADERS or DATA since the last one; at the third strike it sends GOAWAY
//! ENHANCE_YOUR_CALM `too_many_pings` and drops the connection with every call
//! on it. So when PINGs were forwarded, four calls in a row that the shim
//! answered itself (CreateContainer, StartContainer, RemoveContainer) made
//! containerd cut the client off. Answered here, a PING measures the hop it
//! crossed, which is what keepalive and the BDP estimator want to know; a
//! connection's end is seen as the socket's close on either side.
//!
//! Relaying frames costs one read and one write per batch and direction. A
//! full HTTP/2 server and client per call (hyper) cost about four times as much
//! CPU on this project's VM, which is why the forwarding path is this one.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::frame::{self, Frame, Reason};
use super::headers::{self, Fields, HeaderCodec};

/// A call the shim answers itself: its path, metadata and request bytes (the
/// gRPC length-prefixed messages, as sent).
pub struct Call {
    pub path: String,
    pub metadata: http::HeaderMap,
    pub body: Bytes,
}

/// The answer to a [`Call`]: response headers, the framed messages, trailers.
/// With an empty body and no trailers the headers end the stream (gRPC's
/// trailers-only form).
pub struct Reply {
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl Reply {
    /// A trailers-only gRPC error.
    pub fn status(s: tonic::Status) -> Reply {
        let (parts, _) = s.into_http::<()>().into_parts();
        Reply {
            headers: parts.headers,
            body: Bytes::new(),
            trailers: None,
        }
    }

    /// A successful unary answer carrying `m`.
    pub fn message(m: &impl prost::Message) -> Reply {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Reply {
            headers,
            body: crate::pbwire::grpc_frame(&m.encode_to_vec()).into(),
            trailers: Some(trailers),
        }
    }

    /// The gRPC status code (from the trailers, or the headers of a
    /// trailers-only answer); a missing one counts as UNKNOWN.
    pub fn code(&self) -> tonic::Code {
        let v = self
            .trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or(self.headers.get("grpc-status"));
        v.and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
            .map(tonic::Code::from)
            .unwrap_or(tonic::Code::Unknown)
    }

    /// The one message of a successful unary answer, decoded.
    pub fn decode<M: prost::Message + Default>(&self) -> Option<M> {
        (self.code() == tonic::Code::Ok)
            .then(|| crate::pbwire::grpc_message(&self.body))
            .flatten()
            .and_then(|m| M::decode(m).ok())
    }
}

impl Call {
    /// The request's one message, decoded.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, tonic::Status> {
        crate::pbwire::grpc_message(&self.body)
            .and_then(|m| M::decode(m).ok())
            .ok_or_else(|| {
                tonic::Status::invalid_argument(format!(
                    "{}: not one well-formed request message",
                    self.path
                ))
            })
    }
}

pub type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// A change to a forwarded call's reply message (protobuf bytes in, out). It
/// may only append: protobuf merges what is appended, so nothing the upstream
/// said is lost or re-encoded.
pub type Amend = Box<dyn FnOnce(&[u8]) -> Vec<u8> + Send>;

/// What the shim serves itself, and what it amends on the way.
pub trait Owner: Send + Sync + 'static {
    fn owns(&self, path: &str) -> bool;
    fn call(self: Arc<Self>, call: Call) -> ReplyFuture;
    /// Whether requests to `path` are shown to [`amend`](Self::amend).
    fn watches(&self, _path: &str) -> bool {
        false
    }
    /// Given a forwarded request's message, how to amend its reply, if at all.
    fn amend(&self, _path: &str, _request: &[u8]) -> Option<Amend> {
        None
    }
    /// Held from an owned call's dispatch until its reply is written: what a
    /// stopping server waits on.
    fn hold(&self) -> Option<TaskTrackerToken> {
        None
    }
}

/// Requests larger than this are not collected for the shim's own calls.
const MAX_CALL: usize = 4 << 20;

/// Relays one client connection until either side closes it.
pub async fn relay(client: UnixStream, upstream: &Path, owner: Arc<dyn Owner>) {
    let _counted = crate::metrics::get().relay_connection();
    let (crd, cwr) = client.into_split();
    let (to_client, from_client_side) = mpsc::unbounded_channel();
    let (to_upstream, from_upstream_side) = mpsc::unbounded_channel();
    let shared = Arc::new(Mutex::new(Flow::default()));
    let up = match UnixStream::connect(upstream).await {
        Ok(u) => Some(u.into_split()),
        Err(e) => {
            tracing::warn!(upstream = %upstream.display(), "upstream unreachable: {e}");
            crate::metrics::get().upstream_error("connect");
            None
        }
    };
    let reach = match &up {
        Some(_) => Reach::Upstream,
        None => Reach::Unreachable(format!(
            "ckpt-shim: upstream runtime unreachable: {}",
            upstream.display()
        )),
    };
    let (urd, uwr) = match up {
        Some((r, w)) => (Some(r), Some(w)),
        None => (None, None),
    };
    // Each side ends the other: the client side's end closes the channel the
    // upstream side waits on, and the other way round.
    let mut client_side = ClientSide::new(owner, reach, to_client, shared.clone());
    client_side.upstream = upstream.to_path_buf();
    let c2u = client_side.run(crd, uwr, from_upstream_side);
    let u2c = UpstreamSide::new(shared).run(urd, cwr, from_client_side, to_upstream);
    let (a, b) = tokio::join!(c2u, u2c);
    for e in [a.err(), b.err()].into_iter().flatten() {
        tracing::debug!("connection ended: {e}");
    }
}

/// Whether calls can be forwarded, or why not.
enum Reach {
    Upstream,
    Unreachable(String),
}

/// What both sides share: the client's connection-level receive window, as
/// both affect it, the replies to amend, and the forwarded calls' method
/// labels until their answer is counted.
#[derive(Default)]
struct Flow {
    amends: HashMap<u32, Amend>,
    calls: HashMap<u32, String>,
    /// What the client can still receive (RFC 9113 §6.9.2: starts at 65535).
    window: i64,
    started: bool,
    /// Bytes the relay sent the client that the upstream does not know of.
    debt: u64,
    /// Replies waiting for window.
    waiting: usize,
    /// The highest stream the client opened: what a GOAWAY to it names.
    last_stream: u32,
    /// SETTINGS_MAX_FRAME_SIZE as each peer announced it (0: the default), the
    /// limit on what the other one may send through the relay.
    client_max_frame: usize,
    upstream_max_frame: usize,
}

/// The shared state, whichever side panicked last (nothing in it is left
/// half-changed by a panic).
fn lock(flow: &Mutex<Flow>) -> MutexGuard<'_, Flow> {
    flow.lock().unwrap_or_else(|p| p.into_inner())
}

impl Flow {
    fn window(&mut self) -> &mut i64 {
        if !self.started {
            self.started = true;
            self.window = 65_535;
        }
        &mut self.window
    }
}

/// To the task writing to the client.
enum ToClient {
    /// A reply to an owned call, with what keeps a stopping server waiting
    /// until it is written.
    Reply(u32, Reply, Option<TaskTrackerToken>),
    Frames(Bytes),
    /// The client's SETTINGS_HEADER_TABLE_SIZE.
    TableSize(u32),
    /// The client's window grew.
    Wake,
    /// The client broke the protocol: GOAWAY, and the connection ends.
    GoAway(frame::Reason, String),
    /// With no upstream: GOAWAY after this stream, so that the client's next
    /// call comes on a new connection, which tries the upstream again.
    Drain(u32),
}

/// To the task writing to the upstream.
enum ToUpstream {
    /// The upstream's SETTINGS_HEADER_TABLE_SIZE.
    TableSize(u32),
    /// Connection credit for bytes the upstream sent that the client never got
    /// (an amended reply came out shorter).
    Credit(u32),
    /// The upstream's PING, answered.
    Pong(Bytes),
    /// The upstream reset this stream: the client sends on it no more.
    Closed(u32),
    /// The upstream's GOAWAY named this last stream: the client takes every
    /// stream above it as never processed, and retries it elsewhere.
    Refused(u32),
    /// The upstream broke the protocol: GOAWAY, and the connection ends.
    GoAway(frame::Reason, String),
}

/// A header block being collected from HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl Block {
    /// Collects `f`; returns the block once END_HEADERS has come. A block the
    /// relay will not decode leaves the peers' HPACK contexts apart, so it ends
    /// the connection (RFC 9113 §4.3: COMPRESSION_ERROR).
    fn collect(slot: &mut Option<Block>, f: &Frame) -> Result<Option<Block>, frame::Error> {
        let fragment = match (f.kind, slot.as_mut()) {
            (frame::HEADERS, None) => {
                let (fragment, priority) = f.header_fragment()?;
                *slot = Some(Block {
                    stream: f.stream,
                    flags: f.flags,
                    priority,
                    fragment: Vec::new(),
                });
                fragment
            }
            (frame::CONTINUATION, Some(b)) if b.stream == f.stream => &f.payload[..],
            _ => return Err(frame::error(Reason::Protocol, "header block out of place")),
        };
        let b = slot.as_mut().expect("set above");
        if b.fragment.len() + fragment.len() > headers::MAX_BLOCK {
            return Err(frame::error(Reason::Compression, "header block too large"));
        }
        b.fragment.extend_from_slice(fragment);
        Ok(if f.has(frame::END_HEADERS) {
            slot.take()
        } else {
            None
        })
    }

    fn ends_stream(&self) -> bool {
        self.flags & frame::END_STREAM != 0
    }

    /// The block's fields, decoded with `codec`'s context.
    fn decode(&self, codec: &mut HeaderCodec) -> Result<Fields, frame::Error> {
        codec
            .decode(&self.fragment)
            .map_err(|e| frame::error(Reason::Compression, e.to_string()))
    }

    /// Re-encodes the block, as `fields`, with `codec`'s context into `out`.
    fn put(&self, codec: &mut HeaderCodec, out: &mut BytesMut, fields: &Fields) {
        codec.put(out, self.stream, fields, self.ends_stream(), self.priority);
    }
}

/// Any frame but CONTINUATION while a header block is open is a connection
/// error (RFC 9113 §6.10).
fn inside_block(block: &Option<Block>, f: &Frame) -> Result<(), frame::Error> {
    match block {
        Some(_) if f.kind != frame::CONTINUATION => Err(frame::error(
            Reason::Protocol,
            format!("a frame of type {} inside a header block", f.kind),
        )),
        _ => Ok(()),
    }
}

/// A stream the shim answers itself.
struct Owned {
    path: String,
    metadata: http::HeaderMap,
    body: BytesMut,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Answered before its request was whole (too large): the rest is dropped.
    refused: bool,
}

/// Reads the client, forwards to the upstream, and takes out the owned calls.
struct ClientSide {
    owner: Arc<dyn Owner>,
    reach: Reach,
    codec: HeaderCodec,
    block: Option<Block>,
    owned: HashMap<u32, Owned>,
    /// Forwarded calls the owner watches: their path and request so far.
    watched: HashMap<u32, (String, BytesMut)>,
    /// Streams the client may still send on (open, not half-closed).
    open: HashSet<u32>,
    last_stream: u32,
    /// With no upstream: the last stream answered before the GOAWAY.
    drained: Option<u32>,
    upstream: PathBuf,
    out: BytesMut,
    to_client: mpsc::UnboundedSender<ToClient>,
    flow: Arc<Mutex<Flow>>,
}

impl ClientSide {
    fn new(
        owner: Arc<dyn Owner>,
        reach: Reach,
        to_client: mpsc::UnboundedSender<ToClient>,
        flow: Arc<Mutex<Flow>>,
    ) -> ClientSide {
        ClientSide {
            owner,
            reach,
            codec: HeaderCodec::default(),
            block: None,
            owned: HashMap::new(),
            watched: HashMap::new(),
            open: HashSet::new(),
            last_stream: 0,
            drained: None,
            upstream: PathBuf::new(),
            out: BytesMut::with_capacity(32 << 10),
            to_client,
            flow,
        }
    }

    async fn run(
        mut self,
        crd: OwnedReadHalf,
        mut uwr: Option<OwnedWriteHalf>,
        table: mpsc::UnboundedReceiver<ToUpstream>,
    ) -> Result<(), frame::Error> {
        let result = self.pump(crd, &mut uwr, table).await;
        if let Err(frame::Error::Connection { reason, what }) = &result {
            self.client(ToClient::GoAway(*reason, what.clone()));
        }
        for o in self.owned.values_mut() {
            if let Some(t) = o.task.take() {
                t.abort();
            }
        }
        if let Some(mut w) = uwr {
            let _ = w.shutdown().await;
        }
        result
    }

    /// Until the client closes, breaks the protocol, or the upstream side ends.
    async fn pump(
        &mut self,
        mut crd: OwnedReadHalf,
        uwr: &mut Option<OwnedWriteHalf>,
        mut table: mpsc::UnboundedReceiver<ToUpstream>,
    ) -> Result<(), frame::Error> {
        let mut reader = frame::Reader::new(true);
        let mut read_at = None;
        loop {
            let mut last = false;
            tokio::select! {
                n = crd.read_buf(reader.buf()) => {
                    if n? == 0 {
                        return Ok(());
                    }
                    read_at = Some(Instant::now());
                    reader.max = lock(&self.flow).upstream_max_frame.max(frame::MAX_FRAME);
                    let preface = reader.take_preface()?;
                    self.out.extend_from_slice(&preface);
                    while let Some(f) = reader.next()? {
                        self.on_frame(f)?;
                    }
                }
                m = table.recv() => match m {
                    Some(m) => last = self.on_message(m),
                    None => return Ok(()),
                },
            }
            if let Some(w) = uwr.as_mut().filter(|_| !self.out.is_empty()) {
                w.write_all(&self.out).await?;
                if let Some(t) = read_at.take() {
                    crate::metrics::get().relay_hop(true, t.elapsed());
                }
            }
            self.out.clear();
            if last {
                return Ok(());
            }
        }
    }

    /// A message from the upstream side; true if the connection ends with it.
    fn on_message(&mut self, m: ToUpstream) -> bool {
        match m {
            ToUpstream::TableSize(n) => self.codec.receiver_table_size(n),
            ToUpstream::Credit(n) => frame::put_window_update(&mut self.out, 0, n),
            ToUpstream::Pong(data) => {
                frame::put_frame(&mut self.out, frame::PING, frame::ACK, 0, &data)
            }
            ToUpstream::Closed(stream) => drop(self.open.remove(&stream)),
            ToUpstream::Refused(last) => {
                let refused: Vec<u32> = self.owned.keys().filter(|s| **s > last).copied().collect();
                for s in refused {
                    self.open.remove(&s);
                    self.forget(s);
                }
            }
            ToUpstream::GoAway(reason, what) => {
                frame::put_goaway(&mut self.out, 0, reason, &what);
                return true;
            }
        }
        false
    }

    fn on_frame(&mut self, f: Frame) -> Result<(), frame::Error> {
        f.check()?;
        inside_block(&self.block, &f)?;
        let owned = f.stream != 0 && self.owned.contains_key(&f.stream);
        match f.kind {
            frame::HEADERS | frame::CONTINUATION => {
                if let Some(b) = Block::collect(&mut self.block, &f)? {
                    self.on_block(b)?;
                }
            }
            frame::DATA => self.on_data(&f)?,
            frame::RST_STREAM => {
                self.not_idle(&f)?;
                self.open.remove(&f.stream);
                self.forget(f.stream);
                if !owned {
                    self.out.extend_from_slice(&f.raw);
                }
            }
            frame::WINDOW_UPDATE if f.stream == 0 => self.on_window_update(&f)?,
            frame::WINDOW_UPDATE => {
                self.not_idle(&f)?;
                if f.window_increment() == 0 {
                    self.reset(f.stream, Reason::Protocol);
                } else if !owned {
                    self.out.extend_from_slice(&f.raw);
                }
            }
            // RFC 9113 §6.3: a stream error.
            frame::PRIORITY if f.payload.len() != 5 => self.reset(f.stream, Reason::FrameSize),
            frame::PRIORITY if owned => {}
            frame::SETTINGS => self.on_settings(&f),
            // Answered here, never forwarded (see the module's notes). The relay
            // sends no PING of its own, so an ACK answers nothing.
            frame::PING if !f.has(frame::ACK) => {
                let mut b = BytesMut::new();
                frame::put_frame(&mut b, frame::PING, frame::ACK, 0, &f.payload);
                self.client(ToClient::Frames(b.freeze()));
            }
            frame::PUSH_PROMISE => {
                return Err(frame::error(Reason::Protocol, "PUSH_PROMISE from a client"))
            }
            frame::PRIORITY | frame::GOAWAY => self.out.extend_from_slice(&f.raw),
            // Unknown types are ignored (RFC 9113 §5.5).
            _ => {}
        }
        Ok(())
    }

    /// RFC 9113 §5.1: on a stream never opened, only HEADERS and PRIORITY.
    fn not_idle(&self, f: &Frame) -> Result<(), frame::Error> {
        if f.stream > self.last_stream {
            return Err(frame::error(
                Reason::Protocol,
                format!("frame of type {} on idle stream {}", f.kind, f.stream),
            ));
        }
        Ok(())
    }

    fn on_data(&mut self, f: &Frame) -> Result<(), frame::Error> {
        if !self.open.contains(&f.stream) {
            self.not_idle(f)?;
            // Half-closed or closed (RFC 9113 §5.1): the stream's error. Its
            // bytes go nowhere, so their connection credit comes back from us.
            self.give_back(f.stream, f.payload.len(), false);
            self.reset(f.stream, Reason::StreamClosed);
            return Ok(());
        }
        if f.has(frame::END_STREAM) {
            self.open.remove(&f.stream);
        }
        if self.owned.contains_key(&f.stream) {
            self.on_owned_data(f)?;
        } else {
            if self.watched.contains_key(&f.stream) {
                self.on_watched_data(f)?;
            }
            self.out.extend_from_slice(&f.raw);
        }
        Ok(())
    }

    /// A stream error the relay finds itself: the client's stream is reset, and
    /// so is the upstream's, or the shim's own call stopped.
    fn reset(&mut self, stream: u32, reason: Reason) {
        let mut b = BytesMut::new();
        frame::put_rst_stream(&mut b, stream, reason);
        self.client(ToClient::Frames(b.freeze()));
        self.open.remove(&stream);
        if !self.owned.contains_key(&stream) {
            frame::put_rst_stream(&mut self.out, stream, Reason::Cancel);
        }
        self.forget(stream);
    }

    /// Drops what is kept for a stream that ended without its answer.
    fn forget(&mut self, stream: u32) {
        if let Some(t) = self.owned.remove(&stream).and_then(|o| o.task) {
            t.abort();
        }
        self.watched.remove(&stream);
        let method = {
            let mut flow = lock(&self.flow);
            flow.amends.remove(&stream);
            flow.calls.remove(&stream)
        };
        if let Some(method) = method {
            crate::metrics::get().forwarded(method, tonic::Code::Cancelled as i32);
        }
    }

    /// Connection (and, while the stream is open, stream) credit for `len`
    /// bytes of DATA from the client that the upstream never sees.
    fn give_back(&self, stream: u32, len: usize, stream_too: bool) {
        if len == 0 {
            return;
        }
        let mut b = BytesMut::new();
        frame::put_window_update(&mut b, 0, len as u32);
        if stream_too {
            frame::put_window_update(&mut b, stream, len as u32);
        }
        self.client(ToClient::Frames(b.freeze()));
    }

    fn on_block(&mut self, b: Block) -> Result<(), frame::Error> {
        // Decoded first, whatever becomes of it: the HPACK context must follow.
        let mut fields = b.decode(&mut self.codec)?;
        if b.stream & 1 == 0 {
            return Err(frame::error(
                Reason::Protocol,
                "even stream id from a client",
            ));
        }
        if b.stream > self.last_stream {
            return self.on_request(b, fields);
        }
        if !self.open.contains(&b.stream) {
            self.reset(b.stream, Reason::StreamClosed);
            return Ok(());
        }
        if !b.ends_stream() {
            // A second header block that is not trailers (RFC 9113 §8.1).
            self.reset(b.stream, Reason::Protocol);
            return Ok(());
        }
        self.open.remove(&b.stream);
        if let Some(o) = self.owned.get(&b.stream) {
            // Trailers on an owned call: nothing in them is used.
            if o.task.is_none() && !o.refused {
                self.dispatch(b.stream);
            }
            return Ok(());
        }
        headers::fix_authority(&mut fields);
        b.put(&mut self.codec, &mut self.out, &fields);
        Ok(())
    }

    /// A new stream: taken out for the owner, or forwarded.
    fn on_request(&mut self, b: Block, mut fields: Fields) -> Result<(), frame::Error> {
        self.last_stream = b.stream;
        lock(&self.flow).last_stream = b.stream;
        if !b.ends_stream() {
            self.open.insert(b.stream);
        }
        if let Reach::Unreachable(_) = self.reach {
            if self.drained.is_some() {
                // Opened before the client saw the GOAWAY: it retries it elsewhere.
                self.open.remove(&b.stream);
                let mut out = BytesMut::new();
                frame::put_rst_stream(&mut out, b.stream, Reason::RefusedStream);
                self.client(ToClient::Frames(out.freeze()));
                return Ok(());
            }
            // A client reconnects as soon as its connection ends, so this one
            // may have come while the upstream restarted. If it is back, the
            // GOAWAY names no stream: the call counts as never processed, and
            // grpc-go and C-core send it again on a new connection, relayed.
            let back = std::os::unix::net::UnixStream::connect(&self.upstream).is_ok();
            let last = if back { 0 } else { b.stream };
            self.drained = Some(last);
            self.client(ToClient::Drain(last));
            if back {
                self.open.remove(&b.stream);
                return Ok(());
            }
        }
        let path = String::from_utf8_lossy(headers::get(&fields, ":path").unwrap_or_default());
        if self.owner.owns(&path) || matches!(self.reach, Reach::Unreachable(_)) {
            let o = Owned {
                path: path.into_owned(),
                metadata: headers::to_http(&fields),
                body: BytesMut::new(),
                task: None,
                refused: false,
            };
            self.owned.insert(b.stream, o);
            if b.ends_stream() {
                self.dispatch(b.stream);
            }
            return Ok(());
        }
        let label = crate::metrics::get().method_label(&path);
        lock(&self.flow).calls.insert(b.stream, label);
        if self.owner.watches(&path) {
            self.watched
                .insert(b.stream, (path.into_owned(), BytesMut::new()));
        }
        headers::fix_authority(&mut fields);
        b.put(&mut self.codec, &mut self.out, &fields);
        Ok(())
    }

    fn on_owned_data(&mut self, f: &Frame) -> Result<(), frame::Error> {
        let (data, flow_len) = f.data()?;
        // These bytes never reach the upstream, so its credit never comes back:
        // give it back ourselves, for the connection and the stream.
        self.give_back(f.stream, flow_len, !f.has(frame::END_STREAM));
        let o = self
            .owned
            .get_mut(&f.stream)
            .expect("checked by the caller");
        if o.task.is_some() || o.refused {
            return Ok(());
        }
        if o.body.len() + data.len() > MAX_CALL {
            // Answered now; what else comes on the stream is dropped.
            o.refused = true;
            o.body = BytesMut::new();
            let s = tonic::Status::resource_exhausted("request too large for ckpt-shim");
            self.client(ToClient::Reply(f.stream, Reply::status(s), None));
            return Ok(());
        }
        o.body.extend_from_slice(data);
        if f.has(frame::END_STREAM) {
            self.dispatch(f.stream);
        }
        Ok(())
    }

    /// Collects a watched call's request; once whole, asks how to amend its reply
    /// (before the last of it goes upstream, so the reply cannot come first).
    fn on_watched_data(&mut self, f: &Frame) -> Result<(), frame::Error> {
        let (data, _) = f.data()?;
        let (_, body) = self
            .watched
            .get_mut(&f.stream)
            .expect("checked by the caller");
        body.extend_from_slice(data);
        if body.len() > MAX_CALL {
            self.watched.remove(&f.stream);
        } else if f.has(frame::END_STREAM) {
            let (path, body) = self.watched.remove(&f.stream).expect("present");
            let amend = crate::pbwire::grpc_message(&body).and_then(|m| self.owner.amend(&path, m));
            if let Some(a) = amend {
                lock(&self.flow).amends.insert(f.stream, a);
            }
        }
        Ok(())
    }

    /// The whole request of an owned call is in: answer it.
    fn dispatch(&mut self, stream: u32) {
        self.owned.retain(|id, o| {
            let finished = o.task.as_ref().is_some_and(|t| t.is_finished())
                || (o.refused && !self.open.contains(id));
            !finished
        });
        let Some(o) = self.owned.get_mut(&stream) else {
            return;
        };
        let to_client = self.to_client.clone();
        let reply: ReplyFuture = match &self.reach {
            Reach::Unreachable(why) if !self.owner.owns(&o.path) => {
                let r = Reply::status(tonic::Status::unavailable(why.clone()));
                Box::pin(async move { r })
            }
            _ => self.owner.clone().call(Call {
                path: o.path.clone(),
                metadata: std::mem::take(&mut o.metadata),
                body: std::mem::take(&mut o.body).freeze(),
            }),
        };
        let hold = self.owner.hold();
        let running = crate::metrics::get().own_call();
        o.task = Some(tokio::spawn(async move {
            let reply = reply.await;
            drop(running);
            let _ = to_client.send(ToClient::Reply(stream, reply, hold));
        }));
    }

    /// Connection credit from the client: what covers our own replies' bytes is
    /// kept back from the upstream, which never sent them.
    fn on_window_update(&mut self, f: &Frame) -> Result<(), frame::Error> {
        let inc = f.window_increment();
        let (forward, wake) = {
            let mut flow = lock(&self.flow);
            let window = flow.window();
            if *window + inc as i64 > frame::MAX_WINDOW {
                return Err(frame::error(Reason::FlowControl, "window over 2^31-1"));
            }
            *window += inc as i64;
            let pay = flow.debt.min(inc as u64);
            flow.debt -= pay;
            (inc - pay as u32, flow.waiting > 0)
        };
        if wake {
            self.client(ToClient::Wake);
        }
        if forward == inc {
            self.out.extend_from_slice(&f.raw);
        } else if forward > 0 {
            frame::put_window_update(&mut self.out, 0, forward);
        }
        Ok(())
    }

    fn on_settings(&mut self, f: &Frame) {
        if !f.has(frame::ACK) {
            for (id, v) in f.settings() {
                match id {
                    frame::SETTINGS_HEADER_TABLE_SIZE => self.client(ToClient::TableSize(v)),
                    frame::SETTINGS_MAX_FRAME_SIZE => {
                        lock(&self.flow).client_max_frame = v as usize
                    }
                    _ => {}
                }
            }
        }
        if let Reach::Unreachable(_) = self.reach {
            // With no upstream the relay is the client's server.
            if !f.has(frame::ACK) {
                let mut b = BytesMut::new();
                frame::put_frame(&mut b, frame::SETTINGS, frame::ACK, 0, &[]);
                self.client(ToClient::Frames(b.freeze()));
            }
            return;
        }
        self.out.extend_from_slice(&f.raw);
    }

    fn client(&self, m: ToClient) {
        let _ = self.to_client.send(m);
    }
}

/// How the upstream side ended.
enum End {
    /// The client side is gone: nothing more to tell the client.
    Quiet,
    /// GOAWAY to the client with this code: the upstream closed or broke the
    /// protocol, or the client did.
    GoAway(Reason, String),
}

/// Reads the upstream, forwards to the client, and writes the shim's replies.
struct UpstreamSide {
    codec: HeaderCodec,
    block: Option<Block>,
    waiting: Vec<(u32, Reply, Option<TaskTrackerToken>)>,
    /// Held until the replies in `out` are written.
    written: Vec<TaskTrackerToken>,
    /// Replies being amended: the change, the bytes so far, their flow length.
    amending: HashMap<u32, (Amend, BytesMut, usize)>,
    /// The last stream of the upstream's GOAWAY, if it sent one: no GOAWAY to
    /// the client may name a higher one.
    goaway: Option<u32>,
    out: BytesMut,
    flow: Arc<Mutex<Flow>>,
}

impl UpstreamSide {
    fn new(flow: Arc<Mutex<Flow>>) -> UpstreamSide {
        UpstreamSide {
            codec: HeaderCodec::default(),
            block: None,
            waiting: Vec::new(),
            written: Vec::new(),
            amending: HashMap::new(),
            goaway: None,
            out: BytesMut::with_capacity(32 << 10),
            flow,
        }
    }

    async fn run(
        mut self,
        urd: Option<OwnedReadHalf>,
        mut cwr: OwnedWriteHalf,
        msgs: mpsc::UnboundedReceiver<ToClient>,
        to_upstream: mpsc::UnboundedSender<ToUpstream>,
    ) -> Result<(), frame::Error> {
        let end = self.pump(urd, &mut cwr, msgs, &to_upstream).await;
        let result = match end {
            Ok(End::Quiet) => Ok(()),
            Ok(End::GoAway(reason, what)) => {
                self.goaway_client(reason, &what);
                Ok(())
            }
            Err(frame::Error::Connection { reason, what }) => {
                // The upstream's fault: it hears why, the client that its
                // runtime is gone.
                let _ = to_upstream.send(ToUpstream::GoAway(reason, what.clone()));
                self.goaway_client(Reason::Internal, "upstream runtime broke the protocol");
                Err(frame::error(reason, what))
            }
            Err(e) => {
                self.goaway_client(Reason::NoError, "upstream runtime connection failed");
                Err(e)
            }
        };
        let _ = cwr.write_all(&self.out).await;
        let _ = cwr.shutdown().await;
        result
    }

    /// GOAWAY to the client: the streams it opened up to the last one the
    /// upstream still processes end when the connection closes (grpc-go and
    /// C-core fail them UNAVAILABLE); later ones it retries elsewhere.
    fn goaway_client(&mut self, reason: Reason, what: &str) {
        let last = lock(&self.flow).last_stream;
        let last = self.goaway.map_or(last, |g| g.min(last));
        frame::put_goaway(&mut self.out, last, reason, what);
    }

    async fn pump(
        &mut self,
        mut urd: Option<OwnedReadHalf>,
        cwr: &mut OwnedWriteHalf,
        mut msgs: mpsc::UnboundedReceiver<ToClient>,
        to_upstream: &mpsc::UnboundedSender<ToUpstream>,
    ) -> Result<End, frame::Error> {
        let mut reader = frame::Reader::new(false);
        let mut read_at = None;
        if urd.is_none() {
            // With no upstream the relay is the client's server: its SETTINGS first.
            frame::put_frame(&mut self.out, frame::SETTINGS, 0, 0, &[]);
        }
        loop {
            tokio::select! {
                n = async { urd.as_mut().expect("guarded").read_buf(reader.buf()).await }, if urd.is_some() => {
                    let n = n.inspect_err(|_| crate::metrics::get().upstream_error("io"))?;
                    if n == 0 {
                        let why = "upstream runtime closed the connection".to_string();
                        return Ok(End::GoAway(Reason::NoError, why));
                    }
                    read_at = Some(Instant::now());
                    reader.max = lock(&self.flow).client_max_frame.max(frame::MAX_FRAME);
                    while let Some(f) = reader.next()? {
                        self.on_frame(f, to_upstream)?;
                    }
                }
                m = msgs.recv() => match m {
                    Some(ToClient::GoAway(reason, what)) => return Ok(End::GoAway(reason, what)),
                    Some(m) => self.on_message(m),
                    None => return Ok(End::Quiet),
                },
            }
            if !self.out.is_empty() {
                cwr.write_all(&self.out).await?;
                self.out.clear();
                self.written.clear();
                if let Some(t) = read_at.take() {
                    crate::metrics::get().relay_hop(false, t.elapsed());
                }
            }
        }
    }

    fn on_frame(
        &mut self,
        f: Frame,
        to_upstream: &mpsc::UnboundedSender<ToUpstream>,
    ) -> Result<(), frame::Error> {
        f.check()?;
        inside_block(&self.block, &f)?;
        match f.kind {
            frame::HEADERS | frame::CONTINUATION => {
                if let Some(b) = Block::collect(&mut self.block, &f)? {
                    self.on_block(b, to_upstream)?;
                }
                return Ok(());
            }
            frame::DATA if self.amends(f.stream) => return self.amend_data(&f, to_upstream),
            frame::DATA => {
                let mut flow = lock(&self.flow);
                *flow.window() -= f.payload.len() as i64;
            }
            frame::RST_STREAM => {
                self.amending.remove(&f.stream);
                lock(&self.flow).amends.remove(&f.stream);
                self.answered(f.stream, reset_code(&f));
                let _ = to_upstream.send(ToUpstream::Closed(f.stream));
            }
            frame::SETTINGS if !f.has(frame::ACK) => self.on_settings(&f, to_upstream),
            // As on the client's side: answered here, never forwarded.
            frame::PING => {
                if !f.has(frame::ACK) {
                    let _ = to_upstream.send(ToUpstream::Pong(f.payload.clone()));
                }
                return Ok(());
            }
            frame::GOAWAY => {
                let last = f.last_stream().expect("checked: 8 bytes or more");
                self.goaway = Some(self.goaway.map_or(last, |g| g.min(last)));
                let _ = to_upstream.send(ToUpstream::Refused(last));
            }
            // Its header block would need a context the relay does not keep for
            // it; gRPC servers never push.
            frame::PUSH_PROMISE => {
                return Err(frame::error(
                    Reason::Protocol,
                    "PUSH_PROMISE from the upstream",
                ))
            }
            frame::PRIORITY | frame::SETTINGS | frame::WINDOW_UPDATE => {}
            // Unknown types are ignored (RFC 9113 §5.5).
            _ => return Ok(()),
        }
        self.out.extend_from_slice(&f.raw);
        Ok(())
    }

    fn on_block(
        &mut self,
        b: Block,
        to_upstream: &mpsc::UnboundedSender<ToUpstream>,
    ) -> Result<(), frame::Error> {
        let fields = b.decode(&mut self.codec)?;
        if b.ends_stream() {
            self.finish_amending(b.stream, false, to_upstream);
            let code = headers::get(&fields, "grpc-status")
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
            self.answered(b.stream, code.unwrap_or(tonic::Code::Unknown as i32));
        }
        b.put(&mut self.codec, &mut self.out, &fields);
        Ok(())
    }

    fn on_settings(&mut self, f: &Frame, to_upstream: &mpsc::UnboundedSender<ToUpstream>) {
        for (id, v) in f.settings() {
            match id {
                frame::SETTINGS_HEADER_TABLE_SIZE => {
                    let _ = to_upstream.send(ToUpstream::TableSize(v));
                }
                frame::SETTINGS_MAX_FRAME_SIZE => lock(&self.flow).upstream_max_frame = v as usize,
                _ => {}
            }
        }
    }
    /// Counts a forwarded call's answer (grpc-status `code`) in the metrics.
    fn answered(&self, stream: u32, code: i32) {
        let method = lock(&self.flow).calls.remove(&stream);
        if let Some(m) = method {
            crate::metrics::get().forwarded(m, code);
        }
    }

    /// Whether `stream`'s reply is to be amended; takes the change on first sight.
    fn amends(&mut self, stream: u32) -> bool {
        if self.amending.contains_key(&stream) {
            return true;
        }
        let a = lock(&self.flow).amends.remove(&stream);
        a.map(|a| self.amending.insert(stream, (a, BytesMut::new(), 0)))
            .is_some()
    }

    /// Holds a reply's bytes until its message is whole, then amends it.
    fn amend_data(
        &mut self,
        f: &Frame,
        to_upstream: &mpsc::UnboundedSender<ToUpstream>,
    ) -> Result<(), frame::Error> {
        let (data, flow_len) = f.data()?;
        let (_, buf, consumed) = self
            .amending
            .get_mut(&f.stream)
            .expect("checked by the caller");
        buf.extend_from_slice(data);
        *consumed += flow_len;
        let whole = buf.len() >= 5
            && buf.len() >= 5 + u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
        if whole || f.has(frame::END_STREAM) {
            self.finish_amending(f.stream, f.has(frame::END_STREAM), to_upstream);
        }
        Ok(())
    }

    /// Writes what was held for `stream`, amended if it is one whole
    /// uncompressed message (the change applies to nothing else), and settles
    /// the windows for the difference.
    fn finish_amending(
        &mut self,
        stream: u32,
        end: bool,
        to_upstream: &mpsc::UnboundedSender<ToUpstream>,
    ) {
        let Some((amend, buf, consumed)) = self.amending.remove(&stream) else {
            return;
        };
        let out = match crate::pbwire::grpc_message(&buf) {
            Some(msg) => crate::pbwire::grpc_frame(&amend(msg)),
            None => buf.to_vec(),
        };
        frame::put_data(&mut self.out, stream, &out, end);
        let mut flow = lock(&self.flow);
        *flow.window() -= out.len() as i64;
        match out.len().checked_sub(consumed) {
            Some(more) => flow.debt += more as u64,
            None => drop(to_upstream.send(ToUpstream::Credit((consumed - out.len()) as u32))),
        }
    }

    fn on_message(&mut self, m: ToClient) {
        match m {
            ToClient::Frames(b) => self.out.extend_from_slice(&b),
            ToClient::TableSize(n) => self.codec.receiver_table_size(n),
            ToClient::Reply(stream, r, hold) => self.waiting.push((stream, r, hold)),
            ToClient::Drain(last) => {
                self.goaway = Some(self.goaway.map_or(last, |g| g.min(last)));
                let why = "ckpt-shim: upstream runtime unreachable";
                frame::put_goaway(&mut self.out, last, Reason::NoError, why);
            }
            // Taken by the loop before it comes here.
            ToClient::Wake | ToClient::GoAway(..) => {}
        }
        self.write_replies();
    }

    /// Writes the replies the client's window has room for, in order.
    fn write_replies(&mut self) {
        let mut flow = lock(&self.flow);
        while let Some((_, r, _)) = self.waiting.first() {
            let len = r.body.len() as i64;
            if len > *flow.window() {
                break;
            }
            *flow.window() -= len;
            flow.debt += len as u64;
            let (stream, r, hold) = self.waiting.remove(0);
            self.written.extend(hold);
            put_reply(&mut self.codec, &mut self.out, stream, r);
        }
        flow.waiting = self.waiting.len();
    }
}

/// The gRPC code a client reports for a stream the server reset, as grpc-go
/// maps them: CANCEL is CANCELLED, REFUSED_STREAM is UNAVAILABLE, the rest INTERNAL.
fn reset_code(f: &Frame) -> i32 {
    match f.code() {
        Some(0x8) => tonic::Code::Cancelled as i32,
        Some(0x7) => tonic::Code::Unavailable as i32,
        _ => tonic::Code::Internal as i32,
    }
}

fn put_reply(codec: &mut HeaderCodec, out: &mut BytesMut, stream: u32, r: Reply) {
    let head: Fields = headers::from_http(Some(http::StatusCode::OK), &r.headers);
    let trailers_only = r.body.is_empty() && r.trailers.is_none();
    codec.put(out, stream, &head, trailers_only, None);
    if trailers_only {
        return;
    }
    let trailers = r.trailers.unwrap_or_default();
    if !r.body.is_empty() {
        frame::put_data(out, stream, &r.body, false);
    }
    codec.put(
        out,
        stream,
        &headers::from_http(None, &trailers),
        true,
        None,
    );
}
