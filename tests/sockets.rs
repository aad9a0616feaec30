//! Sockets through CRI: a container holding TCP, UDP and unix sockets,
//! checkpointed with CheckpointContainer as the kubelet calls it (no options)
//! and restored with CreateContainer into a new pod, in front of a real
//! containerd whose runc is ckpt-runc. The rules: docs/sockets.md.
//!
//! The pods here get their network from tests/fixtures/cni/ckpt-loopback: a network
//! namespace of their own with only `lo`, and 127.0.0.2 as the pod's
//! address. So nothing outside a pod is reachable from it: a peer "outside
//! the pod" is another container of the old pod, left behind, or a server
//! of the test's on the host's loopback, dialled from a pod on the node's
//! network.

mod common;

use cri_client::pods as cri_pods;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cri::{checkpoint, container_pid, create, probe_config, start_container, Client, Env};
use common::{out_dir, wait_count};
use k8s_cri::v1 as cri;

/// tests/fixtures/workloads/sockets.c, built into a dir the containers mount at /probe.
fn workload() -> tempfile::TempDir {
    common::require(&["cc", "iptables-save", "ip6tables-save", "nsenter"]);
    let dir = tempfile::tempdir().unwrap();
    common::fixture(dir.path(), "sockets");
    dir
}

/// The sockets workload with `args` as container `name`.
fn config(name: &str, probe: &Path, args: &[&str], host_network: bool) -> cri::ContainerConfig {
    probe_config(name, (probe, "sockets"), args, host_network)
}

/// A server on port 9000 and a client dialling it over the pod's loopback.
fn server_and_client(probe: &Path) -> (cri::ContainerConfig, cri::ContainerConfig) {
    let server = config("server", probe, &["serve", "9000"], false);
    let client = config("client", probe, &["dial", "127.0.0.1", "9000"], false);
    (server, client)
}

/// `cfg`'s container restored from `archive` (its bind mount declared again).
fn restored(cfg: &cri::ContainerConfig, archive: &Path) -> cri::ContainerConfig {
    let mut cfg = cfg.clone();
    cfg.image = Some(cri::ImageSpec {
        image: archive.to_string_lossy().into_owned(),
        ..Default::default()
    });
    cfg
}

/// Creates and starts `cfg` in `pod`: its ID and its process.
async fn run(
    c: &mut Client,
    pod: &(String, cri::PodSandboxConfig),
    cfg: cri::ContainerConfig,
) -> (String, i32) {
    let id = create(c, pod, cfg).await;
    start_container(c, &id).await;
    let pid = container_pid(c, &id).await;
    (id, pid)
}

fn log_of(pod: &cri::PodSandboxConfig, name: &str) -> PathBuf {
    Path::new(&pod.log_directory).join(format!("{name}.log"))
}

/// Waits (20 s at most) for `log`'s text to give what `pick` takes from it.
fn wait_text<T>(log: &Path, pick: impl Fn(&str) -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(v) = pick(&text) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}: {text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `log` to have a line that `pick` takes.
fn wait_log<T>(log: &Path, pick: impl Fn(&str) -> Option<T>) -> T {
    wait_text(log, |text| text.lines().find_map(&pick))
}

/// The number after `word` in a log line ("pair 12 port 4000": 12).
fn number_after(line: &str, word: &str) -> Option<u64> {
    line.split_once(word)?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `f` on a thread in the network namespace of `pid`; what it opens
/// stays there.
fn in_netns<T: Send>(pid: i32, f: impl FnOnce() -> T + Send) -> T {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// One request to a `serve` on an open connection: its answer, the count.
fn ask(s: &mut TcpStream) -> u64 {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"ping\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim()
        .parse()
        .unwrap_or_else(|_| panic!("answer {line:?}"))
}

/// One datagram to a `serve` at `addr`: its answer.
fn ask_udp(addr: SocketAddr) -> u64 {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.send_to(b"ping", addr).unwrap();
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).trim().parse().unwrap()
}

async fn pod_ip(c: &mut Client, pod: &str) -> String {
    let s = c
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    s.status.unwrap().network.unwrap().ip
}

/// What of a network lock is in the network namespace of `pid`: CRIU's
/// chain, and any rule that drops (CRIU's lock and the restore's hold of
/// loopback connections both do), as iptables and ip6tables list them.
fn lock_rules(pid: i32) -> Vec<String> {
    ["iptables-save", "ip6tables-save"]
        .iter()
        .flat_map(|cmd| {
            common::sh(&format!("nsenter --net=/proc/{pid}/ns/net {cmd}"))
                .lines()
                .filter(|l| l.contains("CRIU") || l.contains("DROP"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A server listening on 0.0.0.0 (TCP and UDP), with a client connected:
/// CheckpointContainer as the kubelet calls it refuses it with the old
/// default (`tcp_established = false`), takes it with the new one, leaves
/// no lock behind, and the restored server, in a new pod, answers a client
/// of the new pod's address, counting on from what it had served.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_a_client_is_checkpointed_by_default_and_serves_in_a_new_pod() {
    let mut env = Env::start_configured("tcp_established = false\n");
    let mut c = env.client().await;
    let probe = workload();
    let cfg = config("server", probe.path(), &["serve", "8080"], false);
    let pod = env.run_pod(&mut c, "serve", false).await;
    let (id, pid) = run(&mut c, &pod, cfg.clone()).await;
    wait_log(&log_of(&pod.1, "server"), |l| {
        l.contains("listening").then_some(())
    });
    let mut client = in_netns(pid, || TcpStream::connect("127.0.0.1:8080").unwrap());
    let served = ask(&mut client);
    // A connection waiting in a listener's queue, as clients of a frozen
    // server do: CRIU refuses it unless told to leave it (`skip_in_flight`).
    let _queued = in_netns(pid, || TcpStream::connect("127.0.0.1:8081").unwrap());

    let out = out_dir();
    let err = checkpoint(&mut c, &id, &out.path().join("off.tar"))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("consider using --tcp-established"),
        "{err:?}"
    );
    // The default, which the kubelet gets.
    std::fs::write(&env.config, "").unwrap();
    env.kill_shim();
    env.spawn_shim();
    let mut c = env.client().await;
    let archive = out.path().join("server.tar");
    checkpoint(&mut c, &id, &archive).await.unwrap();
    assert_eq!(lock_rules(pid), Vec::<String>::new(), "the lock stayed");
    assert_eq!(ask(&mut client), served + 1, "the original serves on");
    let mut again = in_netns(pid, || TcpStream::connect("127.0.0.1:8080").unwrap());
    assert_eq!(ask(&mut again), served + 2);

    let pod2 = env.run_pod(&mut c, "serve2", false).await;
    let (_, pid2) = run(&mut c, &pod2, restored(&cfg, &archive)).await;
    let addr: SocketAddr = format!("{}:8080", pod_ip(&mut c, &pod2.0).await)
        .parse()
        .unwrap();
    let (tcp, udp) = in_netns(pid2, move || {
        let mut s = TcpStream::connect(addr).unwrap();
        (ask(&mut s), ask_udp(addr))
    });
    assert_eq!((tcp, udp), (served + 1, served + 2), "at {addr}");
}

/// Both ends of a TCP connection over loopback in one container: restored
/// connected into a new pod, the same socket (its port) carries the next
/// number, and nothing of the restore's hold stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_within_one_container_comes_back_connected() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let probe = workload();
    let cfg = config("pair", probe.path(), &["pair", "7000"], false);
    let pod = env.run_pod(&mut c, "pair", false).await;
    let (id, _) = run(&mut c, &pod, cfg.clone()).await;
    let port = wait_log(&log_of(&pod.1, "pair"), |l| number_after(l, " port "));
    wait_count(&env.rootfs(&id), |v| v >= 3);
    let out = out_dir();
    let archive = out.path().join("pair.tar");
    let before = env.count(&id).unwrap();
    checkpoint(&mut c, &id, &archive).await.unwrap();
    let after = env.count(&id).unwrap();

    let pod2 = env.run_pod(&mut c, "pair2", false).await;
    let (id2, pid2) = run(&mut c, &pod2, restored(&cfg, &archive)).await;
    let log = log_of(&pod2.1, "pair");
    let (first, port2) = wait_log(&log, |l| {
        Some((number_after(l, "pair ")?, number_after(l, " port ")?))
    });
    assert!(
        first > before && first <= after + 1,
        "went on at {first}, the checkpoint saw {before}..{after}"
    );
    assert_eq!(port2, port, "not the same connection");
    wait_count(&env.rootfs(&id2), |v| v > first + 5);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("broken"), "{text}");
    assert_eq!(lock_rules(pid2), Vec::<String>::new(), "still held");
}

/// A client whose server is another container of its pod, left behind:
/// restored into a new pod, its connection is closed (it reads EOF or its
/// write fails) rather than held for a peer that never comes, and it
/// connects again to the new pod's server and counts on.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_to_a_peer_left_behind_is_reset_and_the_client_reconnects() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let probe = workload();
    let (server, client) = server_and_client(probe.path());
    let pod = env.run_pod(&mut c, "dial", false).await;
    run(&mut c, &pod, server.clone()).await;
    let (id, _) = run(&mut c, &pod, client.clone()).await;
    wait_count(&env.rootfs(&id), |v| v >= 3);
    let (counts, archive, _out) = checkpointed(&env, &mut c, &id).await;

    let pod2 = env.run_pod(&mut c, "dial2", false).await;
    run(&mut c, &pod2, server).await;
    let (id2, pid2) = run(&mut c, &pod2, restored(&client, &archive)).await;
    assert_reconnects(&env, &log_of(&pod2.1, "client"), &id2, counts);
    assert_eq!(lock_rules(pid2), Vec::<String>::new(), "held");
}

/// CheckpointContainer of `id` (a workload counting in /tmp/count) into a
/// fresh dir: the counts just before and after, the archive, the dir.
async fn checkpointed(
    env: &Env,
    c: &mut Client,
    id: &str,
) -> ((u64, u64), PathBuf, tempfile::TempDir) {
    let out = out_dir();
    let archive = out.path().join("ckpt.tar");
    let before = env.count(id).unwrap();
    checkpoint(c, id, &archive).await.unwrap();
    ((before, env.count(id).unwrap()), archive, out)
}

/// The restored `dial` in `log` saw its connection end, at a number past
/// the checkpoint's (the one it was at, or the next if that one's answer
/// had come in), then connected again and counts on.
fn assert_reconnects(env: &Env, log: &Path, id: &str, (before, after): (u64, u64)) {
    let reset = wait_log(log, |l| number_after(l, "reset at "));
    assert!(
        reset > before && reset <= after + 2,
        "reset at {reset}, the checkpoint saw {before}..{after}"
    );
    let on = wait_text(log, |text| {
        let rest = &text[text.find("reset at")?..];
        let rest = &rest[rest.find("connected port")?..];
        rest.lines().find_map(|l| number_after(l, "dial "))
    });
    assert_eq!(on, reset + 1, "counted on from the reset");
    wait_count(&env.rootfs(id), |v| v > on + 3);
}

/// A server of the test's on the host's loopback, answering each read with
/// a line, on a thread of its own for as long as the test runs.
fn host_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    line.clear();
                    if w.write_all(b"1\n").is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A client in a pod on the node's network, connected to a server outside
/// the pod (the test's, on the host's loopback): restored into a new pod,
/// while the original runs on, its connection is closed and it connects
/// again to the same server. The restore policy is on: containerd has the
/// container join the pause's network namespace (the host's) by path.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_out_of_the_pod_is_reset_and_the_client_reconnects() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let probe = workload();
    let port = host_server().to_string();
    let client = config("client", probe.path(), &["dial", "127.0.0.1", &port], true);
    let pod = env.run_pod(&mut c, "out", true).await;
    let (id, _) = run(&mut c, &pod, client.clone()).await;
    wait_count(&env.rootfs(&id), |v| v >= 3);
    let (counts, archive, _out) = checkpointed(&env, &mut c, &id).await;

    let pod2 = env.run_pod(&mut c, "out2", true).await;
    let (id2, _) = run(&mut c, &pod2, restored(&client, &archive)).await;
    assert_reconnects(&env, &log_of(&pod2.1, "client"), &id2, counts);
    let now = env.count(&id).unwrap();
    wait_count(&env.rootfs(&id), |v| v > now + 2);
}

/// Stream, datagram and seqpacket unix sockets, each bound to an abstract
/// name and to a path, in one container: restored into a new pod, every one
/// carries the next number.
#[tokio::test(flavor = "multi_thread")]
async fn unix_sockets_of_every_kind_carry_on_after_a_restore() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let probe = workload();
    let cfg = config("unix", probe.path(), &["unix"], false);
    let pod = env.run_pod(&mut c, "unix", false).await;
    let (id, _) = run(&mut c, &pod, cfg.clone()).await;
    wait_count(&env.rootfs(&id), |v| v >= 3);
    let ((before, after), archive, _out) = checkpointed(&env, &mut c, &id).await;

    let pod2 = env.run_pod(&mut c, "unix2", false).await;
    let (id2, _) = run(&mut c, &pod2, restored(&cfg, &archive)).await;
    let log = log_of(&pod2.1, "unix");
    let first = wait_log(&log, |l| number_after(l, "unix "));
    assert!(
        first > before && first <= after + 1,
        "went on at {first}, the checkpoint saw {before}..{after}"
    );
    wait_count(&env.rootfs(&id2), |v| v > first + 5);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("broken"), "{text}");
}

/// A CRIU that fails half-way through the dump, after it locked the pod's
/// network (a UDP socket corked with a datagram pending, which CRIU cannot
/// dump): no lock is left, and the container serves on.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_dump_leaves_no_lock_and_the_pod_its_network() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let probe = workload();
    let cfg = config(
        "server",
        probe.path(),
        &["serve", "8080", "0", "cork"],
        false,
    );
    let pod = env.run_pod(&mut c, "fail", false).await;
    let (id, pid) = run(&mut c, &pod, cfg).await;
    wait_log(&log_of(&pod.1, "server"), |l| {
        l.contains("listening").then_some(())
    });
    let mut client = in_netns(pid, || TcpStream::connect("127.0.0.1:8080").unwrap());
    let served = ask(&mut client);
    let out = out_dir();
    let err = checkpoint(&mut c, &id, &out.path().join("x.tar"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    assert!(err.message().contains("corked"), "{err:?}");
    assert_eq!(lock_rules(pid), Vec::<String>::new(), "the lock stayed");
    assert_eq!(ask(&mut client), served + 1);
    let mut again = in_netns(pid, || TcpStream::connect("127.0.0.1:8080").unwrap());
    assert_eq!(ask(&mut again), served + 2);
    // A lock that a CRIU killed mid-dump left (the shim's reaper kills one
    // that outlives its grace) goes with the pod's next dump, even a failed
    // one: CRIU's unlock removes the jumps to its chain (its own and one
    // more), then the chain.
    plant_criu_lock(pid);
    assert!(!lock_rules(pid).is_empty());
    checkpoint(&mut c, &id, &out.path().join("y.tar"))
        .await
        .unwrap_err();
    assert_eq!(lock_rules(pid), Vec::<String>::new(), "the old lock stayed");
}

/// The lock CRIU puts in a pod's network namespace (criu/net.c,
/// `iptables_network_lock_internal`), as a CRIU killed before unlocking
/// leaves it.
fn plant_criu_lock(pid: i32) {
    const LOCK: &str = "*filter\n:CRIU - [0:0]\n-I INPUT -j CRIU\n-I OUTPUT -j CRIU\n\
        -A CRIU -m mark --mark 0xC114 -j ACCEPT\n-A CRIU -j DROP\nCOMMIT\n";
    for cmd in ["iptables-restore", "ip6tables-restore"] {
        let mut p = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args([cmd, "-w", "--noflush"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin.take().unwrap().write_all(LOCK.as_bytes()).unwrap();
        assert!(p.wait().unwrap().success(), "{cmd}");
    }
}

/// The shim killed (SIGKILL) while CRIU holds the pod's network locked:
/// CRIU loses its client, aborts and unlocks, and the next shim thaws the
/// container, which serves on its connection and new ones.
#[tokio::test(flavor = "multi_thread")]
async fn a_shim_killed_mid_dump_leaves_no_lock() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let probe = workload();
    let cfg = config("server", probe.path(), &["serve", "8080", "512"], false);
    let pod = env.run_pod(&mut c, "kill", false).await;
    let (id, pid) = run(&mut c, &pod, cfg).await;
    wait_log(&log_of(&pod.1, "server"), |l| {
        l.contains("listening").then_some(())
    });
    let mut client = in_netns(pid, || TcpStream::connect("127.0.0.1:8080").unwrap());
    let served = ask(&mut client);
    let out = out_dir();
    let (mut c2, id2, loc) = (c.clone(), id.clone(), out.path().join("k.tar"));
    let call = tokio::spawn(async move { checkpoint(&mut c2, &id2, &loc).await });
    common::cri::wait_seized(pid, &call).await;
    let criu = common::cri::tracer(pid);
    let t = Instant::now();
    while !lock_rules(pid).iter().any(|l| l.contains("-j CRIU")) {
        assert!(
            !call.is_finished(),
            "the dump ended before its lock was seen"
        );
        assert!(t.elapsed() < Duration::from_secs(20), "no lock");
    }
    env.kill_shim();
    assert!(call.await.unwrap().is_err());
    let t = Instant::now();
    while Path::new(&format!("/proc/{criu}")).exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "CRIU did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lock_rules(pid), Vec::<String>::new(), "the lock stayed");
    env.spawn_shim();
    let t = Instant::now();
    while env.freezer(&id) != "THAWED" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still {}",
            env.freezer(&id)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ask(&mut client), served + 1);
    let mut again = in_netns(pid, || TcpStream::connect("127.0.0.1:8080").unwrap());
    assert_eq!(ask(&mut again), served + 2);
}

/// CheckpointPod, as called with no options: one CRIU per container, each
/// locking the same namespace. No lock is left, and the pod's connection
/// goes on without a reset.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_checkpoint_leaves_no_lock() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let probe = workload();
    let (server, client) = server_and_client(probe.path());
    let pod = env.run_pod(&mut c, "podlock", false).await;
    let (a, pid) = run(&mut c, &pod, server).await;
    let (b, _) = run(&mut c, &pod, client).await;
    wait_count(&env.rootfs(&b), |v| v >= 3);
    let out = out_dir();
    let req = cri_pods::CheckpointPodRequest {
        pod_sandbox_id: pod.0.clone(),
        output_path: out.path().to_string_lossy().into_owned(),
        container_ids: vec![a, b.clone()],
        options: Default::default(),
    };
    cri_pods::checkpoint_pod(env.channel().await, req, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(lock_rules(pid), Vec::<String>::new(), "the lock stayed");
    let now = env.count(&b).unwrap();
    wait_count(&env.rootfs(&b), |v| v > now + 3);
    let log = std::fs::read_to_string(log_of(&pod.1, "client")).unwrap();
    assert!(!log.contains("reset"), "{log}");
}
