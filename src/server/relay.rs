//! The proxy: each client connection is relayed, frame by frame, over a
//! connection of its own to the upstream runtime. SETTINGS, flow control,
//! PING and GOAWAY are the two peers' own; message bytes pass unchanged, so
//! fields this shim does not know survive and streaming methods work; header
//! blocks are decoded, and passed on as they came or re-encoded
//! ([`super::headers`]), which is where an `:authority` no server should have
//! to take is made valid.
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
//! Each frame is checked as it passes (RFC 9113 §4-§6: lengths, stream 0
//! rules, padding, SETTINGS values, the SETTINGS_MAX_FRAME_SIZE the receiving
//! peer announced, window overflow, frames inside a header block, frames on
//! idle or closed streams). A connection error ends the connection with a
//! GOAWAY carrying the RFC's code to the peer at fault; a stream error resets
//! that stream on both sides. When the upstream closes (containerd restarted)
//! or fails, the client gets GOAWAY(NO_ERROR) and the close, so its calls fail
//! UNAVAILABLE at once and it reconnects; the shim's own calls on the
//! connection are stopped. The upstream's GOAWAY passes on unchanged, and
//! stops the shim's own calls above its last stream, which the client retries.
//!
//! Relaying frames costs one read and one write per batch and direction. A
//! full HTTP/2 server and client per call (hyper) cost about four times as much
//! CPU on this project's VM, which is why the forwarding path is this one.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::frame::{self, Frame, Reason};
use super::headers::{self, Fields};

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

    /// The answer's gRPC status, with its message.
    pub fn grpc_status(&self) -> tonic::Status {
        self.trailers
            .as_ref()
            .and_then(tonic::Status::from_header_map)
            .or_else(|| tonic::Status::from_header_map(&self.headers))
            .unwrap_or_else(|| tonic::Status::new(self.code(), "no grpc-status"))
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
/// While this much waits to be written to one side, the other is not read.
const BACKLOG: usize = 1 << 20;
/// While this much waits for the client, the client is not read either: what
/// the relay answers itself (PING ACKs, credit) must not pile up unbounded
/// behind a client that sends and never reads.
const CLIENT_BACKLOG: usize = 4 * BACKLOG;

/// Relays one client connection until either side closes it.
pub async fn relay(client: UnixStream, upstream: &Path, owner: Arc<dyn Owner>) {
    let _counted = crate::metrics::get().relay_connection();
    let up = match UnixStream::connect(upstream).await {
        Ok(u) => Some(u),
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
    let (replies, replies_rx) = mpsc::unbounded_channel();
    let mut r = Relay::new(owner, reach, replies);
    r.upstream = upstream.to_path_buf();
    let (result, mut relay) = r.run(client, up, replies_rx).await;
    // The shim's own calls on the connection stop with it (a checkpoint's
    // dropped future thaws and cleans up, as on any failure).
    for o in relay.owned.values_mut() {
        if let Some(t) = o.task.take() {
            t.abort();
        }
    }
    if let Err(e) = result {
        tracing::debug!("connection ended: {e}");
    }
}

/// Whether calls can be forwarded, or why not.
enum Reach {
    Upstream,
    Unreachable(String),
}

/// A reply to an owned call, from the task that answered it, with what keeps a
/// stopping server waiting until it is written.
type Answered = (u32, Reply, Option<TaskTrackerToken>);

/// How a connection ended, and what each side is told.
enum End {
    /// The client closed: nothing more to tell it.
    ClientClosed,
    /// The client broke the protocol: it gets GOAWAY with this code.
    Client(frame::Error),
    /// The upstream closed or failed: the client gets GOAWAY(NO_ERROR), so
    /// grpc-go and C-core fail its calls UNAVAILABLE and reconnect.
    UpstreamGone(String),
    /// The upstream broke the protocol: it hears why, the client that its
    /// runtime is gone (INTERNAL_ERROR).
    Upstream(frame::Error),
}

/// A header block being collected from HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as they came, to pass on unchanged.
    raw: Vec<Bytes>,
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
                    raw: Vec::with_capacity(1),
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
        b.raw.push(f.raw.clone());
        Ok(if f.has(frame::END_HEADERS) {
            slot.take()
        } else {
            None
        })
    }

    fn ends_stream(&self) -> bool {
        self.flags & frame::END_STREAM != 0
    }

    /// Passes the block on as it came.
    fn pass(&self, out: &mut BytesMut) {
        for f in &self.raw {
            out.extend_from_slice(f);
        }
    }
}

/// An HPACK error leaves the two contexts apart: a connection error.
fn compression(e: std::io::Error) -> frame::Error {
    frame::error(Reason::Compression, e.to_string())
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

/// One client connection and its upstream connection, both directions in one
/// task: a batch read from one side is handled and written to the other
/// without a hop to another task or thread, and what the relay answers itself
/// (PINGs, window credit, resets, GOAWAY) goes straight into the outgoing buffer.
struct Relay {
    owner: Arc<dyn Owner>,
    reach: Reach,
    /// The upstream's socket: with none reached, whether it is back.
    upstream: PathBuf,
    /// Client to upstream: the client's HPACK context, the block being read.
    requests: headers::Requests,
    client_block: Option<Block>,
    owned: HashMap<u32, Owned>,
    /// Forwarded calls the owner watches: their path and request so far.
    watched: HashMap<u32, (String, BytesMut)>,
    /// Streams the client may still send on (open, not half-closed).
    open: HashSet<u32>,
    /// The highest stream the client opened: what a GOAWAY to it names.
    last_stream: u32,
    /// The last stream a GOAWAY to the client named (the upstream's, forwarded,
    /// or the relay's own with no upstream): none later may name a higher one.
    goaway: Option<u32>,
    /// Forwarded calls' method labels, until their answer is counted.
    calls: HashMap<u32, String>,
    /// Replies to amend, from the request's end until the reply's first DATA.
    amends: HashMap<u32, Amend>,
    /// Upstream to client: the upstream's context (its blocks pass unchanged,
    /// read on the way), and the encoder for the shim's own replies, which
    /// leaves the client's table alone.
    decoder: headers::Decoder,
    encoder: headers::Encoder,
    upstream_block: Option<Block>,
    /// Replies being amended: the change, the bytes so far, their flow length.
    amending: HashMap<u32, (Amend, BytesMut, usize)>,
    /// Replies to owned calls waiting for the client's window.
    waiting: Vec<Answered>,
    /// Held until the replies in `to_client` are written.
    written: Vec<TaskTrackerToken>,
    /// What the client can still receive (RFC 9113 §6.9.2: starts at 65535).
    window: i64,
    /// Bytes the relay sent the client that the upstream does not know of.
    debt: u64,
    /// SETTINGS_MAX_FRAME_SIZE as each peer announced it: the largest frame
    /// the other may send through the relay (index: the side it limits).
    max_frame: [usize; 2],
    to_upstream: BytesMut,
    to_client: BytesMut,
    /// When the batch now in `to_upstream` / `to_client` was read (metrics).
    read_at: [Option<Instant>; 2],
    replies: mpsc::UnboundedSender<Answered>,
}

/// Index into `Relay::read_at` and `Relay::max_frame`: the side written to.
const TO_UPSTREAM: usize = 0;
const TO_CLIENT: usize = 1;

/// The client's connection and the upstream's, split into halves; the
/// upstream's are `None` where the relay answers the client itself.
struct Sides {
    crd: OwnedReadHalf,
    cwr: OwnedWriteHalf,
    urd: Option<OwnedReadHalf>,
    uwr: Option<OwnedWriteHalf>,
}

/// Reads a batch from `half` if there is one.
async fn read_from(half: &mut Option<OwnedReadHalf>, buf: &mut BytesMut) -> std::io::Result<usize> {
    half.as_mut().expect("guarded").read_buf(buf).await
}

/// Writes what it can of `buf` to `half`.
async fn write_to(half: &mut Option<OwnedWriteHalf>, buf: &[u8]) -> std::io::Result<usize> {
    half.as_mut().expect("guarded").write(buf).await
}

impl Relay {
    fn new(owner: Arc<dyn Owner>, reach: Reach, replies: mpsc::UnboundedSender<Answered>) -> Relay {
        // The client's preface goes first, before anything the relay answers
        // the upstream itself (a PING ACK) can: the upstream may speak before
        // the client has.
        let mut to_upstream = BytesMut::with_capacity(32 << 10);
        if let Reach::Upstream = reach {
            to_upstream.extend_from_slice(frame::PREFACE);
        }
        Relay {
            owner,
            reach,
            upstream: PathBuf::new(),
            requests: headers::Requests::default(),
            client_block: None,
            owned: HashMap::new(),
            watched: HashMap::new(),
            open: HashSet::new(),
            last_stream: 0,
            goaway: None,
            calls: HashMap::new(),
            amends: HashMap::new(),
            decoder: headers::Decoder::default(),
            encoder: headers::Encoder::default(),
            upstream_block: None,
            amending: HashMap::new(),
            waiting: Vec::new(),
            written: Vec::new(),
            window: 65_535,
            debt: 0,
            max_frame: [frame::MAX_FRAME; 2],
            to_upstream,
            to_client: BytesMut::with_capacity(32 << 10),
            read_at: [None; 2],
            replies,
        }
    }

    /// Until either side ends the connection; then tells the sides why, and
    /// writes out what is left before closing both.
    async fn run(
        mut self,
        client: UnixStream,
        upstream: Option<UnixStream>,
        mut answered: mpsc::UnboundedReceiver<Answered>,
    ) -> (Result<(), frame::Error>, Relay) {
        let (crd, cwr) = client.into_split();
        let (urd, uwr) = match upstream.map(|u| u.into_split()) {
            Some((r, w)) => (Some(r), Some(w)),
            None => {
                // With no upstream the relay is the client's server: its SETTINGS first.
                frame::put_frame(&mut self.to_client, frame::SETTINGS, 0, 0, &[]);
                (None, None)
            }
        };
        let mut sides = Sides { crd, cwr, urd, uwr };
        let end = self.relay(&mut sides, &mut answered).await;
        let result = self.tell_the_end(end);
        self.close(sides).await;
        (result, self)
    }

    /// Moves batches between the sides until either ends the connection; how
    /// it ended. Writes come first, so a batch goes out as soon as it is
    /// handled; a side is not read while the other side has not taken what
    /// was already read from it.
    async fn relay(
        &mut self,
        s: &mut Sides,
        answered: &mut mpsc::UnboundedReceiver<Answered>,
    ) -> End {
        let mut from_client = frame::Reader::new(true);
        let mut from_upstream = frame::Reader::new(false);
        loop {
            let read_client =
                self.to_upstream.len() < BACKLOG && self.to_client.len() < CLIENT_BACKLOG;
            let step: Result<(), End> = tokio::select! {
                biased;
                n = s.cwr.write(&self.to_client), if !self.to_client.is_empty() => {
                    n.map(|n| self.wrote(TO_CLIENT, n)).map_err(|_| End::ClientClosed)
                }
                n = write_to(&mut s.uwr, &self.to_upstream), if s.uwr.is_some() && !self.to_upstream.is_empty() => {
                    n.map(|n| self.wrote(TO_UPSTREAM, n)).map_err(upstream_failed)
                }
                n = s.crd.read_buf(from_client.buf()), if read_client => match n {
                    Ok(0) | Err(_) => Err(End::ClientClosed),
                    Ok(_) => self.client_batch(&mut from_client, s.uwr.is_some()).map_err(End::Client),
                },
                n = read_from(&mut s.urd, from_upstream.buf()), if s.urd.is_some() && self.to_client.len() < BACKLOG => match n {
                    Ok(0) => Err(End::UpstreamGone("upstream runtime closed the connection".into())),
                    Err(e) => Err(upstream_failed(e)),
                    Ok(_) => self.upstream_batch(&mut from_upstream).map_err(End::Upstream),
                },
                Some(a) = answered.recv() => {
                    self.waiting.push(a);
                    self.write_replies();
                    Ok(())
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Writes out what was read before the end (a GOAWAY before a close),
    /// for a second at most, and shuts both connections down. (`&mut`: the
    /// relay is not Sync, so a shared borrow across the awaits would keep
    /// its task from moving between threads.)
    async fn close(&mut self, mut s: Sides) {
        let flush = async {
            s.cwr.write_all(&self.to_client).await?;
            if let Some(w) = s.uwr.as_mut() {
                w.write_all(&self.to_upstream).await?;
            }
            std::io::Result::Ok(())
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flush).await;
        let _ = s.cwr.shutdown().await;
        if let Some(w) = s.uwr.as_mut() {
            let _ = w.shutdown().await;
        }
    }

    /// Writes the GOAWAYs an end calls for; the error it ended with.
    fn tell_the_end(&mut self, end: End) -> Result<(), frame::Error> {
        match end {
            End::ClientClosed => Ok(()),
            End::Client(frame::Error::Connection { reason, what }) => {
                frame::put_goaway(&mut self.to_client, self.last_stream, reason, &what);
                Err(frame::error(reason, what))
            }
            End::Client(e) => Err(e),
            End::UpstreamGone(why) => {
                self.goaway_client(Reason::NoError, &why);
                Err(frame::Error::Io(std::io::Error::other(why)))
            }
            End::Upstream(frame::Error::Connection { reason, what }) => {
                frame::put_goaway(&mut self.to_upstream, 0, reason, &what);
                self.goaway_client(Reason::Internal, "upstream runtime broke the protocol");
                Err(frame::error(reason, what))
            }
            End::Upstream(e) => {
                self.goaway_client(Reason::NoError, "upstream runtime connection failed");
                Err(e)
            }
        }
    }

    /// GOAWAY to the client: the streams it opened up to the last one the
    /// upstream still processes end when the connection closes (grpc-go and
    /// C-core fail them UNAVAILABLE); later ones it retries elsewhere.
    fn goaway_client(&mut self, reason: Reason, what: &str) {
        let last = self
            .goaway
            .map_or(self.last_stream, |g| g.min(self.last_stream));
        frame::put_goaway(&mut self.to_client, last, reason, what);
    }

    /// `n` bytes of the buffer toward `side` were written.
    fn wrote(&mut self, side: usize, n: usize) {
        let buf = match side {
            TO_UPSTREAM => &mut self.to_upstream,
            _ => &mut self.to_client,
        };
        buf.advance(n);
        if !buf.is_empty() {
            return;
        }
        // A BytesMut emptied by advancing keeps its allocation for the next batch.
        buf.clear();
        if side == TO_CLIENT {
            self.written.clear();
        }
        if let Some(t) = self.read_at[side].take() {
            crate::metrics::get().relay_hop(side == TO_UPSTREAM, t.elapsed());
        }
    }

    /// Handles a batch read from the client. `forwarding`: whether there is an
    /// upstream to write to (else what would go there is dropped).
    fn client_batch(
        &mut self,
        reader: &mut frame::Reader,
        forwarding: bool,
    ) -> Result<(), frame::Error> {
        self.read_at[TO_UPSTREAM].get_or_insert_with(Instant::now);
        // Checked here; the upstream was sent the preface at the start.
        reader.take_preface()?;
        loop {
            reader.max = self.max_frame[TO_UPSTREAM];
            let Some(f) = reader.next()? else { break };
            self.on_client_frame(f)?;
        }
        if !forwarding {
            self.to_upstream.clear();
        }
        if self.to_upstream.is_empty() {
            self.read_at[TO_UPSTREAM] = None;
        }
        Ok(())
    }

    /// Handles a batch read from the upstream.
    fn upstream_batch(&mut self, reader: &mut frame::Reader) -> Result<(), frame::Error> {
        self.read_at[TO_CLIENT].get_or_insert_with(Instant::now);
        loop {
            reader.max = self.max_frame[TO_CLIENT];
            let Some(f) = reader.next()? else { break };
            self.on_upstream_frame(f)?;
        }
        if self.to_client.is_empty() {
            self.read_at[TO_CLIENT] = None;
        }
        Ok(())
    }

    /// SETTINGS_MAX_FRAME_SIZE from the peer that receives on `side`: the
    /// largest frame the other peer may now send it through the relay.
    fn read_settings(&mut self, f: &Frame, side: usize) {
        if f.has(frame::ACK) {
            return;
        }
        for (id, v) in f.settings() {
            if id == frame::SETTINGS_MAX_FRAME_SIZE {
                self.max_frame[side] = v as usize;
            }
        }
    }
}

fn upstream_failed(e: std::io::Error) -> End {
    crate::metrics::get().upstream_error("io");
    End::Upstream(frame::Error::Io(e))
}

/// Client to upstream.
impl Relay {
    fn on_client_frame(&mut self, f: Frame) -> Result<(), frame::Error> {
        f.check()?;
        inside_block(&self.client_block, &f)?;
        let owned = f.stream != 0 && self.owned.contains_key(&f.stream);
        match f.kind {
            frame::HEADERS | frame::CONTINUATION => {
                if let Some(b) = Block::collect(&mut self.client_block, &f)? {
                    self.on_request_block(b)?;
                }
            }
            frame::DATA => self.on_data(&f)?,
            frame::RST_STREAM => {
                self.not_idle(&f)?;
                self.open.remove(&f.stream);
                self.forget(f.stream);
                if !owned {
                    self.to_upstream.extend_from_slice(&f.raw);
                }
            }
            frame::WINDOW_UPDATE if f.stream == 0 => self.on_window_update(&f)?,
            frame::WINDOW_UPDATE => {
                self.not_idle(&f)?;
                if f.window_increment() == 0 {
                    self.reset(f.stream, Reason::Protocol);
                } else if !owned {
                    self.to_upstream.extend_from_slice(&f.raw);
                }
            }
            // RFC 9113 §6.3: a stream error.
            frame::PRIORITY if f.payload.len() != 5 => self.reset(f.stream, Reason::FrameSize),
            frame::PRIORITY if owned => {}
            frame::SETTINGS => self.on_settings(&f),
            // Answered here, never forwarded (see the module's notes). The relay
            // sends no PING of its own, so an ACK answers nothing.
            frame::PING if !f.has(frame::ACK) => {
                frame::put_frame(&mut self.to_client, frame::PING, frame::ACK, 0, &f.payload);
            }
            frame::PUSH_PROMISE => {
                return Err(frame::error(Reason::Protocol, "PUSH_PROMISE from a client"))
            }
            frame::PRIORITY | frame::GOAWAY => self.to_upstream.extend_from_slice(&f.raw),
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
            self.to_upstream.extend_from_slice(&f.raw);
        }
        Ok(())
    }

    /// A stream error the relay finds itself: the client's stream is reset, and
    /// so is the upstream's, or the shim's own call stopped.
    fn reset(&mut self, stream: u32, reason: Reason) {
        frame::put_rst_stream(&mut self.to_client, stream, reason);
        self.open.remove(&stream);
        if !self.owned.contains_key(&stream) {
            frame::put_rst_stream(&mut self.to_upstream, stream, Reason::Cancel);
        }
        self.forget(stream);
    }

    /// Drops what is kept for a stream that ended without its answer.
    fn forget(&mut self, stream: u32) {
        if let Some(t) = self.owned.remove(&stream).and_then(|o| o.task) {
            t.abort();
        }
        self.watched.remove(&stream);
        self.amends.remove(&stream);
        if let Some(method) = self.calls.remove(&stream) {
            crate::metrics::get().forwarded(method, tonic::Code::Cancelled as i32);
        }
    }

    /// Connection (and, while the stream is open, stream) credit for `len`
    /// bytes of DATA from the client that the upstream never sees.
    fn give_back(&mut self, stream: u32, len: usize, stream_too: bool) {
        if len == 0 {
            return;
        }
        frame::put_window_update(&mut self.to_client, 0, len as u32);
        if stream_too {
            frame::put_window_update(&mut self.to_client, stream, len as u32);
        }
    }

    fn on_request_block(&mut self, mut b: Block) -> Result<(), frame::Error> {
        // Decoded first, whatever becomes of it: the HPACK context must follow.
        let fields = self
            .requests
            .decode(std::mem::take(&mut b.fragment))
            .map_err(compression)?;
        if b.stream & 1 == 0 {
            return Err(frame::error(
                Reason::Protocol,
                "even stream id from a client",
            ));
        }
        if b.stream > self.last_stream {
            return self.on_request(b, fields);
        }
        // Trailers, or a block out of place; not passed on as it came.
        let (open, owned) = (self.open.contains(&b.stream), self.owned.get(&b.stream));
        if !open || !b.ends_stream() || owned.is_some() {
            self.requests.withheld();
        }
        if !open {
            self.reset(b.stream, Reason::StreamClosed);
            return Ok(());
        }
        if !b.ends_stream() {
            // A second header block that is not trailers (RFC 9113 §8.1).
            self.reset(b.stream, Reason::Protocol);
            return Ok(());
        }
        self.open.remove(&b.stream);
        if let Some(o) = owned {
            // Trailers on an owned call: nothing in them is used.
            if o.task.is_none() && !o.refused {
                self.dispatch(b.stream);
            }
            return Ok(());
        }
        self.forward_block(&b, fields);
        Ok(())
    }

    /// The block as it came, or re-encoded (see [`headers::Requests`]).
    fn forward_block(&mut self, b: &Block, mut fields: Fields) {
        match self.requests.forward(&mut fields) {
            None => b.pass(&mut self.to_upstream),
            Some(block) => frame::put_header_block(
                &mut self.to_upstream,
                b.stream,
                &block,
                b.ends_stream(),
                b.priority,
            ),
        }
    }

    /// A new stream: taken out for the owner, or forwarded.
    fn on_request(&mut self, b: Block, fields: Fields) -> Result<(), frame::Error> {
        self.last_stream = b.stream;
        if !b.ends_stream() {
            self.open.insert(b.stream);
        }
        if matches!(self.reach, Reach::Unreachable(_)) && !self.drain(b.stream) {
            self.requests.withheld();
            return Ok(());
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
            self.requests.withheld();
            if b.ends_stream() {
                self.dispatch(b.stream);
            }
            return Ok(());
        }
        let label = crate::metrics::get().method_label(&path);
        self.calls.insert(b.stream, label);
        if self.owner.watches(&path) {
            self.watched
                .insert(b.stream, (path.into_owned(), BytesMut::new()));
        }
        self.forward_block(&b, fields);
        Ok(())
    }

    /// With no upstream, the first call ends the connection: GOAWAY after it,
    /// so that the client's next call comes on a new connection, which tries
    /// the upstream again. True if `stream` is still answered here.
    fn drain(&mut self, stream: u32) -> bool {
        if self.goaway.is_some() {
            // Opened before the client saw the GOAWAY: it retries it elsewhere.
            self.open.remove(&stream);
            frame::put_rst_stream(&mut self.to_client, stream, Reason::RefusedStream);
            return false;
        }
        // A client reconnects as soon as its connection ends, so this one may
        // have come while the upstream restarted. If it is back, the GOAWAY
        // names no stream: the call counts as never processed, and grpc-go and
        // C-core send it again on a new connection, relayed.
        let back = std::os::unix::net::UnixStream::connect(&self.upstream).is_ok();
        let last = if back { 0 } else { stream };
        self.goaway = Some(last);
        let why = "ckpt-shim: upstream runtime unreachable";
        frame::put_goaway(&mut self.to_client, last, Reason::NoError, why);
        if back {
            self.open.remove(&stream);
        }
        !back
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
            self.waiting.push((f.stream, Reply::status(s), None));
            self.write_replies();
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
                self.amends.insert(f.stream, a);
            }
        }
        Ok(())
    }

    /// The whole request of an owned call is in: answer it.
    fn dispatch(&mut self, stream: u32) {
        let open = &self.open;
        self.owned.retain(|id, o| {
            let finished = o.task.as_ref().is_some_and(|t| t.is_finished())
                || (o.refused && !open.contains(id));
            !finished
        });
        let Some(o) = self.owned.get_mut(&stream) else {
            return;
        };
        let replies = self.replies.clone();
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
            let _ = replies.send((stream, reply, hold));
        }));
    }

    /// Connection credit from the client: what covers our own replies' bytes is
    /// kept back from the upstream, which never sent them.
    fn on_window_update(&mut self, f: &Frame) -> Result<(), frame::Error> {
        let inc = f.window_increment();
        if self.window + inc as i64 > frame::MAX_WINDOW {
            return Err(frame::error(Reason::FlowControl, "window over 2^31-1"));
        }
        self.window += inc as i64;
        let pay = self.debt.min(inc as u64);
        self.debt -= pay;
        let forward = inc - pay as u32;
        if !self.waiting.is_empty() {
            self.write_replies();
        }
        if forward == inc {
            self.to_upstream.extend_from_slice(&f.raw);
        } else if forward > 0 {
            frame::put_window_update(&mut self.to_upstream, 0, forward);
        }
        Ok(())
    }

    fn on_settings(&mut self, f: &Frame) {
        self.read_settings(f, TO_CLIENT);
        if let Reach::Unreachable(_) = self.reach {
            // With no upstream the relay is the client's server.
            if !f.has(frame::ACK) {
                frame::put_frame(&mut self.to_client, frame::SETTINGS, frame::ACK, 0, &[]);
            }
            return;
        }
        self.to_upstream.extend_from_slice(&f.raw);
    }
}

/// Upstream to client.
impl Relay {
    fn on_upstream_frame(&mut self, f: Frame) -> Result<(), frame::Error> {
        f.check()?;
        inside_block(&self.upstream_block, &f)?;
        match f.kind {
            frame::HEADERS | frame::CONTINUATION => {
                if let Some(b) = Block::collect(&mut self.upstream_block, &f)? {
                    self.on_reply_block(b)?;
                }
                return Ok(());
            }
            frame::DATA if self.amends(f.stream) => return self.amend_data(&f),
            frame::DATA => self.window -= f.payload.len() as i64,
            frame::RST_STREAM => {
                self.amending.remove(&f.stream);
                self.amends.remove(&f.stream);
                self.open.remove(&f.stream);
                self.answered(f.stream, reset_code(&f));
            }
            frame::SETTINGS => self.read_settings(&f, TO_UPSTREAM),
            // As on the client's side: answered here, never forwarded.
            frame::PING => {
                if !f.has(frame::ACK) {
                    frame::put_frame(
                        &mut self.to_upstream,
                        frame::PING,
                        frame::ACK,
                        0,
                        &f.payload,
                    );
                }
                return Ok(());
            }
            frame::GOAWAY => self.on_goaway(&f),
            // Its header block would need a context the relay does not keep for
            // it; gRPC servers never push.
            frame::PUSH_PROMISE => {
                return Err(frame::error(
                    Reason::Protocol,
                    "PUSH_PROMISE from the upstream",
                ))
            }
            frame::PRIORITY | frame::WINDOW_UPDATE => {}
            // Unknown types are ignored (RFC 9113 §5.5).
            _ => return Ok(()),
        }
        self.to_client.extend_from_slice(&f.raw);
        Ok(())
    }

    /// The upstream's GOAWAY passes on as it came: the client takes every
    /// stream above its last one as never processed and retries it elsewhere,
    /// so the shim's own calls above it are stopped.
    fn on_goaway(&mut self, f: &Frame) {
        let last = f.last_stream().expect("checked: 8 bytes or more");
        self.goaway = Some(self.goaway.map_or(last, |g| g.min(last)));
        let refused: Vec<u32> = self.owned.keys().filter(|s| **s > last).copied().collect();
        for s in refused {
            self.open.remove(&s);
            self.forget(s);
        }
    }

    /// A block from the upstream: read for the call's status, passed on as it came.
    fn on_reply_block(&mut self, mut b: Block) -> Result<(), frame::Error> {
        let fields = self
            .decoder
            .decode(std::mem::take(&mut b.fragment))
            .map_err(compression)?;
        if b.ends_stream() {
            self.finish_amending(b.stream, false);
            let code = headers::get(&fields, "grpc-status")
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
            self.answered(b.stream, code.unwrap_or(tonic::Code::Unknown as i32));
        }
        b.pass(&mut self.to_client);
        Ok(())
    }

    /// Counts a forwarded call's answer (grpc-status `code`) in the metrics.
    fn answered(&mut self, stream: u32, code: i32) {
        if let Some(m) = self.calls.remove(&stream) {
            crate::metrics::get().forwarded(m, code);
        }
    }

    /// Whether `stream`'s reply is to be amended; takes the change on first sight.
    fn amends(&mut self, stream: u32) -> bool {
        if self.amending.contains_key(&stream) {
            return true;
        }
        let a = self.amends.remove(&stream);
        a.map(|a| self.amending.insert(stream, (a, BytesMut::new(), 0)))
            .is_some()
    }

    /// Holds a reply's bytes until its message is whole, then amends it.
    fn amend_data(&mut self, f: &Frame) -> Result<(), frame::Error> {
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
            self.finish_amending(f.stream, f.has(frame::END_STREAM));
        }
        Ok(())
    }

    /// Writes what was held for `stream`, amended if it is one whole
    /// uncompressed message (the change applies to nothing else), and settles
    /// the windows for the difference.
    fn finish_amending(&mut self, stream: u32, end: bool) {
        let Some((amend, buf, consumed)) = self.amending.remove(&stream) else {
            return;
        };
        let out = match crate::pbwire::grpc_message(&buf) {
            Some(msg) => crate::pbwire::grpc_frame(&amend(msg)),
            None => buf.to_vec(),
        };
        frame::put_data(&mut self.to_client, stream, &out, end);
        self.window -= out.len() as i64;
        match out.len().checked_sub(consumed) {
            Some(more) => self.debt += more as u64,
            // Connection credit for bytes the upstream sent that the client
            // never got (the amended reply came out shorter).
            None => {
                frame::put_window_update(&mut self.to_upstream, 0, (consumed - out.len()) as u32)
            }
        }
    }

    /// Writes the replies the client's window has room for, in order.
    fn write_replies(&mut self) {
        while let Some((_, r, _)) = self.waiting.first() {
            let len = r.body.len() as i64;
            if len > self.window {
                break;
            }
            self.window -= len;
            self.debt += len as u64;
            let (stream, r, hold) = self.waiting.remove(0);
            self.written.extend(hold);
            put_reply(&mut self.encoder, &mut self.to_client, stream, r);
        }
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

fn put_reply(codec: &mut headers::Encoder, out: &mut BytesMut, stream: u32, r: Reply) {
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

#[cfg(test)]
#[path = "relay_props.rs"]
mod props;
