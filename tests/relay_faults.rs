//! Faults at the relay, which the kubelet takes for a node fault: the upstream
//! runtime dying under calls in flight (a stand-in, and real containerd with a
//! checkpoint running), clients that vanish or reset, the upstream's resets and
//! GOAWAY, SETTINGS that change frame and HPACK table sizes, header blocks in
//! CONTINUATION frames, messages past 16 KiB and 4 MiB, a reader that stops,
//! many streams at once; and malformed HTTP/2 from Python's h2 layers
//! (tests/py/h2_abuse.py). After each, the shim holds what it held before:
//! fds, threads, relayed connections and calls of its own.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cri::{Client, Env};
use common::raw::{self, frame, frames::count_messages, Conn, Fake, FakeSettings};
use common::scrape::free_port;
use common::{go_client, PYTHON};
use k8s_cri::v1 as cri;

const RT: &str = "/runtime.v1.RuntimeService/";
/// A gRPC-framed VersionRequest{version: "v1"}, as the stand-in echoes it.
const VERSION: &[u8] = b"\x00\x00\x00\x00\x04\x0a\x02v1";

/// A shim in front of a stand-in upstream at `up`, its metrics on `port`.
struct Faked {
    _dir: tempfile::TempDir,
    up: PathBuf,
    fake: Fake,
    env: Env,
    port: u16,
}

fn faked() -> Faked {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upstream.sock");
    let fake = Fake::start(&up, FakeSettings::default());
    let port = free_port();
    let env = Env::start_faked(&up, &metrics(port));
    Faked {
        _dir: dir,
        up,
        fake,
        env,
        port,
    }
}

fn metrics(port: u16) -> String {
    format!("metrics_listen = \"127.0.0.1:{port}\"\n")
}

/// What a fault must not leave behind in the shim.
#[derive(Debug, Clone, PartialEq)]
struct Held {
    fds: usize,
    threads: usize,
    connections: f64,
    own_calls: f64,
    checkpoints: f64,
}

fn held(env: &Env, port: u16) -> Held {
    let fds = env.shim_fds();
    let (_, text) = common::scrape::get(port, "/metrics");
    Held {
        fds,
        threads: env.shim_threads(),
        connections: common::scrape::value(&text, "ckpt_shim_relay_connections"),
        own_calls: common::scrape::value(&text, "ckpt_shim_own_calls_in_flight"),
        checkpoints: common::scrape::value(&text, "ckpt_shim_checkpoints_in_flight"),
    }
}

/// What the shim's fds are, for a failure's message.
fn fds(env: &Env) -> Vec<String> {
    let dir = format!("/proc/{}/fd", env.shim_pid());
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| Some(std::fs::read_link(e.path()).ok()?.display().to_string()))
        .collect();
    v.sort();
    v
}

/// What the shim holds once it is idle: the same for a second (its start-up
/// checks run for a while after it listens).
async fn baseline(env: &Env, port: u16) -> Held {
    let t = Instant::now();
    let mut last = held(env, port);
    let mut same = 0;
    while same < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the shim never settles: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = held(env, port);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    eprintln!("baseline {last:?}: {:?}", fds(env));
    last
}

/// Waits until the shim holds what it held `before` (threads: no more; the
/// blocking pool lets idle ones go after 10 s).
async fn settled(env: &Env, port: u16, before: &Held) {
    settled_but(env, port, before, 0).await
}

/// As [`settled`], but up to `gone` fds fewer: the shim's own connections to an
/// upstream that was killed, made again only on use.
async fn settled_but(env: &Env, port: u16, before: &Held, gone: usize) {
    let t = Instant::now();
    loop {
        let now = held(env, port);
        let fewer = Held {
            threads: before.threads,
            fds: before.fds,
            ..now.clone()
        };
        let fds_ok = (before.fds - gone..=before.fds).contains(&now.fds);
        if fds_ok && now.threads <= before.threads && fewer == *before {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the shim holds {now:?}, and held {before:?} before: {:?}",
            fds(env)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(20), "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn py(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script)
}

/// A CRI client process in its `hold` mode (tests/fixtures/go-cri, tests/py/hold.py):
/// an ExecSync and a GetContainerEvents in flight on one connection.
struct Holder {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Holder {
    fn spawn(go: Option<&Path>, sock: &Path, id: &str) -> Holder {
        let mut cmd = match go {
            Some(bin) => {
                let mut c = Command::new(bin);
                c.arg(sock).arg("hold").arg(id);
                c
            }
            None => {
                let mut c = Command::new(PYTHON);
                c.arg(py("hold.py")).arg(sock).arg(id);
                c
            }
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(serde_json::from_str(&l).unwrap()).is_err() {
                    return;
                }
            }
        });
        let h = Holder { child, lines };
        assert_eq!(h.line()["call"], "started");
        h
    }

    /// The client's next line; a call that hangs fails the test here.
    fn line(&self) -> serde_json::Value {
        tokio::task::block_in_place(|| self.lines.recv_timeout(Duration::from_secs(30)))
            .expect("the client's calls hang")
    }

    /// How both calls in flight ended: call → code, as "unavailable" (Go says
    /// "Unavailable", Python "UNAVAILABLE").
    fn ended(&self) -> HashMap<String, String> {
        (0..2)
            .map(|_| {
                let l = self.line();
                let code = l["code"].as_str().unwrap().replace('_', "").to_lowercase();
                (l["call"].as_str().unwrap().to_string(), code)
            })
            .collect()
    }

    /// A Version call on the same client connection, once asked: its code.
    fn again(&mut self) -> String {
        writeln!(self.child.stdin.as_mut().unwrap()).unwrap();
        let l = self.line();
        assert_eq!(l["call"], "Version");
        l["code"].as_str().unwrap().to_uppercase()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kubelet's transport (grpc-go) and gRPC C-core each with an ExecSync and
/// an event stream in flight when the upstream dies: both end UNAVAILABLE at
/// once, not at their deadline, and the next call on the same client
/// connection works against the upstream that came back, with no shim restart.
#[tokio::test(flavor = "multi_thread")]
async fn calls_in_flight_end_unavailable_when_the_upstream_dies() {
    common::require(&["go", PYTHON]);
    let Faked {
        _dir,
        up,
        mut fake,
        env,
        port,
    } = faked();
    let go = go_client();
    let before = baseline(&env, port).await;
    for client in [Some(go.as_path()), None] {
        let mut h = Holder::spawn(client, &env.shim_sock, "c1");
        wait_for("both calls reach the upstream", || fake.live() == 2).await;
        fake.kill().await;
        let ended = h.ended();
        assert_eq!(ended["ExecSync"], "unavailable", "{client:?}: {ended:?}");
        assert_eq!(
            ended["GetContainerEvents"], "unavailable",
            "{client:?}: {ended:?}"
        );
        fake = Fake::start(&up, FakeSettings::default());
        assert_eq!(h.again(), "OK", "{client:?}");
    }
    // The shim's own connection to the upstream, made at its start, died with it.
    settled_but(&env, port, &before, 1).await;
}

async fn checkpoint(mut c: Client, id: String, location: PathBuf) -> Result<(), tonic::Status> {
    c.checkpoint_container(cri::CheckpointContainerRequest {
        container_id: id,
        location: location.to_string_lossy().into_owned(),
        timeout: 60,
    })
    .await
    .map(drop)
}

/// The shim's own connections to containerd (its typed client, and the one
/// it forwards restores' calls on) are made on use: use both, so that they
/// are there before a case and after it.
async fn use_own_connections(c: &mut Client) {
    let e = checkpoint(c.clone(), "no-such".into(), "/tmp/no-such.tar".into())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = c
        .remove_container(cri::RemoveContainerRequest {
            container_id: "no-such".into(),
        })
        .await;
    assert!(e.is_ok() || e.unwrap_err().code() == tonic::Code::NotFound);
}

/// containerd killed under a grpc-go ExecSync and a CheckpointContainer, and
/// started again on the same socket: the ExecSync ends UNAVAILABLE, the
/// checkpoint fails and is undone (container thawed, no archive, no staging),
/// and the same client connections work once containerd is back. Also 200
/// streams at once on one connection: containerd's grpc-go announces no
/// SETTINGS_MAX_CONCURRENT_STREAMS (its default is unlimited), and the relay
/// passes its SETTINGS on as they came.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_restarted_under_calls_and_a_checkpoint() {
    common::require(&["go"]);
    let port = free_port();
    let mut env = Env::start_configured(&metrics(port));
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "restart", false).await;
    let small = env.counter(&mut c, &pod, "small", 1, true).await;
    let big = env.counter(&mut c, &pod, "big", 256, true).await;
    let go = go_client();
    let calls = (0..200).map(|_| {
        let mut c = c.clone();
        async move { c.version(cri::VersionRequest::default()).await }
    });
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    use_own_connections(&mut c).await;
    let before = baseline(&env, port).await;

    let mut h = Holder::spawn(Some(&go), &env.shim_sock, &small);
    let out = common::out_dir();
    let call = tokio::spawn(checkpoint(
        env.client().await,
        big.clone(),
        out.path().join("c.tar"),
    ));
    wait_for("the checkpoint is under way", || {
        !common::entries(out.path()).is_empty()
    })
    .await;
    wait_for("ExecSync runs in the container", || {
        common::pgrep(&["-f", "^sleep 37$"])
    })
    .await;
    env.kill_containerd();
    let ended = h.ended();
    assert_eq!(ended["ExecSync"], "unavailable", "{ended:?}");
    // containerd 1.6 has no GetContainerEvents: it ended before, as it does
    // without the shim.
    assert_eq!(ended["GetContainerEvents"], "unimplemented", "{ended:?}");
    let e = call.await.unwrap().unwrap_err();
    wait_for("the checkpoint is undone", || {
        common::entries(out.path()).is_empty() && env.freezer(&big) == "THAWED"
    })
    .await;

    env.restart_containerd();
    upstream_answers(&env).await;
    assert_eq!(h.again(), "OK");
    drop(h);
    c.version(cri::VersionRequest::default()).await.unwrap();
    env.assert_running(&mut c, &big).await;
    use_own_connections(&mut c).await;
    assert!(
        env.shim_log().contains("cancelled by the caller"),
        "checkpoint ended with {e:?}: {}",
        env.shim_log()
    );
    settled(&env, port, &before).await;
}

/// Waits until the restarted containerd answers Version on its own socket:
/// its socket appears a moment before its CRI service does, and a call in
/// between is UNAVAILABLE with or without the shim.
async fn upstream_answers(env: &Env) {
    let t = Instant::now();
    loop {
        let mut up = common::cri::connect(&env.dir.join("containerd.sock")).await;
        if up.version(cri::VersionRequest::default()).await.is_ok() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "containerd never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that goes away mid-checkpoint without a word (its socket closed,
/// no RST_STREAM): the checkpoint stops and is undone as when it is cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_dropping_its_socket_mid_checkpoint_stops_it() {
    let port = free_port();
    let mut env = Env::start_configured(&metrics(port));
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "drop", false).await;
    let id = env.counter(&mut c, &pod, "big", 256, true).await;
    use_own_connections(&mut c).await;
    let before = baseline(&env, port).await;
    let out = common::out_dir();
    let req = prost::Message::encode_to_vec(&cri::CheckpointContainerRequest {
        container_id: id.clone(),
        location: out.path().join("d.tar").to_string_lossy().into_owned(),
        timeout: 60,
    });
    let mut conn = Conn::open(&env.shim_sock).await;
    conn.request(1, &format!("{RT}CheckpointContainer"), &frame(&req), true)
        .await;
    wait_for("the checkpoint is under way", || {
        !common::entries(out.path()).is_empty()
    })
    .await;
    drop(conn);
    // The staging goes before the task that removed it says why it stopped.
    wait_for("the checkpoint is undone and says why", || {
        common::entries(out.path()).is_empty()
            && env.freezer(&id) == "THAWED"
            && env.shim_log().contains("cancelled by the caller")
    })
    .await;
    assert!(
        env.shim_log().contains("cancelled by the caller"),
        "{}",
        env.shim_log()
    );
    env.assert_running(&mut c, &id).await;
    settled(&env, port, &before).await;
}

/// Streams that end early on either side: a client dropping its socket mid
/// stream and mid call, a client's RST_STREAM, the upstream's RST_STREAM and
/// GOAWAY. The upstream lets go of what the client left, the connection goes
/// on after a reset, and after a GOAWAY the client learns the last stream and
/// reconnects.
#[tokio::test(flavor = "multi_thread")]
async fn resets_disconnects_and_goaway_on_either_side() {
    let Faked {
        _dir,
        fake,
        env,
        port,
        ..
    } = faked();
    let before = baseline(&env, port).await;
    let events = format!("{RT}GetContainerEvents");
    let version = format!("{RT}Version");
    for method in ["GetContainerEvents", "ExecSync"] {
        let mut conn = Conn::open(&env.shim_sock).await;
        conn.request(1, &format!("{RT}{method}"), &frame(&[]), true)
            .await;
        wait_for("the call reaches the upstream", || fake.live() == 1).await;
        if method == "GetContainerEvents" {
            assert_eq!(count_messages(&conn.answer(1, 2).await.data), 2);
        }
        drop(conn);
        wait_for("the upstream lets go of the call", || fake.live() == 0).await;
    }

    let mut conn = Conn::open(&env.shim_sock).await;
    conn.request(1, &events, &frame(&[]), true).await;
    assert_eq!(count_messages(&conn.answer(1, 2).await.data), 2);
    conn.send(0x3, 0, 1, &8u32.to_be_bytes()).await; // RST_STREAM CANCEL
    wait_for("the upstream lets go of the reset stream", || {
        fake.live() == 0
    })
    .await;
    conn.request(3, &version, VERSION, true).await;
    let a = conn.answer(3, 0).await;
    assert_eq!((a.grpc_status(), a.data.as_slice()), (Some(0), VERSION));

    conn.request(5, &format!("{RT}Reset"), &frame(&[]), true)
        .await;
    let a = conn.answer(5, 0).await;
    assert!(a.reset.is_some() && a.goaway.is_none(), "{a:?}");
    conn.request(7, &version, VERSION, true).await;
    assert_eq!(conn.answer(7, 0).await.grpc_status(), Some(0));

    // The upstream drains: GOAWAY, the stream answered, then the connection ends.
    conn.request(9, &format!("{RT}Drain"), VERSION, true).await;
    let a = conn.answer(9, 0).await;
    assert_eq!(a.grpc_status(), Some(0), "{a:?}");
    let mut last = a.goaway.map(|g| g.0);
    while let Some((kind, _, _, p)) = conn.next().await {
        if kind == 0x7 {
            let id = u32::from_be_bytes(p[..4].try_into().unwrap());
            assert!(last.is_none_or(|l| id <= l), "GOAWAY's last stream grew");
            last = Some(id);
        }
    }
    assert_eq!(last, Some(9));
    let mut conn = Conn::open(&env.shim_sock).await;
    conn.request(1, &version, VERSION, true).await;
    assert_eq!(conn.answer(1, 0).await.grpc_status(), Some(0));
    drop(conn);
    settled(&env, port, &before).await;
}

/// Header blocks over 16 KiB (CONTINUATION frames both ways), messages over
/// 16 KiB and 4 MiB both ways, 200 streams on one connection against the
/// upstream's limit of 50, a reader that stops, and then SETTINGS that allow
/// 1 MiB frames and no HPACK dynamic table on both sides.
#[tokio::test(flavor = "multi_thread")]
async fn large_blocks_messages_frames_and_streams_cross_and_a_stalled_reader_blocks_nobody() {
    let Faked {
        _dir,
        fake,
        env,
        port,
        ..
    } = faked();
    let before = baseline(&env, port).await;
    let echo = format!("{RT}Echo");
    let big_header = "b".repeat(40 << 10);
    for settings in [
        FakeSettings::default(),
        FakeSettings {
            max_frame: Some(1 << 20),
            header_table: Some(0),
            max_streams: None,
        },
    ] {
        fake.set(settings);
        let mut send = raw::connect(&env.shim_sock, settings).await;
        for size in [20 << 10, 5 << 20] {
            let body = frame(&(0..size).map(|i| i as u8).collect::<Vec<_>>());
            let r = raw::send_call(&mut send, &echo, &[("x-big", &big_header)], body.clone()).await;
            assert_eq!(r.status(), Some(0), "{size}: {}", r.message());
            assert!(r.data == body, "{size} bytes came back changed");
            assert_eq!(r.headers.get("x-big").unwrap(), big_header.as_str());
            let r = raw::send_call(
                &mut send,
                &format!("{RT}Big"),
                &[("x-size", &size.to_string())],
                frame(&[]),
            )
            .await;
            assert_eq!(r.data.len(), size + 5);
        }
    }

    fake.set(FakeSettings {
        max_streams: Some(50),
        ..Default::default()
    });
    // One call first: streams opened before the upstream's SETTINGS arrive
    // are refused beyond its limit, through the shim as without it.
    let mut send = raw::connect(&env.shim_sock, FakeSettings::default()).await;
    raw::send_call(&mut send, &echo, &[], VERSION.to_vec()).await;
    let calls = (0..200u32).map(|i| {
        let mut send = send.clone();
        let body = frame(&i.to_be_bytes());
        async move {
            let r = raw::send_call(&mut send, &format!("{RT}Slow"), &[], body.clone()).await;
            (r.status(), r.data == body)
        }
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r, (Some(0), true));
    }
    assert_eq!(fake.count("Slow"), 200);
    drop(send);

    // A stalled reader: a stream whose body is never read, and a connection
    // that reads nothing at all; the rest goes on.
    let mut send = raw::connect(&env.shim_sock, FakeSettings::default()).await;
    let size = (8 << 20).to_string();
    let stalled = raw::start_call(
        &mut send,
        &format!("{RT}Big"),
        &[("x-size", &size)],
        frame(&[]),
    )
    .await;
    let mut deaf = Conn::open(&env.shim_sock).await;
    deaf.request(1, &format!("{RT}Big"), &frame(&[]), true)
        .await;
    let r = raw::send_call(&mut send, &echo, &[], VERSION.to_vec()).await;
    assert_eq!((r.status(), r.data.as_slice()), (Some(0), VERSION));
    let r = raw::call(&env.shim_sock, &echo, &[], VERSION.to_vec()).await;
    assert_eq!((r.status(), r.data.as_slice()), (Some(0), VERSION));
    drop((stalled, send, deaf));
    settled(&env, port, &before).await;
}

#[derive(Debug, PartialEq)]
enum Expect {
    /// Answered (grpc-status 0).
    Served,
    /// GOAWAY with this RFC 9113 code, and the connection closed.
    GoAway(u64),
    /// RST_STREAM with this code; the connection serves the next stream.
    Reset(u64),
}

/// RFC 9113's answer to each case in tests/py/h2_abuse.py.
fn expected(case: &str) -> Expect {
    use Expect::*;
    const PROTOCOL: u64 = 0x1;
    const FLOW_CONTROL: u64 = 0x3;
    const STREAM_CLOSED: u64 = 0x5;
    const FRAME_SIZE: u64 = 0x6;
    const COMPRESSION: u64 = 0x9;
    match case {
        "settings_header_table_0"
        | "padded_headers_and_data"
        | "unknown_frame_types"
        | "header_block_in_continuations"
        | "header_list_200_kib" => Served,
        "window_update_0_on_stream" => Reset(PROTOCOL),
        "priority_4_bytes" => Reset(FRAME_SIZE),
        "data_on_closed_stream" | "headers_on_closed_stream" => Reset(STREAM_CLOSED),
        "settings_length_not_6n"
        | "settings_ack_with_payload"
        | "ping_7_bytes"
        | "goaway_4_bytes"
        | "rst_stream_3_bytes"
        | "window_update_5_bytes"
        | "frame_over_max_frame_size"
        | "length_field_past_the_payload" => GoAway(FRAME_SIZE),
        "settings_window_too_large" | "window_update_overflow" => GoAway(FLOW_CONTROL),
        "bad_hpack_index" | "bad_hpack_table_update" | "header_list_2_mib" => GoAway(COMPRESSION),
        _ => GoAway(PROTOCOL),
    }
}

/// Malformed and adversarial HTTP/2, each on a connection of its own, while a
/// gRPC C-core client on another connection calls Version after each case.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_http2_gets_the_rfc_answer_and_everyone_else_is_served() {
    common::require(&[PYTHON]);
    let Faked {
        _dir, env, port, ..
    } = faked();
    let before = baseline(&env, port).await;
    let out = tokio::task::block_in_place(|| {
        Command::new(PYTHON)
            .arg(py("h2_abuse.py"))
            .arg(&env.shim_sock)
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cases.len(), 40, "{cases:?}");
    for c in &cases {
        let name = c["case"].as_str().unwrap();
        let got = match (c["goaway"].as_u64(), c["reset"].as_u64()) {
            (Some(code), _) if c["closed"] == true => Expect::GoAway(code),
            (None, Some(code)) if c["after"] == 0 => Expect::Reset(code),
            (None, None) if c["status"] == 0 => Expect::Served,
            _ => panic!("{name}: {c}"),
        };
        assert_eq!(got, expected(name), "{name}: {c}");
        assert_eq!(
            c["version"], "OK",
            "{name}: the other client was not served"
        );
    }
    settled(&env, port, &before).await;
    eprintln!("{} malformed-input cases over a socket", cases.len());
}
