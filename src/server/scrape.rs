//! The metrics endpoint (`metrics_listen`): `GET /metrics` in the OpenMetrics
//! text format, over HTTP/1.1 on a TCP address (`127.0.0.1:9464`) or a unix
//! socket (`unix:///run/ckpt-shim/metrics.sock`, made like the CRI socket).
//! The series hold no container data, only counts, codes and method names.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Context, Error, Result};

/// Where to listen, from the config's `metrics_listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Listen {
    pub fn parse(s: &str) -> Result<Listen> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or(s.starts_with('/').then_some(s))
        {
            if !path.starts_with('/') {
                return Err(Error::InvalidArgument(format!(
                    "metrics_listen {s:?}: a unix socket needs an absolute path"
                )));
            }
            return Ok(Listen::Unix(path.into()));
        }
        s.parse().map(Listen::Tcp).map_err(|_| {
            Error::InvalidArgument(format!(
                "metrics_listen {s:?}: want HOST:PORT (e.g. 127.0.0.1:9464) or unix:///path"
            ))
        })
    }
}

/// Binds now (so a bad address stops the start), then serves in the background.
pub async fn spawn(listen: &Listen) -> Result<()> {
    match listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .ctx(|| format!("metrics: bind {addr}"))?;
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(answer(s));
                }
            });
        }
        Listen::Unix(path) => {
            let l = super::socket::bind(path)?;
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(answer(s));
                }
            });
        }
    }
    tracing::info!(listen = ?listen, "serving metrics");
    Ok(())
}

async fn answer(io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static) {
    let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
        let resp = match (req.method(), req.uri().path()) {
            (&http::Method::GET, "/metrics") => http::Response::builder()
                .header(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Full::new(Bytes::from(crate::metrics::get().encode()))),
            _ => http::Response::builder()
                .status(http::StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::from_static(
                    b"only GET /metrics is served\n",
                ))),
        };
        Ok::<_, http::Error>(resp.expect("static parts"))
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            Listen::parse("127.0.0.1:9464").unwrap(),
            Listen::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(
            Listen::parse("unix:///run/m.sock").unwrap(),
            Listen::Unix("/run/m.sock".into())
        );
        assert_eq!(
            Listen::parse("/run/m.sock").unwrap(),
            Listen::Unix("/run/m.sock".into())
        );
        for bad in ["localhost", "unix://rel.sock", ":9464", ""] {
            assert!(Listen::parse(bad).is_err(), "{bad}");
        }
    }
}
