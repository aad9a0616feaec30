//! The proxy forwards raw bytes: unknown fields, metadata, deadlines, status
//! codes and streams cross the shim unchanged. Against a recording upstream, so
//! what arrives can be compared byte for byte; and against real containerd.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::cri::Env;
use common::raw::{self, frame};
use k8s_cri::v1 as cri;
use prost::Message;

fn reply(path: &str, body: &[u8]) -> (i32, &'static str, Vec<Vec<u8>>) {
    match path {
        // An error code from upstream must come back unchanged.
        "/runtime.v1.RuntimeService/ListPodSandbox" => (9, "upstream-says-no", vec![]),
        // A server stream of three events.
        "/runtime.v1.RuntimeService/GetContainerEvents" => (
            0,
            "",
            (1..=3)
                .map(|i| {
                    frame(
                        &cri::ContainerEventResponse {
                            container_id: format!("c{i}"),
                            ..Default::default()
                        }
                        .encode_to_vec(),
                    )
                })
                .collect(),
        ),
        "/runtime.v1.RuntimeService/ListContainers" => (
            0,
            "",
            vec![frame(
                &cri::ListContainersResponse::default().encode_to_vec(),
            )],
        ),
        // Everything else: echo the request's message back.
        _ => (0, "", vec![body.to_vec()]),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_bytes_metadata_deadlines_codes_and_streams_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upstream.sock");
    let seen = raw::recorder(&up, reply);
    let env = Env::start_with_upstream(Some(&up));

    // The socket is root-only: 0660 root:root in a 0750 directory.
    let m = std::fs::metadata(&env.shim_sock).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o660, 0, 0));
    assert_eq!(
        std::fs::metadata(env.shim_sock.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o750
    );

    // A request with a field no CRI version defines (99) survives byte for byte.
    let mut msg = cri::ContainerStatusRequest {
        container_id: "abc".into(),
        verbose: true,
    }
    .encode_to_vec();
    msg.extend([0x98, 0x06, 0x2a]); // field 99, varint 42
    let body = frame(&msg);
    let r = raw::call(
        &env.shim_sock,
        "/runtime.v1.RuntimeService/ContainerStatus",
        &[("x-test-meta", "hello"), ("grpc-timeout", "5S")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status(), Some(0));
    assert_eq!(r.data, body, "response bytes changed on the way back");
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(s.path, "/runtime.v1.RuntimeService/ContainerStatus");
    assert_eq!(s.body, body, "request bytes changed on the way");
    assert_eq!(s.headers.get("x-test-meta").unwrap(), "hello");
    assert_eq!(s.headers.get("grpc-timeout").unwrap(), "5S");

    // Status codes from upstream come back unchanged, through a real CRI client too.
    let mut c = env.client().await;
    let err = c
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::FailedPrecondition, "upstream-says-no")
    );

    // A server-streaming method streams.
    let mut stream = c
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(ev) = stream.message().await.unwrap() {
        ids.push(ev.container_id);
    }
    assert_eq!(ids, ["c1", "c2", "c3"]);

    // CheckpointContainer is the shim's own: it asks upstream to list containers
    // and never forwards the checkpoint itself.
    let err = c
        .checkpoint_container(cri::CheckpointContainerRequest {
            container_id: "nope".into(),
            location: "/tmp/x.tar".into(),
            timeout: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let paths: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert!(paths.contains(&"/runtime.v1.RuntimeService/ListContainers".to_string()));
    assert!(
        !paths.iter().any(|p| p.ends_with("/CheckpointContainer")),
        "{paths:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_is_unavailable_and_a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    let env = Env::start_with_upstream(Some(&missing));
    let mut c = env.client().await;
    let err = c.version(cri::VersionRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // Connections that end are let go of.
    let before = env.shim_fds();
    for _ in 0..20 {
        let mut c = env.client().await;
        assert!(c.version(cri::VersionRequest::default()).await.is_err());
    }
    let t = std::time::Instant::now();
    while env.shim_fds() > before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} fds, {before} before",
            env.shim_fds()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A second shim on a live socket refuses to start; on a stale one it takes over.
    let bin = env!("CARGO_BIN_EXE_ckpt-shim");
    let up = format!("unix://{}", missing.display());
    let o = std::process::Command::new(bin)
        .args(["serve", "--listen"])
        .arg(&env.shim_sock)
        .args(["--upstream", &up])
        .output()
        .unwrap();
    assert!(!o.status.success(), "a second shim took over a live socket");
    let stale = dir.path().join("stale/shim.sock");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--listen"])
        .arg(&stale)
        .args(["--upstream", &up])
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&stale).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "shim did not replace the stale socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_answers_the_same_through_the_shim_as_directly() {
    let env = Env::start();
    let mut via = env.client().await;
    let mut direct = common::cri::connect(&env.containerd_sock).await;
    let a = via
        .version(cri::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    let b = direct
        .version(cri::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a, b);
    let a = via
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let b = direct
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    // containerd's conditions, then the shim's own (tests/ops.rs checks its value).
    let (mut a, b) = (a.status.unwrap().conditions, b.status.unwrap().conditions);
    assert_eq!(
        a.pop().map(|c| c.r#type).as_deref(),
        Some("CheckpointReady")
    );
    assert_eq!(a, b);
    // A streaming method: whatever containerd answers (events, or UNIMPLEMENTED on
    // 1.6), the shim answers the same.
    let codes = |r: Result<
        tonic::Response<tonic::Streaming<cri::ContainerEventResponse>>,
        tonic::Status,
    >| match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    let a = codes(
        tokio::time::timeout(
            Duration::from_secs(5),
            via.get_container_events(cri::GetEventsRequest {}),
        )
        .await
        .unwrap(),
    );
    let b = codes(
        tokio::time::timeout(
            Duration::from_secs(5),
            direct.get_container_events(cri::GetEventsRequest {}),
        )
        .await
        .unwrap(),
    );
    assert_eq!(a, b);
    let err = via
        .container_status(cri::ContainerStatusRequest {
            container_id: "missing".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    let err2 = direct
        .container_status(cri::ContainerStatusRequest {
            container_id: "missing".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.message()), (err2.code(), err2.message()));
}

/// The `:authority` values real clients send on a unix socket, and what a strict
/// upstream should get: the kubelet up to 1.27 sends the bare path, gRPC C-core
/// ≥ 1.57 and grpc-java percent-encode it, some send none; valid ones, like
/// newer crictl's `localhost`, are kept.
fn authorities(sock: &std::path::Path) -> Vec<(String, &'static str)> {
    let bare = sock.to_string_lossy().into_owned();
    let encoded = bare.replace('/', "%2F");
    vec![
        (bare, "localhost"),
        (encoded, "localhost"),
        (String::new(), "localhost"),
        ("localhost".into(), "localhost"),
        ("runtime.invalid:1".into(), "runtime.invalid:1"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_authority_reaches_forwarded_native_and_streaming_calls() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upstream.sock");
    let seen = raw::recorder(&up, reply);
    let env = Env::start_with_upstream(Some(&up));
    let msg = frame(
        &cri::ContainerStatusRequest {
            container_id: "abc".into(),
            verbose: true,
        }
        .encode_to_vec(),
    );
    for (authority, upstream_gets) in authorities(&env.shim_sock) {
        // Forwarded unary: the bytes come back, and the upstream (a strict
        // HTTP/2 server itself) got a valid authority.
        let a = raw::frames::call(
            &env.shim_sock,
            &authority,
            "/runtime.v1.RuntimeService/ContainerStatus",
            &msg,
            0,
        )
        .await;
        assert_eq!(
            (a.reset, a.grpc_status()),
            (None, Some(0)),
            "{authority:?}: {a:?}"
        );
        assert_eq!(a.data, msg, "{authority:?}");
        let s = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(s.body, msg);
        assert_eq!(s.authority.as_deref(), Some(upstream_gets), "{authority:?}");
        // A server stream.
        let a = raw::frames::call(
            &env.shim_sock,
            &authority,
            "/runtime.v1.RuntimeService/GetContainerEvents",
            &frame(&[]),
            0,
        )
        .await;
        assert_eq!(
            (a.reset, a.grpc_status()),
            (None, Some(0)),
            "{authority:?}: {a:?}"
        );
        assert_eq!(raw::frames::count_messages(&a.data), 3, "{authority:?}");
        // The shim's own method: it resolves through the upstream, which lists none.
        let req = cri::CheckpointContainerRequest {
            container_id: "nope".into(),
            location: "/tmp/x.tar".into(),
            timeout: 0,
        };
        let a = raw::frames::call(
            &env.shim_sock,
            &authority,
            "/runtime.v1.RuntimeService/CheckpointContainer",
            &frame(&req.encode_to_vec()),
            0,
        )
        .await;
        assert_eq!(
            (a.reset, a.grpc_status()),
            (None, Some(5)),
            "{authority:?}: {a:?}"
        );
    }
}
