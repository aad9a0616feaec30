//! HTTP/2 framing (RFC 9113 §4): just enough to cut a byte stream into frames and
//! to write frames, for the relay. Frame payloads are not interpreted here.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// Every peer accepts frames this large; what the relay writes itself fits.
pub const MAX_FRAME: usize = 16_384;
/// A frame larger than this is refused (peers may allow up to 16 MiB).
const LARGEST: usize = 1 << 24;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

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

    /// The data of a DATA frame without its padding, and its flow-controlled length.
    pub fn data(&self) -> std::io::Result<(&[u8], usize)> {
        let len = self.payload.len();
        if !self.has(PADDED) {
            return Ok((&self.payload, len));
        }
        let pad = *self
            .payload
            .first()
            .ok_or_else(|| bad("empty padded DATA"))? as usize;
        if pad + 1 > len {
            return Err(bad("DATA padding exceeds the frame"));
        }
        Ok((&self.payload[1..len - pad], len))
    }

    /// The header block fragment of a HEADERS frame, and its priority fields.
    pub fn header_fragment(&self) -> std::io::Result<(&[u8], Option<[u8; 5]>)> {
        let mut p: &[u8] = &self.payload;
        let pad = if self.has(PADDED) {
            let (&n, rest) = p.split_first().ok_or_else(|| bad("empty padded HEADERS"))?;
            p = rest;
            n as usize
        } else {
            0
        };
        let priority = if self.has(PRIORITY_FLAG) {
            if p.len() < 5 {
                return Err(bad("short HEADERS priority"));
            }
            let (pr, rest) = p.split_at(5);
            p = rest;
            Some(pr.try_into().expect("5 bytes"))
        } else {
            None
        };
        if pad > p.len() {
            return Err(bad("HEADERS padding exceeds the frame"));
        }
        Ok((&p[..p.len() - pad], priority))
    }
}

/// Cuts frames out of bytes read from one peer, after its preface if it sends one.
pub struct Reader {
    buf: BytesMut,
    preface: usize,
}

impl Reader {
    /// `preface`: whether the peer starts with the client connection preface.
    pub fn new(preface: bool) -> Reader {
        Reader {
            buf: BytesMut::with_capacity(32 << 10),
            preface: if preface { PREFACE.len() } else { 0 },
        }
    }

    pub fn buf(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < 8 << 10 {
            self.buf.reserve(32 << 10);
        }
        &mut self.buf
    }

    /// The preface bytes received so far, to pass on; checked as they come.
    pub fn take_preface(&mut self) -> std::io::Result<Bytes> {
        let n = self.preface.min(self.buf.len());
        let done = PREFACE.len() - self.preface;
        if self.buf[..n] != PREFACE[done..done + n] {
            return Err(bad("not an HTTP/2 connection preface"));
        }
        self.preface -= n;
        Ok(self.buf.split_to(n).freeze())
    }

    pub fn next(&mut self) -> std::io::Result<Option<Frame>> {
        if self.preface > 0 || self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let h = &self.buf[..HEADER_LEN];
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        if len > LARGEST {
            return Err(bad("frame too large"));
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
