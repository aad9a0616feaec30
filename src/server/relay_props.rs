//! Property tests: the frame parser, the HPACK decoders and the relay itself
//! fed arbitrary bytes and arbitrary frame sequences from either side. None
//! may panic; every failure is a connection error with an RFC 9113 code (the
//! relay's other errors are I/O, which no batch of bytes can cause); and what
//! the relay writes to either peer is itself well-formed HTTP/2.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tokio::sync::mpsc;

use super::*;

/// Cases run, over all the properties in this module (printed by each).
static CASES: AtomicUsize = AtomicUsize::new(0);

/// Owns the calls whose method is `Own`, and answers them at once.
struct TestOwner;

impl Owner for TestOwner {
    fn owns(&self, path: &str) -> bool {
        path.ends_with("/Own")
    }
    fn call(self: Arc<Self>, _call: Call) -> ReplyFuture {
        Box::pin(async { Reply::status(tonic::Status::ok("")) })
    }
    fn watches(&self, path: &str) -> bool {
        path.ends_with("/Watch")
    }
}

/// A header block a gRPC client or server might send, or broken HPACK.
fn block() -> impl Strategy<Value = Vec<u8>> {
    let path = prop_oneof![Just("Version"), Just("Own"), Just("Watch"), Just("Other")];
    prop_oneof![
        3 => (path, any::<bool>(), "[a-z]{0,40}").prop_map(|(m, status, v)| {
            let f = |n: &str, v: &str| (n.as_bytes().to_vec(), v.as_bytes().to_vec(), 0u8);
            let fields = if status {
                vec![f(":status", "200"), f("grpc-status", "0"), f("x-v", &v)]
            } else {
                let p = format!("/runtime.v1.RuntimeService/{m}");
                vec![f(":method", "POST"), f(":path", &p), f(":authority", &v), f("x-v", &v)]
            };
            headers::Encoder::default().encode(&fields)
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

/// One frame: of any type (the known ones more often), any flags, a stream
/// among a few, and a payload that is either what the type carries or junk.
fn one_frame() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![8 => 0u8..=9, 1 => any::<u8>()];
    let payload = prop_oneof![
        2 => block(),
        2 => proptest::collection::vec(any::<u8>(), 0..24),
        1 => (0u32..3, any::<u32>()).prop_map(|(n, v)| {
            // SETTINGS entries, window increments, RST / GOAWAY codes.
            let mut p = Vec::new();
            for _ in 0..=n {
                p.extend_from_slice(&[0, (v % 7) as u8]);
                p.extend_from_slice(&(v >> 3).to_be_bytes());
            }
            p
        }),
    ];
    let stream = prop_oneof![4 => 0u32..8, 1 => any::<u32>()];
    let lie = prop_oneof![8 => Just(0i32), 1 => -3i32..100_000];
    (kind, any::<u8>(), stream, payload, lie).prop_map(|(kind, flags, stream, p, lie)| {
        let mut b = BytesMut::new();
        // A length field that may not match the payload that follows.
        let len = (p.len() as i32 + lie).clamp(0, (1 << 24) - 1) as usize;
        b.put_uint(len as u64, 3);
        b.put_u8(kind);
        b.put_u8(flags);
        b.put_u32(stream);
        b.extend_from_slice(&p);
        b.to_vec()
    })
}

/// A frame as a well-behaved gRPC peer sends it, so that sequences get past
/// the first check: a whole header block or DATA on a client stream, credit,
/// a PING, SETTINGS with a valid entry, a reset.
fn good_frame() -> impl Strategy<Value = Vec<u8>> {
    let stream = (0u32..5).prop_map(|n| 2 * n + 1);
    let kind = prop_oneof![
        3 => Just(frame::HEADERS),
        3 => Just(frame::DATA),
        1 => Just(frame::WINDOW_UPDATE),
        1 => Just(frame::PING),
        1 => Just(frame::SETTINGS),
        1 => Just(frame::RST_STREAM),
    ];
    let data = proptest::collection::vec(any::<u8>(), 0..40);
    (kind, stream, any::<bool>(), block(), data, 1u32..70_000).prop_map(
        |(kind, stream, end, block, data, n)| {
            let mut b = BytesMut::new();
            let end = if end { frame::END_STREAM } else { 0 };
            match kind {
                frame::HEADERS => frame::put_header_block(&mut b, stream, &block, end != 0, None),
                frame::DATA => frame::put_frame(&mut b, kind, end, stream, &data),
                frame::WINDOW_UPDATE => frame::put_window_update(&mut b, stream * (n & 1), n),
                frame::PING => frame::put_frame(&mut b, kind, 0, 0, &n.to_be_bytes().repeat(2)),
                frame::SETTINGS => frame::put_frame(&mut b, kind, 0, 0, &[0, 5, 0, 1, 0, 0]),
                _ => frame::put_rst_stream(&mut b, stream, frame::Reason::Cancel),
            }
            b.to_vec()
        },
    )
}

/// Frames as a peer sends them, cut into reads at arbitrary points.
fn reads() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    let frames = proptest::collection::vec(prop_oneof![2 => good_frame(), 1 => one_frame()], 0..24);
    let cuts = proptest::collection::vec(1usize..200, 0..8);
    (frames, cuts).prop_map(|(f, cuts)| (f.concat(), cuts))
}

/// Feeds `bytes` to the relay in reads cut at `cuts`, as from the client or
/// the upstream; stops at the first error, which must be a connection error.
fn feed(
    r: &mut Relay,
    reader: &mut frame::Reader,
    bytes: &[u8],
    cuts: &[usize],
    client: bool,
) -> bool {
    let mut rest = bytes;
    let mut cuts = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (*cuts.next().unwrap_or(&usize::MAX)).min(rest.len());
        reader.buf().extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        let result = match client {
            true => r.client_batch(reader, true),
            false => r.upstream_batch(reader),
        };
        match result {
            Ok(()) => {}
            Err(frame::Error::Connection { .. }) => return false,
            Err(e) => panic!("a batch of bytes caused {e}"),
        }
    }
    true
}

/// Every frame in `out` is whole and passes the checks the relay applies to
/// what it reads.
fn well_formed(out: &[u8]) {
    let out = out.strip_prefix(frame::PREFACE).unwrap_or(out);
    let mut reader = frame::Reader::new(false);
    reader.max = (1 << 24) - 1;
    reader.buf().extend_from_slice(out);
    while let Some(f) = reader.next().expect("a frame the relay wrote parses") {
        f.check().expect("a frame the relay wrote is well-formed");
    }
    assert!(reader.buf().is_empty(), "the relay wrote half a frame");
}

fn new_relay(reachable: bool) -> Relay {
    let (replies, _) = mpsc::unbounded_channel();
    let reach = match reachable {
        true => Reach::Upstream,
        false => Reach::Unreachable("test".into()),
    };
    Relay::new(Arc::new(TestOwner), reach, replies)
}

/// Runs `test` on `cases` values of `strategy`; how many ran (printed, and
/// added to the module's count).
fn run<S: Strategy>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value)) -> usize {
    let ran = AtomicUsize::new(0);
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    TestRunner::new(config)
        .run(&strategy, |v| {
            ran.fetch_add(1, Ordering::Relaxed);
            test(v);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let n = ran.load(Ordering::Relaxed);
    let total = CASES.fetch_add(n, Ordering::Relaxed) + n;
    println!("proptest {name}: {n} cases run ({total} in this binary so far)");
    n
}

/// The frame parser and every accessor on what it cuts out, on any bytes,
/// with or without the client preface first.
#[test]
fn the_parser_takes_any_bytes() {
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        reads().prop_map(|(b, _)| b),
    ];
    run(
        "parser",
        4000,
        (bytes, any::<bool>()),
        |(bytes, preface)| {
            let mut reader = frame::Reader::new(preface);
            if preface {
                reader.buf().extend_from_slice(frame::PREFACE);
            }
            reader.buf().extend_from_slice(&bytes);
            if reader.take_preface().is_ok() {
                while let Ok(Some(f)) = reader.next() {
                    let _ = (
                        f.check(),
                        f.data(),
                        f.header_fragment(),
                        f.code(),
                        f.last_stream(),
                    );
                    let _ = (f.settings().count(), f.window_increment());
                }
            }
        },
    );
}

/// The names and values of `f`: what a peer's decoder reports.
fn pairs(f: &Fields) -> Vec<(Vec<u8>, Vec<u8>)> {
    f.iter().map(|(n, v, _)| (n.clone(), v.clone())).collect()
}

/// The HPACK decoders on any blocks: fields or an error, never a panic; what
/// the client side re-encodes decodes again to the same fields.
#[test]
fn hpack_takes_any_block() {
    run(
        "hpack",
        4000,
        proptest::collection::vec(block(), 1..6),
        |blocks| {
            let mut requests = headers::Requests::default();
            let mut replies = headers::Decoder::default();
            let mut upstream = headers::Decoder::default();
            requests.withheld();
            for b in blocks {
                let _ = replies.decode(b.clone());
                if let Ok(mut fields) = requests.decode(b) {
                    let again = requests
                        .forward(&mut fields)
                        .expect("re-encoded once withheld");
                    let back = upstream
                        .decode(again)
                        .expect("what the relay encodes decodes");
                    assert_eq!(pairs(&back), pairs(&fields));
                }
            }
        },
    );
}

/// The relay, given any frames from both peers (the client's after its
/// preface), one side after the other: no panic, only connection errors, and
/// well-formed frames out to both.
#[test]
fn the_relay_takes_any_frame_sequence() {
    let reachable = prop_oneof![4 => Just(true), 1 => Just(false)];
    let input = (reads(), reads(), reachable, any::<bool>());
    run(
        "relay",
        3000,
        input,
        |(client, upstream, reachable, client_first)| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let _in = rt.enter();
            let mut r = new_relay(reachable);
            let mut from_client = frame::Reader::new(true);
            let mut from_upstream = frame::Reader::new(false);
            let client_bytes = [frame::PREFACE, &client.0].concat();
            let mut sides = [true, false];
            if !client_first {
                sides.reverse();
            }
            for side in sides {
                let alive = match side {
                    true => feed(&mut r, &mut from_client, &client_bytes, &client.1, true),
                    false if reachable => {
                        feed(&mut r, &mut from_upstream, &upstream.0, &upstream.1, false)
                    }
                    false => true,
                };
                if !alive {
                    break;
                }
            }
            well_formed(&r.to_client);
            well_formed(&r.to_upstream);
        },
    );
}
