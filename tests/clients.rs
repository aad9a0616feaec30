//! CRI clients that behave differently from ours, through the shim in front of a
//! real containerd, each compared with the same client straight to containerd:
//! - the kubelet's transport: grpc-go (Debian's), dialling the bare socket path,
//!   which becomes the `:authority` (kubelet ≤ 1.27);
//! - gRPC C-core: Python grpcio with default options, which percent-encodes it;
//! - raw HTTP/2 frames carrying either form.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::cri::Env;
use common::raw::{self, frame};
use common::{go_client, PYTHON};
use k8s_cri::v1 as cri;
use prost::Message;

/// One JSON line per call, from either client; codes compared by name.
#[derive(Debug, PartialEq)]
struct Answer {
    call: String,
    code: String,
    message: String,
    detail: String,
}

fn answers(out: &std::process::Output) -> Vec<Answer> {
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let detail = ["runtime_name", "containers", "events"]
                .iter()
                .filter_map(|k| v.get(*k).map(|x| x.to_string()))
                .collect::<Vec<_>>()
                .join(",");
            Answer {
                call: v["call"].as_str().unwrap().into(),
                // Go says "Unimplemented", Python "UNIMPLEMENTED".
                code: v["code"].as_str().unwrap().replace('_', "").to_lowercase(),
                message: v["message"].as_str().unwrap().into(),
                detail,
            }
        })
        .collect()
}

/// Both answer the same, but for CheckpointContainer, which containerd 1.6
/// lacks and the shim has.
fn assert_same_but_checkpoint(shim: &[Answer], direct: &[Answer], archive: &Path) {
    assert_eq!(shim.len(), 4, "{shim:?}");
    assert_eq!(shim[..3], direct[..3]);
    assert_eq!(shim[0].detail, "\"containerd\"");
    assert_eq!(
        (shim[3].call.as_str(), shim[3].code.as_str()),
        ("CheckpointContainer", "ok"),
        "{shim:?}"
    );
    assert_eq!(direct[3].code, "unimplemented", "{direct:?}");
    let m = std::fs::metadata(archive).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid()), (0o600, 0));
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    assert!(ar
        .entries()
        .unwrap()
        .any(|e| e.unwrap().path().unwrap() == Path::new("checkpoint/inventory.img")));
}

async fn counting_container(env: &mut Env) -> String {
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "clients", false).await;
    env.counter(&mut c, &pod, "counter", 1, true).await
}

#[tokio::test(flavor = "multi_thread")]
async fn kubelet_transport_and_grpc_core_get_containerds_answers() {
    common::require(&["go", PYTHON]);
    let mut env = Env::start();
    let id = counting_container(&mut env).await;
    let out = common::out_dir();
    let go = go_client();
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/cri_client.py");
    for (name, cmd) in [
        ("go", vec![go.clone()]),
        ("python", vec![PYTHON.into(), py]),
    ] {
        let run = |sock: &Path, loc: &Path| {
            let mut c = Command::new(&cmd[0]);
            c.args(&cmd[1..]);
            if name == "go" {
                c.arg(sock).arg("calls");
            } else {
                c.arg(sock);
            }
            c.arg(&id).arg(loc).output().unwrap()
        };
        let archive = out.path().join(format!("{name}.tar"));
        let direct = answers(&run(&env.containerd_sock, &out.path().join("unused.tar")));
        let shim = answers(&run(&env.shim_sock, &archive));
        assert_same_but_checkpoint(&shim, &direct, &archive);
    }
    let mut c = env.client().await;
    env.assert_running(&mut c, &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_frames_with_socket_path_authorities_checkpoint_through_the_shim() {
    let mut env = Env::start();
    let id = counting_container(&mut env).await;
    let out = common::out_dir();
    let version = frame(
        &cri::VersionRequest {
            version: "v1".into(),
        }
        .encode_to_vec(),
    );
    let path = "/runtime.v1.RuntimeService/";
    for (i, authority) in [
        env.shim_sock.to_string_lossy().into_owned(),
        env.shim_sock.to_string_lossy().replace('/', "%2F"),
    ]
    .into_iter()
    .enumerate()
    {
        let via = raw::frames::call(
            &env.shim_sock,
            &authority,
            &format!("{path}Version"),
            &version,
            0,
        )
        .await;
        let direct = raw::frames::call(
            &env.containerd_sock,
            &authority,
            &format!("{path}Version"),
            &version,
            0,
        )
        .await;
        assert_eq!(
            (via.reset, via.grpc_status()),
            (None, Some(0)),
            "{authority}: {via:?}"
        );
        assert_eq!(via.data, direct.data, "{authority}");
        let archive = out.path().join(format!("raw-{i}.tar"));
        let req = cri::CheckpointContainerRequest {
            container_id: id.clone(),
            location: archive.to_string_lossy().into_owned(),
            timeout: 60,
        };
        let a = raw::frames::call(
            &env.shim_sock,
            &authority,
            &format!("{path}CheckpointContainer"),
            &frame(&req.encode_to_vec()),
            0,
        )
        .await;
        assert_eq!(
            (a.reset, a.grpc_status()),
            (None, Some(0)),
            "{authority}: {a:?}"
        );
        assert!(archive.is_file());
    }
}

/// grpc-go answers every DATA it receives with a BDP PING. Replies the shim
/// writes itself are DATA that containerd never sent, and containerd's grpc-go
/// server strikes a PING that follows none of its own HEADERS or DATA: when the
/// relay forwarded PINGs, the fourth such call in a row brought GOAWAY
/// `too_many_pings`, and grpc-go dialled again (or failed the call in flight).
/// The relay answers PINGs itself, so one connection carries them all.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_go_pings_after_the_shims_own_replies_keep_the_connection() {
    common::require(&["go"]);
    let env = Env::start();
    let go = go_client();
    let out = Command::new(&go)
        .arg(&env.shim_sock)
        .args(["owned", "12"])
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), 12, "{lines:?}");
    for l in &lines {
        assert_eq!(
            (l["code"].as_str(), l["dials"].as_i64()),
            (Some("OK"), Some(1)),
            "{lines:?}"
        );
    }
}
