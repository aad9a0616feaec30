//! A raw HTTP/2 gRPC client (sends exactly the bytes and headers given, enforces
//! no deadline itself) and a recording upstream (answers with whatever status a
//! test asks for), to see precisely what crosses the shim.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub struct Reply {
    pub headers: http::HeaderMap,
    pub data: Vec<u8>,
    pub trailers: http::HeaderMap,
}

impl Reply {
    /// grpc-status from the trailers, or from the headers of a trailers-only reply.
    pub fn status(&self) -> Option<i32> {
        self.trailers
            .get("grpc-status")
            .or(self.headers.get("grpc-status"))?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }
    pub fn message(&self) -> String {
        self.trailers
            .get("grpc-message")
            .or(self.headers.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend((msg.len() as u32).to_be_bytes());
    b.extend(msg);
    b
}

pub async fn call(sock: &Path, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    let mut send = connect(sock, FakeSettings::default()).await;
    send_call(&mut send, path, headers, body).await
}

/// A hyper HTTP/2 client connection, announcing `settings` (the frame and
/// HPACK table sizes it takes; no stream limit of its own).
pub async fn connect(sock: &Path, settings: FakeSettings) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .max_frame_size(settings.max_frame)
        .header_table_size(settings.header_table)
        .max_header_list_size(1 << 20)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A call on `send`'s connection, read to its end.
pub async fn send_call(
    send: &mut SendRequest<Full<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let resp = start_call(send, path, headers, body).await;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Reply {
        headers: parts.headers,
        data: collected.to_bytes().to_vec(),
        trailers,
    }
}

/// A call on `send`'s connection, up to its response headers.
pub async fn start_call(
    send: &mut SendRequest<Full<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> http::Response<hyper::body::Incoming> {
    let mut req = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send.ready().await.unwrap();
    send.send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap()
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    /// The request's `:authority`, as the upstream's HTTP/2 server took it.
    pub authority: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

/// How a stand-in upstream answers a call (path, request body): grpc status,
/// message, data frames to send back.
pub type Answer = fn(&str, &[u8]) -> (i32, &'static str, Vec<Vec<u8>>);

/// An upstream on `sock` that records every call and answers per path:
/// `reply(path)` gives (grpc status, message, data frames to send back).
pub fn recorder(sock: &Path, reply: Answer) -> Arc<Mutex<Vec<Seen>>> {
    let seen: Arc<Mutex<Vec<Seen>>> = Default::default();
    let listener = tokio::net::UnixListener::bind(sock).unwrap();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes().to_vec();
                            let path = parts.uri.path().to_string();
                            log.lock().unwrap().push(Seen {
                                path: path.clone(),
                                authority: parts.uri.authority().map(|a| a.to_string()),
                                headers: parts.headers,
                                body: body.clone(),
                            });
                            let (code, msg, frames) = reply(&path, &body);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", code.to_string().parse().unwrap());
                            trailers.insert("grpc-message", msg.parse().unwrap());
                            let mut out: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                                frames
                                    .into_iter()
                                    .map(|f| Ok(Frame::data(Bytes::from(f))))
                                    .collect();
                            out.push(Ok(Frame::trailers(trailers)));
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(StreamBody::new(futures_util::stream::iter(out)))
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    seen
}

/// An HTTP/2 exchange written frame by frame, so the `:authority` can be any
/// bytes a client might send (`http::Uri` refuses the socket paths real clients
/// put there). The header blocks are encoded and decoded with loona-hpack.
pub mod frames {
    use std::path::Path;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[derive(Debug, Default)]
    pub struct Answer {
        pub headers: Vec<(String, String)>,
        pub data: Vec<u8>,
        pub trailers: Vec<(String, String)>,
        /// RST_STREAM's error code, if the stream was reset.
        pub reset: Option<u32>,
        /// A GOAWAY's last stream and error code, if one came.
        pub goaway: Option<(u32, u32)>,
        /// The connection ended before the stream did.
        pub closed: bool,
    }

    impl Answer {
        pub fn get(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .chain(&self.trailers)
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
        pub fn grpc_status(&self) -> Option<i32> {
            self.get("grpc-status")?.parse().ok()
        }
    }

    /// One call on stream 1 of a fresh connection. Returns when the stream ends,
    /// or once `messages` gRPC messages have arrived (for endless streams).
    pub async fn call(
        sock: &Path,
        authority: &str,
        path: &str,
        body: &[u8],
        messages: usize,
    ) -> Answer {
        let mut c = super::Conn::open(sock).await;
        c.request_to(1, authority, path, body, true).await;
        c.answer(1, messages).await
    }

    /// How many whole gRPC messages (5-byte prefix + body) `data` holds.
    pub fn count_messages(mut data: &[u8]) -> usize {
        let mut n = 0;
        while data.len() >= 5 {
            let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
            if data.len() < 5 + len {
                break;
            }
            data = &data[5 + len..];
            n += 1;
        }
        n
    }
}

/// How the fake upstream's HTTP/2 server is set up.
#[derive(Clone, Copy, Default)]
pub struct FakeSettings {
    pub max_frame: Option<u32>,
    pub header_table: Option<u32>,
    pub max_streams: Option<u32>,
}

/// A runtime stand-in that can die: every connection drops when it is killed.
/// By path (the method name after the last `/`):
/// - `GetContainerEvents`: an event every 20 ms, forever;
/// - `ExecSync`: never answers;
/// - `Drain`: answers, then the server shuts the connection down (GOAWAY);
/// - `Reset`: the server resets the stream;
/// - `Big`: a message of `x-size` bytes;
/// - `Slow`: echoes after 300 ms;
/// - anything else: echoes the request's bytes.
///
/// The `x-big` request header comes back as a response header. `live` counts
/// the calls whose handling is alive (an ended or reset call lets go of it).
pub struct Fake {
    task: tokio::task::JoinHandle<()>,
    /// What the next connection is served with.
    settings: Arc<Mutex<FakeSettings>>,
    pub live: Arc<std::sync::atomic::AtomicUsize>,
    pub calls: Arc<Mutex<Vec<String>>>,
}

/// Counts a live call until dropped.
struct Live(Arc<std::sync::atomic::AtomicUsize>);

impl Live {
    fn new(n: &Arc<std::sync::atomic::AtomicUsize>) -> Live {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Live(n.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

type FakeBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

impl Fake {
    pub fn start(sock: &Path, settings: FakeSettings) -> Fake {
        let _ = std::fs::remove_file(sock);
        let listener = tokio::net::UnixListener::bind(sock).unwrap();
        let live: Arc<std::sync::atomic::AtomicUsize> = Default::default();
        let calls: Arc<Mutex<Vec<String>>> = Default::default();
        let settings = Arc::new(Mutex::new(settings));
        let (l, c, s) = (live.clone(), calls.clone(), settings.clone());
        let task = tokio::spawn(async move {
            // Dropped with the task: every connection goes with it.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let now = *s.lock().unwrap();
                conns.spawn(Self::serve(stream, now, l.clone(), c.clone()));
            }
        });
        Fake {
            task,
            settings,
            live,
            calls,
        }
    }

    /// Serves connections made from now on with `settings`.
    pub fn set(&self, settings: FakeSettings) {
        *self.settings.lock().unwrap() = settings;
    }

    pub fn live(&self) -> usize {
        self.live.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn count(&self, method: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.as_str() == method)
            .count()
    }

    /// Like a runtime killed: its connections close at once.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    async fn serve(
        stream: tokio::net::UnixStream,
        settings: FakeSettings,
        live: Arc<std::sync::atomic::AtomicUsize>,
        calls: Arc<Mutex<Vec<String>>>,
    ) {
        let drain = Arc::new(tokio::sync::Notify::new());
        let d = drain.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let (live, calls, drain) = (live.clone(), calls.clone(), d.clone());
            async move {
                let guard = Live::new(&live);
                let method = req.uri().path().rsplit('/').next().unwrap().to_string();
                calls.lock().unwrap().push(method.clone());
                fake_answer(&method, req, guard, &drain).await
            }
        });
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.max_frame_size(settings.max_frame)
            .header_table_size(settings.header_table)
            .max_concurrent_streams(settings.max_streams)
            .max_header_list_size(1 << 20);
        let conn = b.serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = drain.notified() => conn.as_mut().graceful_shutdown(),
        }
        let _ = conn.await;
    }
}

async fn fake_answer(
    method: &str,
    req: http::Request<hyper::body::Incoming>,
    guard: Live,
    drain: &tokio::sync::Notify,
) -> Result<http::Response<FakeBody>, std::io::Error> {
    let size: usize = req
        .headers()
        .get("x-size")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let big = req.headers().get("x-big").cloned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        // The client reset the call while sending it.
        Err(e) => return Err(std::io::Error::other(e)),
    };
    let ok = |data: Vec<u8>| -> FakeBody {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from(data))),
            Ok(Frame::trailers(trailers)),
        ];
        BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    };
    let body = match method {
        "GetContainerEvents" => {
            let events = futures_util::stream::unfold(guard, |g| async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let ev = Frame::data(Bytes::from(frame(b"\x0a\x02c1")));
                Some((Ok::<_, std::convert::Infallible>(ev), g))
            });
            BodyExt::boxed(StreamBody::new(events))
        }
        "ExecSync" => std::future::pending().await,
        "Reset" => return Err(std::io::Error::other("reset by the fake upstream")),
        "Drain" => {
            drain.notify_one();
            ok(body.to_vec())
        }
        "Big" => ok(frame(&vec![7u8; size])),
        "Slow" => {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            ok(body.to_vec())
        }
        _ => ok(body.to_vec()),
    };
    let mut resp = http::Response::builder().header("content-type", "application/grpc");
    if let Some(v) = big {
        resp = resp.header("x-big", v);
    }
    Ok(resp.body(body).unwrap())
}

/// One HTTP/2 connection driven frame by frame: for what real clients never
/// do (drop the socket mid-call, stop reading, reset a stream at a chosen time).
pub struct Conn {
    pub s: tokio::net::UnixStream,
    enc: loona_hpack::Encoder<'static>,
    dec: loona_hpack::Decoder<'static>,
}

/// A frame as read: type, flags, stream, payload.
pub type RawFrame = (u8, u8, u32, Vec<u8>);

impl Conn {
    pub async fn open(sock: &Path) -> Conn {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
        let mut out = frames::PREFACE.to_vec();
        out.extend(raw_frame(0x4, 0, 0, &[]));
        s.write_all(&out).await.unwrap();
        Conn {
            s,
            enc: loona_hpack::Encoder::new(),
            dec: loona_hpack::Decoder::new(),
        }
    }

    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.s
            .write_all(&raw_frame(kind, flags, stream, payload))
            .await
            .unwrap();
    }

    /// A gRPC request on `stream`: HEADERS, then DATA with `body` (ending the
    /// stream if `end`).
    pub async fn request(&mut self, stream: u32, path: &str, body: &[u8], end: bool) {
        self.request_to(stream, "localhost", path, body, end).await
    }

    /// [`Conn::request`] with `authority` as `:authority`.
    pub async fn request_to(
        &mut self,
        stream: u32,
        authority: &str,
        path: &str,
        body: &[u8],
        end: bool,
    ) {
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ];
        let block = self.enc.encode(fields);
        self.send(0x1, 0x4, stream, &block).await;
        self.send(0x0, if end { 0x1 } else { 0 }, stream, body)
            .await;
    }

    /// The next frame (SETTINGS are acknowledged on the way); None at the end
    /// of the connection.
    pub async fn next(&mut self) -> Option<RawFrame> {
        use tokio::io::AsyncReadExt;
        let mut h = [0u8; 9];
        self.s.read_exact(&mut h).await.ok()?;
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let mut p = vec![0u8; len];
        self.s.read_exact(&mut p).await.ok()?;
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
        if kind == 0x4 && flags & 1 == 0 {
            self.send(0x4, 1, 0, &[]).await;
        }
        Some((kind, flags, stream, p))
    }

    /// Reads until `stream` ends, is reset, `messages` messages came (if not
    /// 0), or the connection ends; a GOAWAY on the way is recorded.
    pub async fn answer(&mut self, stream: u32, messages: usize) -> frames::Answer {
        let mut a = frames::Answer::default();
        let mut got_headers = false;
        while let Some((kind, flags, s, p)) = self.next().await {
            match kind {
                0x7 => {
                    let word = |i: usize| u32::from_be_bytes(p[i..i + 4].try_into().unwrap());
                    a.goaway = Some((word(0) & 0x7fff_ffff, word(4)));
                }
                0x1 if s == stream => {
                    assert!(flags & 0x4 != 0, "test client expects whole header blocks");
                    let f = self.decode(&p);
                    if got_headers {
                        a.trailers = f
                    } else {
                        a.headers = f
                    }
                    got_headers = true;
                    if flags & 1 != 0 {
                        return a;
                    }
                }
                0x0 if s == stream => {
                    a.data.extend(&p);
                    let enough = messages > 0 && frames::count_messages(&a.data) >= messages;
                    if enough || flags & 1 != 0 {
                        return a;
                    }
                }
                0x3 if s == stream => {
                    a.reset = Some(u32::from_be_bytes(p[..4].try_into().unwrap()));
                    return a;
                }
                _ => {}
            }
        }
        a.closed = true;
        a
    }

    fn decode(&mut self, block: &[u8]) -> Vec<(String, String)> {
        self.dec
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }
}

pub fn raw_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    b.extend([kind, flags]);
    b.extend(stream.to_be_bytes());
    b.extend(payload);
    b
}
