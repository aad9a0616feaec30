//! Header blocks crossing the relay: decoded with the sender's HPACK context and
//! re-encoded with ours toward the receiver (loona-hpack both ways), so each
//! peer's dynamic table matches what it is sent, and the relay can read a
//! request's `:path`, answer calls itself, and change a field.
//!
//! The one field changed on the way is `:authority`. gRPC clients on a unix
//! socket send the socket's path there: the kubelet up to 1.27 bare
//! (`/run/…/x.sock`), gRPC C-core ≥ 1.57 (Python, C++, Ruby), grpc-java and
//! grpc-swift percent-encoded (`%2Frun%2F…`). Neither is a URI authority. Go's
//! servers take them; stricter ones, like the `h2` crate, reset the stream. An
//! `:authority` that is not a valid authority becomes `localhost`, which is what
//! newer crictl sends; everything else passes as it came.

use bytes::BytesMut;

use super::frame;

/// What an `:authority` that is not a valid URI authority is replaced with.
pub const SUBSTITUTE: &[u8] = b"localhost";
/// The HPACK table size both sides start with (RFC 7541 §4.2, SETTINGS default).
const DEFAULT_TABLE: usize = 4096;
/// The largest table a peer may make us keep, whatever it asks for.
const MAX_TABLE: usize = 64 << 10;
/// A header block larger than this is refused.
pub const MAX_BLOCK: usize = 1 << 20;

pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One direction's HPACK state: the sender's context (decoder) and the
/// receiver's (encoder).
pub struct HeaderCodec {
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// A table size the receiver announced, to be signalled in the next block.
    size_update: Option<usize>,
}

impl Default for HeaderCodec {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        HeaderCodec {
            decoder,
            encoder: loona_hpack::Encoder::new(),
            size_update: None,
        }
    }
}

impl HeaderCodec {
    pub fn decode(&mut self, block: &[u8]) -> std::io::Result<Fields> {
        self.decoder
            .decode(block)
            .map_err(|e| frame::bad(&format!("HPACK: {e}")))
    }

    /// The receiver's SETTINGS_HEADER_TABLE_SIZE: our encoder must stay within it.
    pub fn receiver_table_size(&mut self, size: u32) {
        let size = (size as usize).min(DEFAULT_TABLE);
        self.encoder.set_max_table_size(size);
        self.size_update = Some(size);
    }

    pub fn encode(&mut self, fields: &Fields) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        if let Some(size) = self.size_update.take() {
            // A dynamic table size update (RFC 7541 §6.3) starts the block.
            loona_hpack::encoder::encode_integer_into(size, 5, 0x20, &mut out)
                .expect("writing to a Vec");
        }
        self.encoder
            .encode_into(
                fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
                &mut out,
            )
            .expect("writing to a Vec");
        out
    }

    /// Encodes `fields` as HEADERS (and CONTINUATION) frames into `out`.
    pub fn put(
        &mut self,
        out: &mut BytesMut,
        stream: u32,
        fields: &Fields,
        end_stream: bool,
        priority: Option<[u8; 5]>,
    ) {
        let block = self.encode(fields);
        frame::put_header_block(out, stream, &block, end_stream, priority);
    }
}

/// The value of the first field called `name`.
pub fn get<'f>(fields: &'f Fields, name: &str) -> Option<&'f [u8]> {
    fields
        .iter()
        .find(|(n, _)| n.as_slice() == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// Replaces an `:authority` that is not a valid URI authority; true if it did.
pub fn fix_authority(fields: &mut Fields) -> bool {
    let mut fixed = false;
    for (name, value) in fields.iter_mut() {
        if name.as_slice() == b":authority"
            && http::uri::Authority::try_from(value.as_slice()).is_err()
        {
            *value = SUBSTITUTE.to_vec();
            fixed = true;
        }
    }
    fixed
}

/// Header fields from an `http` header map, `:status` first.
pub fn from_http(status: Option<http::StatusCode>, map: &http::HeaderMap) -> Fields {
    let mut out: Fields = Vec::with_capacity(map.len() + 1);
    if let Some(s) = status {
        out.push((b":status".to_vec(), s.as_str().as_bytes().to_vec()));
    }
    out.extend(
        map.iter()
            .map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec())),
    );
    out
}

/// The regular (non-pseudo) fields as an `http` header map; fields `http`
/// cannot represent are left out.
pub fn to_http(fields: &Fields) -> http::HeaderMap {
    let mut map = http::HeaderMap::with_capacity(fields.len());
    for (n, v) in fields.iter().filter(|(n, _)| !n.starts_with(b":")) {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(n),
            http::HeaderValue::from_bytes(v),
        ) {
            map.append(n, v);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn only_invalid_authorities_are_replaced() {
        for (given, want) in [
            ("/run/ckpt-shim/ckpt-shim.sock", "localhost"),
            ("%2Frun%2Fckpt-shim%2Fckpt-shim.sock", "localhost"),
            ("", "localhost"),
            ("localhost", "localhost"),
            ("[::]", "[::]"),
            ("unix.sock:1234", "unix.sock:1234"),
        ] {
            let mut f = fields(&[(":method", "POST"), (":authority", given), ("x-a", "b")]);
            assert_eq!(fix_authority(&mut f), given != want, "{given:?}");
            assert_eq!(
                f,
                fields(&[(":method", "POST"), (":authority", want), ("x-a", "b")])
            );
        }
    }

    #[test]
    fn blocks_round_trip_and_tables_stay_in_step() {
        // A sender's encoder, our codec in the middle, a receiver's decoder.
        let mut sender = loona_hpack::Encoder::new();
        let mut receiver = loona_hpack::Decoder::new();
        let mut relay = HeaderCodec::default();
        for i in 0..200 {
            let f = fields(&[
                (":method", "POST"),
                (":path", "/runtime.v1.RuntimeService/Version"),
                ("grpc-timeout", &format!("{i}m")),
                ("x-big", &"v".repeat(i * 7)),
            ]);
            let block = sender.encode(f.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            let got = relay.decode(&block).unwrap();
            assert_eq!(got, f);
            assert_eq!(
                receiver.decode(&relay.encode(&got)).unwrap(),
                f,
                "block {i}"
            );
        }
        relay.receiver_table_size(256);
        receiver.set_max_table_size(4096);
        let f = fields(&[("x-after", "resize")]);
        assert_eq!(receiver.decode(&relay.encode(&f)).unwrap(), f);
    }
}
