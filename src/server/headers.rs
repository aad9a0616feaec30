//! Header blocks crossing the relay. Each direction has an HPACK decoder that
//! follows the sender's encoder, so the relay can read a request's `:path`, a
//! reply's `grpc-status`, and the metadata of the calls it answers itself.
//! Blocks pass on byte for byte where that keeps both ends' dynamic tables
//! equal, and are re-encoded without touching the receiver's table where not.
//!
//! Why that is sound. An HPACK decoder's dynamic table changes only by the
//! blocks it decodes, in their order on the connection (RFC 7541 §2.3.2, §4.2);
//! an encoder assumes its peer saw every block it sent. So:
//! - Upstream to client: every upstream block passes unchanged and in order,
//!   and the blocks the relay writes itself (the replies to the calls it owns)
//!   use no dynamic table: no insertion, no reference to a dynamic entry, no
//!   size update ([`Encoder`]). The client's table is then exactly what the
//!   upstream's encoder believes it is. SETTINGS pass through, so the upstream's
//!   encoder also obeys the client's SETTINGS_HEADER_TABLE_SIZE itself.
//! - Client to upstream: the relay drops the blocks of calls it owns and may
//!   change `:authority`. While neither has happened on a connection, the
//!   upstream has decoded exactly the client's blocks, so its table is the one
//!   the client's encoder assumes, and blocks pass unchanged. After the first
//!   dropped or changed block the two may differ (that block may have inserted
//!   entries the upstream never saw), so from then on every block is decoded
//!   with the client's context and re-encoded without the dynamic table: the
//!   upstream's table stays as it was and nothing refers to it.
//!
//! The decoders accept tables up to [`MAX_TABLE`] whatever the SETTINGS say:
//! the receiving peer enforces its own limit on the blocks it is sent, and the
//! relay only needs to follow along within a bound on its memory.
//!
//! The one field changed on the way is `:authority`. gRPC clients on a unix
//! socket send the socket's path there: the kubelet up to 1.27 bare
//! (`/run/…/x.sock`), gRPC C-core ≥ 1.57 (Python, C++, Ruby), grpc-java and
//! grpc-swift percent-encoded (`%2Frun%2F…`). Neither is a URI authority. Go's
//! servers take them; stricter ones, like the `h2` crate, reset the stream. An
//! `:authority` that is not a valid authority becomes `localhost`, which is what
//! newer crictl sends; everything else passes as it came.
//!
//! The codec is httlib-hpack. loona-hpack, used before, rebuilt its Huffman
//! decoding table (hash maps of all 257 codes) for every Huffman-coded string:
//! about 36 µs a string here, and tonic (h2) sends `:path` Huffman-coded on
//! every request because it never indexes it.

use bytes::BytesMut;
use httlib_hpack::{Decoder as HpackDecoder, Encoder as HpackEncoder};

use super::frame;

/// What an `:authority` that is not a valid URI authority is replaced with.
pub const SUBSTITUTE: &[u8] = b"localhost";
/// The largest table a peer may make us keep, whatever it asks for.
const MAX_TABLE: u32 = 64 << 10;
/// A header block larger than this is refused.
pub const MAX_BLOCK: usize = 1 << 20;

/// A field as decoded: name, value, and `NEVER_INDEXED` if the sender marked
/// it so (RFC 7541 §6.2.3: it must be passed on the same way).
pub type Field = (Vec<u8>, Vec<u8>, u8);
pub type Fields = Vec<Field>;
pub const NEVER_INDEXED: u8 = HpackDecoder::NEVER_INDEXED;

/// Follows one sender's HPACK context.
pub struct Decoder(HpackDecoder<'static>);

impl Default for Decoder {
    fn default() -> Self {
        // The table starts at the protocol's 4096 bytes; size updates may take
        // it up to MAX_TABLE.
        let mut d = HpackDecoder::default();
        d.set_max_dynamic_size(MAX_TABLE);
        Decoder(d)
    }
}

impl Decoder {
    pub fn decode(&mut self, mut block: Vec<u8>) -> std::io::Result<Fields> {
        if !complete(&block) {
            return Err(frame::bad("HPACK: a representation cut short"));
        }
        let mut out = Vec::with_capacity(16);
        self.0
            .decode(&mut block, &mut out)
            .map_err(|e| frame::bad(&format!("HPACK: {e:?}")))?;
        Ok(out)
    }
}

/// Whether every representation in `block` (RFC 7541 §6) is whole: its
/// integers end within the block and its strings are as long as they say.
/// httlib-hpack 0.1.3 indexes past the end of a block cut inside an integer or
/// before a string, and panics; the relay must answer that with an error.
fn complete(mut block: &[u8]) -> bool {
    while let Some(&first) = block.first() {
        let (prefix, strings) = match first {
            0x80.. => (7, 0),
            0x40.. => (6, 1),
            0x20.. => (5, 0),
            _ => (4, 1),
        };
        let Some((index, rest)) = integer(block, prefix) else {
            return false;
        };
        block = rest;
        // A literal with a new name (index 0) carries the name first.
        let strings = strings + usize::from(strings == 1 && index == 0);
        for _ in 0..strings {
            let Some((len, rest)) = block.first().and_then(|_| integer(block, 7)) else {
                return false;
            };
            let Some(rest) = rest.get(len as usize..) else {
                return false;
            };
            block = rest;
        }
    }
    true
}

/// An HPACK integer with a `prefix`-bit prefix at the start of `b` (RFC 7541
/// §5.1), at most 5 octets as httlib-hpack takes them, and what follows it.
fn integer(b: &[u8], prefix: u8) -> Option<(u32, &[u8])> {
    let mask = (1u32 << prefix) - 1;
    let mut value = u32::from(*b.first()?) & mask;
    if value < mask {
        return Some((value, &b[1..]));
    }
    for (i, &byte) in b.iter().enumerate().skip(1).take(4) {
        value += u32::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return Some((value, &b[i + 1..]));
        }
    }
    None
}

/// Encodes blocks that leave the receiver's dynamic table alone: fields are
/// static-table references or literals without indexing.
#[derive(Default)]
pub struct Encoder(HpackEncoder<'static>);

impl Encoder {
    pub fn encode(&mut self, fields: &Fields) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        for (n, v, flags) in fields {
            // BEST_FORMAT looks only at the static table here: this encoder's
            // dynamic table stays empty, as nothing is sent WITH_INDEXING.
            let how = match flags & NEVER_INDEXED {
                0 => HpackEncoder::BEST_FORMAT,
                _ => HpackEncoder::NEVER_INDEXED,
            };
            self.0
                .encode((n.clone(), v.clone(), how), &mut out)
                .expect("static-table references and literals always encode");
        }
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
        .find(|(n, _, _)| n.as_slice() == name.as_bytes())
        .map(|(_, v, _)| v.as_slice())
}

/// Replaces an `:authority` that is not a valid URI authority; true if it did.
pub fn fix_authority(fields: &mut Fields) -> bool {
    let mut fixed = false;
    for (name, value, _) in fields.iter_mut() {
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
        out.push((b":status".to_vec(), s.as_str().as_bytes().to_vec(), 0));
    }
    out.extend(map.iter().map(|(n, v)| {
        let never = if v.is_sensitive() { NEVER_INDEXED } else { 0 };
        (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec(), never)
    }));
    out
}

/// The regular (non-pseudo) fields as an `http` header map; fields `http`
/// cannot represent are left out.
pub fn to_http(fields: &Fields) -> http::HeaderMap {
    let mut map = http::HeaderMap::with_capacity(fields.len());
    for (n, v, flags) in fields.iter().filter(|(n, _, _)| !n.starts_with(b":")) {
        if let (Ok(n), Ok(mut v)) = (
            http::HeaderName::from_bytes(n),
            http::HeaderValue::from_bytes(v),
        ) {
            v.set_sensitive(flags & NEVER_INDEXED != 0);
            map.append(n, v);
        }
    }
    map
}

/// The client-to-upstream direction: the client's context, and whether its
/// blocks can still pass unchanged (see the module's notes).
pub struct Requests {
    decoder: Decoder,
    encoder: Encoder,
    /// No block of this connection has been withheld or changed yet.
    pristine: bool,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            decoder: Decoder::default(),
            encoder: Encoder::default(),
            pristine: true,
        }
    }
}

impl Requests {
    pub fn decode(&mut self, block: Vec<u8>) -> std::io::Result<Fields> {
        self.decoder.decode(block)
    }

    /// The block just decoded is not sent upstream (the relay answers its call).
    pub fn withheld(&mut self) {
        self.pristine = false;
    }

    /// What to send upstream for the block just decoded as `fields`, with its
    /// `:authority` made valid: `None` for the block as it came.
    pub fn forward(&mut self, fields: &mut Fields) -> Option<Vec<u8>> {
        if fix_authority(fields) {
            self.pristine = false;
        }
        (!self.pristine).then(|| self.encoder.encode(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec(), 0))
            .collect()
    }

    /// Names and values only: how a peer's decoder reports a block.
    fn pairs(f: &Fields) -> Vec<(Vec<u8>, Vec<u8>)> {
        f.iter().map(|(n, v, _)| (n.clone(), v.clone())).collect()
    }

    /// A small deterministic generator (xorshift), so failures repeat.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// A request or reply as gRPC peers send them: pseudo-fields and fields
    /// repeated from block to block (so encoders index and refer to them),
    /// values of every length (so tables fill and evict).
    fn random_fields(rng: &mut Rng, authority: &str) -> Fields {
        let mut f = fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", authority),
        ]);
        let paths = ["Version", "Status", "ListContainers", "ContainerStatus"];
        let path = format!("/runtime.v1.RuntimeService/{}", paths[rng.below(4)]);
        f.push((b":path".to_vec(), path.into_bytes(), 0));
        for _ in 0..rng.below(6) {
            let name = format!("x-meta-{}", rng.below(40));
            // Few enough pairs to repeat (and be referred to by index), large
            // enough to evict each other from a 4096-byte table.
            let value = format!("{}-{}", rng.below(3), "v".repeat(rng.below(4) * 100));
            f.push((name.into_bytes(), value.into_bytes(), 0));
        }
        f
    }

    fn loona_encode(e: &mut loona_hpack::Encoder, f: &Fields) -> Vec<u8> {
        e.encode(f.iter().map(|(n, v, _)| (n.as_slice(), v.as_slice())))
    }

    /// Encodes as a client whose strings are Huffman-coded and whose fields
    /// are all indexed (httlib's encoder: loona's codes no Huffman).
    fn huffman_encode(e: &mut HpackEncoder<'static>, f: &Fields) -> Vec<u8> {
        let how = HpackEncoder::BEST_FORMAT
            | HpackEncoder::WITH_INDEXING
            | HpackEncoder::HUFFMAN_NAME
            | HpackEncoder::HUFFMAN_VALUE;
        let mut out = Vec::new();
        for (n, v, _) in f {
            e.encode((n.clone(), v.clone(), how), &mut out).unwrap();
        }
        out
    }

    /// Blocks cut inside an integer or before a string's end: errors (the
    /// codec itself would index past the end of each).
    #[test]
    fn a_block_cut_short_is_an_error() {
        for block in [
            &[0x1f][..],
            &[0xff, 0x80],
            &[0x40],
            &[0x40, 0x85, b'a'],
            &[0x00, 0x01, b'a'],
            &[0x10, 0x7f],
            &[0x3f],
        ] {
            assert!(
                Decoder::default().decode(block.to_vec()).is_err(),
                "{block:?}"
            );
        }
        let whole = Encoder::default().encode(&fields(&[(":path", "/a"), ("x-b", "c")]));
        assert_eq!(Decoder::default().decode(whole).unwrap().len(), 2);
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

    /// Client encoder → relay → upstream decoder (loona-hpack, a codec other
    /// than the relay's), over many blocks: what the upstream decodes is what
    /// the client sent, with `:authority` made valid, whether the block passed
    /// as it came or was re-encoded, and with the relay's own calls taken out.
    /// `bad`: whether invalid authorities come too (else only withheld blocks
    /// stop blocks passing unchanged).
    fn requests_arrive_as_sent(mut encode: impl FnMut(&Fields) -> Vec<u8>, seed: u64, bad: bool) {
        let mut rng = Rng(seed);
        let mut upstream = loona_hpack::Decoder::new();
        let mut relay = Requests::default();
        let (mut verbatim, mut reencoded, mut withheld) = (0, 0, 0);
        for i in 0..600 {
            // Valid authorities first, so the first blocks pass unchanged.
            let authority = match (i < 40 || !bad, rng.below(3)) {
                (true, _) | (false, 0) => "localhost",
                (false, 1) => "/run/containerd/containerd.sock",
                _ => "%2Frun%2Fckpt-shim%2Fckpt-shim.sock",
            };
            let sent = random_fields(&mut rng, authority);
            let block = encode(&sent);
            let mut got = relay.decode(block.clone()).unwrap();
            assert_eq!(pairs(&got), pairs(&sent), "relay decoded block {i}");
            if i >= 60 && rng.below(8) == 0 {
                // A call the relay answers itself: the upstream never sees it.
                relay.withheld();
                withheld += 1;
                continue;
            }
            let onward = match relay.forward(&mut got) {
                None => {
                    verbatim += 1;
                    block
                }
                Some(b) => {
                    reencoded += 1;
                    b
                }
            };
            let mut want = sent.clone();
            fix_authority(&mut want);
            assert_eq!(
                upstream.decode(&onward).unwrap(),
                pairs(&want),
                "upstream decoded block {i}"
            );
        }
        assert!(verbatim >= 40 && reencoded > 400 && withheld > 30);
    }

    #[test]
    fn requests_keep_both_tables_in_step() {
        for (seed, bad) in [(0x9e37_79b9, true), (0x7f4a_7c15, false)] {
            let mut huffman = HpackEncoder::default();
            requests_arrive_as_sent(|f| huffman_encode(&mut huffman, f), seed, bad);
            let mut loona = loona_hpack::Encoder::new();
            requests_arrive_as_sent(|f| loona_encode(&mut loona, f), seed, bad);
        }
    }

    #[test]
    fn requests_pass_unchanged_until_one_is_changed_or_withheld() {
        for first in ["fix", "withhold"] {
            let mut client = loona_hpack::Encoder::new();
            let mut relay = Requests::default();
            let f = fields(&[(":authority", "localhost"), ("x-a", "1")]);
            let mut got = relay.decode(loona_encode(&mut client, &f)).unwrap();
            assert_eq!(relay.forward(&mut got), None);
            let bad = fields(&[(":authority", "/x.sock"), ("x-a", "1")]);
            let mut got = relay.decode(loona_encode(&mut client, &bad)).unwrap();
            match first {
                "fix" => assert!(relay.forward(&mut got).is_some()),
                _ => relay.withheld(),
            }
            let mut got = relay.decode(loona_encode(&mut client, &f)).unwrap();
            assert!(relay.forward(&mut got).is_some(), "after {first}");
        }
    }

    /// Upstream encoder → relay (reads, passes unchanged) → client decoder,
    /// with the relay's own blocks written in between: the client decodes
    /// both right, over enough blocks to evict entries many times.
    #[test]
    fn responses_pass_unchanged_beside_the_shims_own_blocks() {
        let mut rng = Rng(0x2545_f491);
        let mut upstream = loona_hpack::Encoder::new();
        let mut relay_reads = Decoder::default();
        let mut relay_writes = Encoder::default();
        let mut client = loona_hpack::Decoder::new();
        for i in 0..600 {
            let sent = random_fields(&mut rng, "localhost");
            let block = if rng.below(4) == 0 {
                relay_writes.encode(&sent)
            } else {
                let block = loona_encode(&mut upstream, &sent);
                let read = relay_reads.decode(block.clone()).unwrap();
                assert_eq!(pairs(&read), pairs(&sent), "relay read block {i}");
                block
            };
            assert_eq!(client.decode(&block).unwrap(), pairs(&sent), "block {i}");
        }
    }

    /// A table size update from the client (after the upstream lowered
    /// SETTINGS_HEADER_TABLE_SIZE) is followed by the relay, and one above
    /// what the relay keeps is refused.
    #[test]
    fn size_updates_are_followed_within_the_bound() {
        let mut client = loona_hpack::Encoder::new();
        let mut relay = Requests::default();
        let mut upstream = loona_hpack::Decoder::new();
        let f = fields(&[("x-a", &"a".repeat(200)), ("x-b", &"b".repeat(200))]);
        let first = loona_encode(&mut client, &f);
        relay.decode(first.clone()).unwrap();
        upstream.decode(&first).unwrap();
        client.set_max_table_size(256);
        let mut block = Vec::new();
        loona_hpack::encoder::encode_integer_into(256, 5, 0x20, &mut block).unwrap();
        block.extend(loona_encode(&mut client, &f));
        let mut got = relay.decode(block.clone()).unwrap();
        assert_eq!(relay.forward(&mut got), None);
        assert_eq!(upstream.decode(&block).unwrap(), pairs(&f));
        let mut huge = Vec::new();
        loona_hpack::encoder::encode_integer_into(1 << 20, 5, 0x20, &mut huge).unwrap();
        assert!(Decoder::default().decode(huge).is_err());
    }

    #[test]
    fn sensitive_fields_stay_never_indexed() {
        let mut f = fields(&[("authorization", "secret")]);
        f[0].2 = NEVER_INDEXED;
        let block = Encoder::default().encode(&f);
        // RFC 7541 §6.2.3: literal never indexed, the name from the static table.
        assert_eq!(block[0] & 0xf0, 0x10);
        let got = Decoder::default().decode(block).unwrap();
        assert_eq!(got[0].2 & NEVER_INDEXED, NEVER_INDEXED);
        assert!(to_http(&got)["authorization"].is_sensitive());
    }
}
