//! The checkpoint engine on real runc containers and real CRIU: checkpoint while
//! running, restore (ours and `runc restore`), bad input, failures and deadlines.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_shim::checkpoint::locate;
use ckpt_shim::checkpoint::{checkpoint, Options};
use ckpt_shim::restore::restore;
use ckpt_shim::Error;
use common::*;

fn opts(location: &Path) -> Options {
    checkpoint_opts(location)
}

/// `opts`, staged or with CRIU's images streamed straight into the archive.
fn mode_opts(location: &Path, stream: bool) -> Options {
    Options {
        stream,
        ..opts(location)
    }
}

/// A counter container touching `mib` MiB.
fn start_mib(id: &str, mib: u32) -> Runc {
    Runc::start_with(
        id,
        Spec {
            mib,
            ..Default::default()
        },
    )
}

/// Nothing in `dir`: no archive, temp file or staging.
fn assert_left_nothing(dir: &Path) {
    assert_eq!(
        entries(dir),
        Vec::<String>::new(),
        "archive or staging left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_keeps_running_and_both_restores_continue_the_count() {
    cycle("engine-main", "engine-m", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_checkpoint_keeps_running_and_both_restores_continue_the_count() {
    cycle("engine-stream", "engine-st", true).await;
}

/// The pages held in memory during the pause: all of them, the first MiB held
/// and the rest written through, or none; streamed and staged.
#[tokio::test(flavor = "multi_thread")]
async fn held_pages_make_the_same_archive_and_both_restores_continue_the_count() {
    use ckpt_shim::checkpoint::hold::{Budget, HoldPages, Policy};
    for (id, mib, stream) in [
        ("engine-hold-all", 1024, true),
        ("engine-hold-part", 1, true),
        ("engine-hold-none", 0, true),
        ("engine-hold-staged", 1024, false),
    ] {
        cycle_with(
            id,
            id,
            Options {
                hold: Budget::new(Policy {
                    pages: HoldPages::Mib(mib),
                    ..Default::default()
                }),
                ..mode_opts(Path::new("/"), stream)
            },
        )
        .await;
    }
}

async fn cycle(id: &str, prefix: &str, stream: bool) {
    cycle_with(id, prefix, mode_opts(Path::new("/"), stream)).await
}

/// Checkpoint with `o` (its location aside), check the archive, then restore it
/// both ways and see the count go on.
async fn cycle_with(id: &str, prefix: &str, o: Options) {
    let stream = o.stream;
    require(&["runc", "criu", "cc"]);
    let c = Runc::start(id);
    c.exec("echo written-before-checkpoint > /root/newfile && rm /bin/vi");
    // A second process (reparented to the container's init): two sets of page
    // images, one after the other in the stream.
    c.exec("sleep 1000 </dev/null >/dev/null 2>&1 &");
    let out = out_dir();
    let archive = out.path().join("ckpt.tar");
    let found = locate::from_runtime_root(&c.root, prefix).unwrap();
    assert_eq!(found.pid, c.pid());
    let before = c.count().unwrap();
    let o = Options {
        location: archive.clone(),
        ..o
    };
    let report = checkpoint(&found, &o).await.unwrap();
    let after = c.count().unwrap();
    assert_eq!(report.streamed, stream);
    match o.hold.policy().pages {
        ckpt_shim::checkpoint::hold::HoldPages::Mib(0) => {
            assert_eq!(report.pages_held, 0);
            assert!(report.frozen_written > 1 << 20, "{report:?}");
        }
        // Held whole (streamed: the first pages image; staged: every image).
        ckpt_shim::checkpoint::hold::HoldPages::Mib(1024)
        | ckpt_shim::checkpoint::hold::HoldPages::Auto => {
            assert!(report.pages_held > 1 << 20, "{report:?}");
            assert!(report.frozen_written < 1 << 20, "{report:?}");
        }
        // The first MiB held, the rest spliced in while frozen.
        b => {
            assert!(report.pages_held > 0, "nothing held with {b:?}");
            assert!(report.frozen_written > 0, "{report:?}");
        }
    }
    report.cleanup.wait();

    // The original keeps running, unfrozen.
    c.assert_running();
    // Root-only from the start, and nothing else left in the directory.
    let meta = std::fs::symlink_metadata(&archive).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.uid()),
        (0o600, 0),
        "archive mode/owner"
    );
    assert_eq!(entries(out.path()), vec!["ckpt.tar"]);
    let m = members(&archive);
    for want in [
        "spec.dump",
        "config.dump",
        "checkpoint/inventory.img",
        "checkpoint/descriptors.json",
        "stats-dump",
        "dump.log",
        "rootfs-diff.tar",
        "deleted.files",
    ] {
        assert!(
            m.iter().any(|(n, _)| n == want),
            "{want} missing from {m:?}"
        );
    }
    assert!(
        m.iter().any(|(n, t)| n == "checkpoint/" && t.is_dir()),
        "no checkpoint/ directory entry"
    );
    assert!(
        m.iter()
            .all(|(n, _)| !n.starts_with('/') && !n.starts_with("./")),
        "names must be relative: {m:?}"
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&member_bytes(&archive, "config.dump")).unwrap();
    assert_eq!(cfg["id"], id);
    assert!(
        chrono::DateTime::parse_from_rfc3339(cfg["checkpointedTime"].as_str().unwrap()).is_ok()
    );
    assert_eq!(
        member_bytes(&archive, "spec.dump"),
        std::fs::read(c.bundle.join("config.json")).unwrap()
    );
    let deleted: Vec<String> =
        serde_json::from_slice(&member_bytes(&archive, "deleted.files")).unwrap();
    assert_eq!(deleted, vec!["/bin/vi"]);
    let inspect = ckpt_shim::inspect::inspect(&archive).unwrap();
    assert!(
        inspect
            .stats
            .as_ref()
            .and_then(|s| s.pages_written)
            .unwrap_or(0)
            > 0,
        "CRIU stats: {:?}",
        inspect.stats
    );

    // Every page image is in the archive, 4 KiB-aligned (reflink-ready) when large.
    let mut ar = tar::Archive::new(std::fs::File::open(&archive).unwrap());
    let pages: Vec<(u64, u64)> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            e.path()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint/pages-")
        })
        .map(|e| (e.size(), e.raw_file_position()))
        .collect();
    assert!(
        pages.iter().any(|(len, _)| *len >= 1 << 20),
        "no pages image holds the touched MiB: {pages:?}"
    );
    assert!(pages.len() >= 2, "one pages image per process: {pages:?}");
    assert!(
        pages
            .iter()
            .all(|(len, at)| *len < 64 << 10 || at % 4096 == 0),
        "{pages:?}"
    );

    // Our restore, into a fresh overlay of the same image.
    c.kill();
    let target = tempfile::tempdir().unwrap();
    let ov = Overlay::new(target.path());
    // The new container's config, which the restore is held against: the same.
    std::fs::copy(
        c.bundle.join("config.json"),
        target.path().join("config.json"),
    )
    .unwrap();
    let restored_id = format!("{id}-restored");
    let pid = restore(&restore_opts(
        &archive,
        target.path(),
        &restored_id,
        Default::default(),
    ))
    .await
    .unwrap();
    // It runs in a cgroup of its own, named by its ID, beside the original's.
    let restored_cg = format!(
        "{}/{id}-restored",
        Path::new(&c.cgroup).parent().unwrap().display()
    );
    let guard = Restored {
        pid,
        cgroup: restored_cg,
    };
    guard.assert_in_own_cgroup();
    assert_resumed(&ov.rootfs, before, after);
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    assert_eq!(
        children.split_whitespace().count(),
        1,
        "the second process was not restored under init"
    );
    assert_eq!(
        std::fs::read_to_string(ov.rootfs.join("root/newfile")).unwrap(),
        "written-before-checkpoint\n"
    );
    assert!(!ov.rootfs.join("bin/vi").exists(), "deleted file came back");
    drop(guard);
    drop(ov);

    // `runc restore` accepts the same images.
    let x = tempfile::tempdir().unwrap();
    ckpt_shim::restore::extract(&archive, x.path()).unwrap();
    let rb = tempfile::tempdir().unwrap();
    let ov = Overlay::new(rb.path());
    std::fs::copy(x.path().join("spec.dump"), rb.path().join("config.json")).unwrap();
    ckpt_shim::restore::apply_rootfs_diff(x.path(), &ov.rootfs).unwrap();
    let state = rb.path().join("state");
    let mut runc = Command::new("runc")
        .arg("--root")
        .arg(&state)
        .args(["restore", "-d", "--image-path"])
        .arg(x.path().join("checkpoint"))
        .arg("--work-path")
        .arg(x.path().join("work"))
        .arg(format!("{id}-runc"))
        .current_dir(rb.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The restored process inherits the pipe; keep reading it so it never blocks.
    let mut pipe = runc.stdout.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut pipe, &mut std::io::sink()));
    let st = runc.wait().unwrap();
    let cleanup = scopeguard_runc(state.clone(), format!("{id}-runc"), c.cgroup.clone());
    assert!(st.success(), "runc restore failed");
    let first = wait_count(&ov.rootfs, |_| true);
    assert!(
        // As common::restore::continues, the count file read: the dump may
        // come between the counter's write of `before` and its next count.
        first >= before && first <= after + 3,
        "runc-restored count {first}, dump saw {before}..{after}"
    );
    wait_count(&ov.rootfs, |v| v >= first + 3);
    assert!(ov.rootfs.join("root/newfile").exists() && !ov.rootfs.join("bin/vi").exists());
    drop(cleanup);
}

fn scopeguard_runc(root: PathBuf, id: String, cgroup: String) -> impl Drop {
    struct G(PathBuf, String, String);
    impl Drop for G {
        fn drop(&mut self) {
            let r = self.0.display();
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "runc --root {r} kill {0} KILL; sleep 0.2; runc --root {r} delete -f {0}",
                    self.1
                ))
                .stderr(Stdio::null())
                .status();
            remove_cgroup(&self.2);
        }
    }
    G(root, id, cgroup)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_a_typed_error_and_leaves_nothing_behind() {
    require(&["runc", "criu", "cc"]);
    let a = Runc::start("amb-1");
    let out = out_dir();
    let ok = |l: &str| -> PathBuf { out.path().join(l) };

    assert!(matches!(
        locate::from_runtime_root(&a.root, "nope"),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        locate::from_runtime_root(&a.root, "../x"),
        Err(Error::InvalidArgument(_))
    ));
    let found = locate::from_runtime_root(&a.root, "amb").unwrap();

    std::fs::write(ok("exists.tar"), b"keep me").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", ok("link.tar")).unwrap();
    std::os::unix::fs::symlink("/nonexistent", ok("dangling.tar")).unwrap();
    std::fs::create_dir(ok("dir.tar")).unwrap();
    let before = entries(out.path());
    let cases: Vec<(PathBuf, &str)> = vec![
        (PathBuf::from("relative.tar"), "invalid"),
        (PathBuf::new(), "invalid"),
        (out.path().join("missing-dir/x.tar"), "invalid"),
        (ok("exists.tar"), "exists"),
        (ok("link.tar"), "exists"),
        (ok("dangling.tar"), "exists"),
        (ok("dir.tar"), "exists"),
    ];
    for (loc, kind) in cases {
        let err = checkpoint(&found, &opts(&loc)).await.unwrap_err();
        match (kind, &err) {
            ("invalid", Error::InvalidArgument(_)) | ("exists", Error::AlreadyExists(_)) => {}
            _ => panic!("{}: expected {kind}, got {err:?}", loc.display()),
        }
        assert_eq!(
            entries(out.path()),
            before,
            "{}: something was left behind",
            loc.display()
        );
        a.assert_running();
    }
    assert_eq!(std::fs::read(ok("exists.tar")).unwrap(), b"keep me");
    assert_eq!(
        std::fs::read_link(ok("link.tar")).unwrap(),
        Path::new("/etc/passwd")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ambiguous_prefix_and_stopped_container_are_refused() {
    require(&["runc", "criu", "cc"]);
    let a = Runc::start("prefix-one");
    // A second container in the same runc root, from the same bundle.
    let st = Command::new("runc")
        .arg("--root")
        .arg(&a.root)
        .args(["run", "-d", "prefix-two"])
        .current_dir(&a.bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let two = scopeguard_runc(a.root.clone(), "prefix-two".into(), a.cgroup.clone());
    match locate::from_runtime_root(&a.root, "prefix-") {
        Err(Error::Ambiguous { matches, .. }) => {
            assert_eq!(matches, vec!["prefix-one", "prefix-two"])
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    assert_eq!(
        locate::from_runtime_root(&a.root, "prefix-o").unwrap().id,
        "prefix-one"
    );
    // Stopped but not deleted: state.json remains, the process is gone.
    let st = Command::new("runc")
        .arg("--root")
        .arg(&a.root)
        .args(["kill", "prefix-two", "KILL"])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    loop {
        match locate::from_runtime_root(&a.root, "prefix-two") {
            Err(Error::NotRunning { .. }) => break,
            other => assert!(
                t.elapsed() < Duration::from_secs(5),
                "expected NotRunning, got {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(two);
}

#[tokio::test(flavor = "multi_thread")]
async fn criu_failure_mid_dump_thaws_and_cleans_up() {
    criu_failure("engine-fail", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_criu_failure_mid_dump_thaws_and_cleans_up() {
    criu_failure("engine-sfail", true).await;
}

async fn criu_failure(id: &str, stream: bool) {
    require(&["runc", "criu", "cc"]);
    // stdout on a host file outside the container: CRIU fails after seizing the tasks.
    let c = Runc::start_with(
        id,
        Spec {
            stdout_file: true,
            ..Default::default()
        },
    );
    let out = out_dir();
    let found = locate::from_runtime_root(&c.root, &c.id).unwrap();
    let o = mode_opts(&out.path().join("x.tar"), stream);
    let err = checkpoint(&found, &o).await.unwrap_err();
    match &err {
        Error::Criu(criu_rpc::Error::Failed { log_tail, .. })
        | Error::Criu(criu_rpc::Error::Exited { log_tail, .. }) => {
            assert!(log_tail.contains("Error"), "log tail: {log_tail}")
        }
        other => panic!("expected a CRIU failure, got {other:?}"),
    }
    assert!(err.to_string().contains("CRIU log tail"), "{err}");
    assert_left_nothing(out.path());
    c.assert_running();
}

#[tokio::test(flavor = "multi_thread")]
async fn deadline_during_dump_thaws_and_leaves_nothing() {
    deadline_during_dump("engine-deadline", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_deadline_during_dump_thaws_and_leaves_nothing() {
    deadline_during_dump("engine-sdeadline", true).await;
}

async fn deadline_during_dump(id: &str, stream: bool) {
    require(&["runc", "criu", "cc"]);
    // 256 MiB cannot be dumped in 50 ms here (page cache writes at ~3 GB/s at best).
    let c = start_mib(id, 256);
    let out = out_dir();
    let found = locate::from_runtime_root(&c.root, &c.id).unwrap();
    let mut o = mode_opts(&out.path().join("x.tar"), stream);
    o.deadline = Some(Instant::now() + Duration::from_millis(50));
    let err = checkpoint(&found, &o).await.unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded(_)), "{err:?}");
    // No CRIU left behind (it ends within its grace), and then nothing else either.
    let t = Instant::now();
    while criu_running() {
        assert!(t.elapsed() < Duration::from_secs(15), "CRIU still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_left_nothing(out.path());
    c.assert_running();
}

#[tokio::test(flavor = "multi_thread")]
async fn full_disk_is_no_space_and_leaves_nothing() {
    full_disk("engine-full", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_full_disk_is_no_space_and_leaves_nothing() {
    full_disk("engine-sfull", true).await;
}

/// 64 MiB of memory into a 16 MiB file system: the disk fills mid-dump.
async fn full_disk(id: &str, stream: bool) {
    require(&["runc", "criu", "cc"]);
    let c = start_mib(id, 64);
    let out = out_dir();
    let small = out.path().join("small");
    std::fs::create_dir(&small).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=16m,mode=0700 ckpt-full {}",
        small.display()
    ));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let found = locate::from_runtime_root(&c.root, &c.id).unwrap();
    let o = mode_opts(&small.join("x.tar"), stream);
    let err = checkpoint(&found, &o).await.unwrap_err();
    let shown = err.to_string();
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::ResourceExhausted,
        "{shown}"
    );
    assert_left_nothing(&small);
    c.assert_running();
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_container_is_dumped_and_stays_paused() {
    require(&["runc", "criu", "cc"]);
    let c = Runc::start("engine-paused");
    assert!(Command::new("runc")
        .arg("--root")
        .arg(&c.root)
        .args(["pause", &c.id])
        .status()
        .unwrap()
        .success());
    let out = out_dir();
    let found = locate::from_runtime_root(&c.root, &c.id).unwrap();
    let r = checkpoint(&found, &opts(&out.path().join("p.tar")))
        .await
        .unwrap();
    assert!(r.was_paused);
    r.cleanup.wait();
    assert_eq!(c.freezer(), "FROZEN");
    assert_eq!(c.status(), "paused");
    assert_eq!(entries(out.path()), vec!["p.tar"]);
    assert!(Command::new("runc")
        .arg("--root")
        .arg(&c.root)
        .args(["resume", &c.id])
        .status()
        .unwrap()
        .success());
    c.assert_running();
}

#[test]
fn cli_checkpoint_and_inspect() {
    require(&["runc", "criu", "cc"]);
    let c = Runc::start("engine-cli");
    let out = out_dir();
    let archive = out.path().join("cli.tar");
    let bin = env!("CARGO_BIN_EXE_ckpt-shim");
    let o = Command::new(bin)
        .arg("checkpoint")
        .arg("--runtime-root")
        .arg(&c.root)
        .arg("engine-cli")
        .arg("--output")
        .arg(&archive)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        entries(out.path()),
        vec!["cli.tar"],
        "staging left after the command exited"
    );
    c.assert_running();
    let o = Command::new(bin)
        .arg("inspect")
        .arg(&archive)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && text.contains("engine-cli")
            && text.contains("memory pages")
            && text.contains("frozen"),
        "{text}"
    );
    // A failing command says why and exits non-zero.
    let o = Command::new(bin)
        .arg("checkpoint")
        .arg("--runtime-root")
        .arg(&c.root)
        .arg("nope")
        .arg("--output")
        .arg(out.path().join("y.tar"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_checkpoint_future_thaws_and_cleans_up() {
    dropped_checkpoint("engine-cancel", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_streamed_checkpoint_thaws_and_cleans_up() {
    dropped_checkpoint("engine-scancel", true).await;
}

async fn dropped_checkpoint(id: &str, stream: bool) {
    require(&["runc", "criu", "cc"]);
    let c = start_mib(id, 256);
    let out = out_dir();
    let found = locate::from_runtime_root(&c.root, &c.id).unwrap();
    let o = mode_opts(&out.path().join("x.tar"), stream);
    // Dropped while CRIU is writing 256 MiB: the caller went away.
    let res = tokio::time::timeout(Duration::from_millis(40), checkpoint(&found, &o)).await;
    assert!(
        res.is_err(),
        "the checkpoint should still have been running"
    );
    // The work winds down by itself: CRIU ends, the container is thawed, nothing stays.
    let t = Instant::now();
    while !(entries(out.path()).is_empty() && c.freezer() == "THAWED" && !criu_running()) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "left behind: {:?}, freezer {}",
            entries(out.path()),
            c.freezer()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.assert_running();
}

fn criu_running() -> bool {
    common::pgrep(&["-x", "criu"])
}
