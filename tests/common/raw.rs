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
