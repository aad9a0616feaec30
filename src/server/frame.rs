//! HTTP/2 framing (RFC 9113 §4): just enough to cut a byte stream into frames and
//! to write frames, for the relay. Frame payloads are not interpreted here.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// Every peer accepts frames this large; what the relay writes itself fits.
pub const MAX_FRAME: usize = 16_384;
/// The largest frame size a peer may announce (RFC 9113 §6.5.2).
const LARGEST: usize = (1 << 24) - 1;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS identifiers the relay reads or checks.
const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// The largest flow-control window (RFC 9113 §6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// HTTP/2 error codes (RFC 9113 §7) the relay sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NoError = 0x0,
    Protocol = 0x1,
    Internal = 0x2,
    FlowControl = 0x3,
    StreamClosed = 0x5,
    FrameSize = 0x6,
    RefusedStream = 0x7,
    Cancel = 0x8,
    Compression = 0x9,
}

/// Why a relayed connection ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer broke the protocol: the connection ends with a GOAWAY carrying
    /// `reason` (RFC 9113 §5.4.1).
    #[error("HTTP/2 {reason:?}: {what}")]
    Connection { reason: Reason, what: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A connection error of type `reason`.
pub fn error(reason: Reason, what: impl Into<String>) -> Error {
    Error::Connection {
        reason,
        what: what.into(),
    }
}

#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Bytes,
    /// The frame as it arrived, header and all, for passing it on unchanged.
    pub raw: Bytes,
}

impl Frame {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The increment of a WINDOW_UPDATE.
    pub fn window_increment(&self) -> u32 {
        match self.payload.get(..4) {
            Some(b) => u32::from_be_bytes(b.try_into().expect("4 bytes")) & 0x7fff_ffff,
            None => 0,
        }
    }

    /// The (identifier, value) pairs of a SETTINGS frame.
    pub fn settings(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.payload.chunks_exact(6).map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
    }

    /// The data of a DATA frame without its padding, and its flow-controlled length.
    pub fn data(&self) -> Result<(&[u8], usize), Error> {
        let len = self.payload.len();
        if !self.has(PADDED) {
            return Ok((&self.payload, len));
        }
        let pad = *self
            .payload
            .first()
            .ok_or_else(|| error(Reason::FrameSize, "empty padded DATA"))?
            as usize;
        if pad + 1 > len {
            return Err(error(Reason::Protocol, "DATA padding exceeds the frame"));
        }
        Ok((&self.payload[1..len - pad], len))
    }

    /// The header block fragment of a HEADERS frame, and its priority fields.
    pub fn header_fragment(&self) -> Result<(&[u8], Option<[u8; 5]>), Error> {
        let mut p: &[u8] = &self.payload;
        let pad = if self.has(PADDED) {
            let (&n, rest) = p
                .split_first()
                .ok_or_else(|| error(Reason::FrameSize, "empty padded HEADERS"))?;
            p = rest;
            n as usize
        } else {
            0
        };
        let priority = if self.has(PRIORITY_FLAG) {
            if p.len() < 5 {
                return Err(error(Reason::FrameSize, "short HEADERS priority"));
            }
            let (pr, rest) = p.split_at(5);
            p = rest;
            Some(pr.try_into().expect("5 bytes"))
        } else {
            None
        };
        if pad > p.len() {
            return Err(error(Reason::Protocol, "HEADERS padding exceeds the frame"));
        }
        Ok((&p[..p.len() - pad], priority))
    }

    /// The RFC 9113 §6 rules on a frame's stream and length that make a bad
    /// frame a connection error, whoever it is for. A WINDOW_UPDATE of 0 on a
    /// stream and a PRIORITY of the wrong size are the stream's own errors,
    /// left to the caller. Unknown types pass (they are to be ignored).
    pub fn check(&self) -> Result<(), Error> {
        let (len, on_conn) = (self.payload.len(), self.stream == 0);
        let wrong = |reason, what: &str| Err(error(reason, format!("{what} (type {})", self.kind)));
        match self.kind {
            DATA | HEADERS | PRIORITY | RST_STREAM | PUSH_PROMISE | CONTINUATION if on_conn => {
                wrong(Reason::Protocol, "a stream's frame on stream 0")
            }
            SETTINGS | PING | GOAWAY if !on_conn => {
                wrong(Reason::Protocol, "a connection's frame on a stream")
            }
            DATA => self.data().map(drop),
            HEADERS => self.header_fragment().map(drop),
            RST_STREAM if len != 4 => wrong(Reason::FrameSize, "RST_STREAM not 4 bytes"),
            PING if len != 8 => wrong(Reason::FrameSize, "PING not 8 bytes"),
            GOAWAY if len < 8 => wrong(Reason::FrameSize, "GOAWAY shorter than 8 bytes"),
            WINDOW_UPDATE if len != 4 => wrong(Reason::FrameSize, "WINDOW_UPDATE not 4 bytes"),
            WINDOW_UPDATE if on_conn && self.window_increment() == 0 => {
                wrong(Reason::Protocol, "WINDOW_UPDATE of 0")
            }
            SETTINGS if self.has(ACK) && len != 0 => {
                wrong(Reason::FrameSize, "SETTINGS ACK with a payload")
            }
            SETTINGS if len % 6 != 0 => {
                wrong(Reason::FrameSize, "SETTINGS not a multiple of 6 bytes")
            }
            SETTINGS => self.check_settings(),
            _ => Ok(()),
        }
    }

    /// RFC 9113 §6.5.2: the values a SETTINGS frame may carry.
    fn check_settings(&self) -> Result<(), Error> {
        for (id, v) in self.settings() {
            let bad = match id {
                SETTINGS_ENABLE_PUSH if v > 1 => Some(Reason::Protocol),
                SETTINGS_INITIAL_WINDOW_SIZE if v as i64 > MAX_WINDOW => Some(Reason::FlowControl),
                SETTINGS_MAX_FRAME_SIZE if !(MAX_FRAME..=LARGEST).contains(&(v as usize)) => {
                    Some(Reason::Protocol)
                }
                _ => None,
            };
            if let Some(reason) = bad {
                return Err(error(reason, format!("SETTINGS {id} = {v}")));
            }
        }
        Ok(())
    }

    /// The error code of a RST_STREAM or GOAWAY, and a GOAWAY's last stream.
    pub fn code(&self) -> Option<u32> {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }

    pub fn last_stream(&self) -> Option<u32> {
        let b = self.payload.get(..4)?;
        Some(u32::from_be_bytes(b.try_into().expect("4 bytes")) & 0x7fff_ffff)
    }
}

/// Cuts frames out of bytes read from one peer, after its preface if it sends one.
pub struct Reader {
    buf: BytesMut,
    preface: usize,
    /// The largest frame the peer may send: what the other peer announced.
    pub max: usize,
}

impl Reader {
    /// `preface`: whether the peer starts with the client connection preface.
    pub fn new(preface: bool) -> Reader {
        Reader {
            buf: BytesMut::with_capacity(32 << 10),
            preface: if preface { PREFACE.len() } else { 0 },
            max: MAX_FRAME,
        }
    }

    pub fn buf(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < 8 << 10 {
            self.buf.reserve(32 << 10);
        }
        &mut self.buf
    }

    /// The preface bytes received so far, to pass on; checked as they come.
    pub fn take_preface(&mut self) -> Result<Bytes, Error> {
        let n = self.preface.min(self.buf.len());
        let done = PREFACE.len() - self.preface;
        if self.buf[..n] != PREFACE[done..done + n] {
            return Err(error(Reason::Protocol, "not an HTTP/2 connection preface"));
        }
        self.preface -= n;
        Ok(self.buf.split_to(n).freeze())
    }

    pub fn next(&mut self) -> Result<Option<Frame>, Error> {
        if self.preface > 0 || self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let h = &self.buf[..HEADER_LEN];
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        if len > self.max.min(LARGEST) {
            return Err(error(
                Reason::FrameSize,
                format!(
                    "a frame of {len} bytes, over SETTINGS_MAX_FRAME_SIZE {}",
                    self.max
                ),
            ));
        }
        if self.buf.len() < HEADER_LEN + len {
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let raw = self.buf.split_to(HEADER_LEN + len).freeze();
        let mut payload = raw.clone();
        payload.advance(HEADER_LEN);
        Ok(Some(Frame {
            kind,
            flags,
            stream,
            payload,
            raw,
        }))
    }
}

pub fn put_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

pub fn put_frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    put_header(out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
}

/// GOAWAY: the last stream the sender processes, and why it stops.
pub fn put_goaway(out: &mut BytesMut, last_stream: u32, reason: Reason, debug: &str) {
    let mut p = last_stream.to_be_bytes().to_vec();
    p.extend((reason as u32).to_be_bytes());
    p.extend(debug.as_bytes());
    put_frame(out, GOAWAY, 0, 0, &p);
}

pub fn put_rst_stream(out: &mut BytesMut, stream: u32, reason: Reason) {
    put_frame(out, RST_STREAM, 0, stream, &(reason as u32).to_be_bytes());
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_frame(out, WINDOW_UPDATE, 0, stream, &increment.to_be_bytes());
}

/// HEADERS, then CONTINUATION frames as needed, carrying `block`.
pub fn put_header_block(
    out: &mut BytesMut,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    priority: Option<[u8; 5]>,
) {
    let prio_len = if priority.is_some() { 5 } else { 0 };
    let first = block.len().min(MAX_FRAME - prio_len);
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if priority.is_some() {
        flags |= PRIORITY_FLAG;
    }
    if first == block.len() {
        flags |= END_HEADERS;
    }
    put_header(out, first + prio_len, HEADERS, flags, stream);
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(&block[..first]);
    let mut rest = &block[first..];
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME);
        let flags = if n == rest.len() { END_HEADERS } else { 0 };
        put_frame(out, CONTINUATION, flags, stream, &rest[..n]);
        rest = &rest[n..];
    }
}

/// DATA frames carrying `data`, the last with END_STREAM if asked.
pub fn put_data(out: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool) {
    let mut chunks = data.chunks(MAX_FRAME).peekable();
    if chunks.peek().is_none() {
        put_frame(
            out,
            DATA,
            if end_stream { END_STREAM } else { 0 },
            stream,
            &[],
        );
    }
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        put_frame(
            out,
            DATA,
            if last && end_stream { END_STREAM } else { 0 },
            stream,
            c,
        );
    }
}

pub fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("HTTP/2: {what}"))
}
