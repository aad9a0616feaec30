//! A raw HTTP/2 gRPC client (sends exactly the bytes and headers given, enforces
//! no deadline itself) and a recording upstream (answers with whatever status a
//! test asks for), to see precisely what crosses the shim.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
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
    let stream = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Reply {
        headers: parts.headers,
        data: collected.to_bytes().to_vec(),
        trailers,
    }
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    /// The request's `:authority`, as the upstream's HTTP/2 server took it.
    pub authority: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

/// An upstream on `sock` that records every call and answers per path:
/// `reply(path)` gives (grpc status, message, data frames to send back).
pub fn recorder(
    sock: &Path,
    reply: fn(&str, &[u8]) -> (i32, &'static str, Vec<Vec<u8>>),
) -> Arc<Mutex<Vec<Seen>>> {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        b.extend([kind, flags]);
        b.extend(stream.to_be_bytes());
        b.extend(payload);
        b
    }

    #[derive(Debug, Default)]
    pub struct Answer {
        pub headers: Vec<(String, String)>,
        pub data: Vec<u8>,
        pub trailers: Vec<(String, String)>,
        /// RST_STREAM's error code, if the stream was reset.
        pub reset: Option<u32>,
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
        let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
        let mut enc = loona_hpack::Encoder::new();
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ];
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        out.extend(frame(0x1, 0x4, 1, &enc.encode(fields)));
        out.extend(frame(0x0, 0x1, 1, body));
        s.write_all(&out).await.unwrap();
        read_answer(&mut s, messages).await
    }

    async fn read_answer(s: &mut tokio::net::UnixStream, messages: usize) -> Answer {
        let mut dec = loona_hpack::Decoder::new();
        let mut a = Answer::default();
        let mut got_headers = false;
        loop {
            let mut h = [0u8; 9];
            if s.read_exact(&mut h).await.is_err() {
                return a;
            }
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let (kind, flags, stream) = (h[3], h[4], u32::from_be_bytes([h[5], h[6], h[7], h[8]]));
            let mut p = vec![0u8; len];
            s.read_exact(&mut p).await.unwrap();
            match kind {
                0x4 if flags & 1 == 0 => s.write_all(&frame(0x4, 1, 0, &[])).await.unwrap(),
                0x1 if stream == 1 => {
                    assert!(flags & 0x4 != 0, "test client expects whole header blocks");
                    let f: Vec<(String, String)> = dec
                        .decode(&p)
                        .unwrap()
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect();
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
                0x0 if stream == 1 => {
                    a.data.extend(&p);
                    if messages > 0 && count_messages(&a.data) >= messages {
                        return a;
                    }
                    if flags & 1 != 0 {
                        return a;
                    }
                }
                0x3 if stream == 1 => {
                    a.reset = Some(u32::from_be_bytes(p[..4].try_into().unwrap()));
                    return a;
                }
                _ => {}
            }
        }
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
