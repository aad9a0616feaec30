//! criu-rpc against the real CRIU 4.2.1 that hack/setup.sh installs. No mocks.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criu_rpc::proto::{Features, Opts};
use criu_rpc::{ack_all, Criu, Error, Notify};

fn criu() -> Criu {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root: run them as root after `hack/setup.sh`"
    );
    let out = Command::new("criu").arg("--version").output();
    let ok = out
        .as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("Version: 4.2.1"))
        .unwrap_or(false);
    assert!(
        ok,
        "CRIU 4.2.1 is not the `criu` in PATH ({out:?}): run `hack/setup.sh` as root"
    );
    Criu::new("criu")
}

/// Builds tests/fixtures/workloads/counter.c once per test binary.
fn counter_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/workloads/counter.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("counter");
        let st = Command::new("cc")
            .args(["-O2", "-static", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("cc (hack/setup.sh installs it)");
        assert!(st.success(), "building {src:?} failed");
        out
    })
    .clone()
}

/// A counter in its own session (so CRIU needs no shell-job), stdio on /dev/null.
struct Counter {
    child: Option<Child>,
    file: PathBuf,
}

impl Counter {
    fn start(dir: &Path) -> Counter {
        let file = dir.join("count");
        let mut cmd = Command::new(counter_binary());
        cmd.arg(&file)
            .arg("1")
            .arg("50")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/");
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        let c = Counter {
            child: Some(cmd.spawn().unwrap()),
            file,
        };
        c.wait_for(|v| v >= 3);
        c
    }
    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    fn read(&self) -> Option<u64> {
        std::fs::read_to_string(&self.file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
    fn wait_for(&self, f: impl Fn(u64) -> bool) -> u64 {
        let t = Instant::now();
        loop {
            if let Some(v) = self.read().filter(|v| f(*v)) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "counter stuck at {:?}",
                self.read()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn alive(&self) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .unwrap_or_default()
                .contains(") Z")
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.kill();
    }
}

fn dir_fd(p: &Path) -> OwnedFd {
    File::open(p).unwrap().into()
}

fn dump_opts(pid: i32, images: &OwnedFd, work: &OwnedFd) -> Opts {
    Opts {
        images_dir_fd: images.as_raw_fd(),
        work_dir_fd: Some(work.as_raw_fd()),
        pid: Some(pid),
        leave_running: Some(true),
        log_level: Some(4),
        log_file: Some("dump.log".into()),
        notify_scripts: Some(true),
        ..Default::default()
    }
}

/// Fresh `images` and `work` dirs in `tmp`.
fn image_dirs(tmp: &Path) -> (PathBuf, PathBuf) {
    let (images, work) = (tmp.join("images"), tmp.join("work"));
    std::fs::create_dir(&images).unwrap();
    std::fs::create_dir(&work).unwrap();
    (images, work)
}

/// The options of a command-line dump of `pid`, left running, logged.
fn cli_opts(pid: i32) -> Opts {
    Opts {
        pid: Some(pid),
        leave_running: Some(true),
        log_level: Some(4),
        log_file: Some("dump.log".into()),
        ..Default::default()
    }
}

/// Kills the counter, restores it from `images` and checks it resumes from its
/// memory at dump time (`before..after`), not from 1.
async fn restore_resumes(
    c: &Criu,
    counter: &mut Counter,
    images: &Path,
    work: &Path,
    before: u64,
    after: u64,
) {
    let pid = counter.pid();
    counter.kill();
    std::fs::remove_file(&counter.file).unwrap();
    let (ifd, wfd) = (dir_fd(images), dir_fd(work));
    let opts = Opts {
        images_dir_fd: ifd.as_raw_fd(),
        work_dir_fd: Some(wfd.as_raw_fd()),
        log_level: Some(4),
        log_file: Some("restore.log".into()),
        rst_sibling: Some(true),
        notify_scripts: Some(true),
        ..Default::default()
    };
    let restored = c.restore(opts, &mut ack_all(), Vec::new()).await.unwrap();
    assert_eq!(restored, pid, "CRIU restores the original pid");
    // rst_sibling makes the restored task our child: reap it when done.
    let reap = scopeguard(restored);
    let first = counter.wait_for(|_| true);
    assert!(
        first > before && first <= after + 2,
        "restored counter wrote {first}; dump saw {before}..{after}"
    );
    counter.wait_for(|v| v >= first + 3);
    drop(reap);
}

/// Neither stopped nor traced: CRIU let go of the task.
fn assert_not_stopped(pid: i32) {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(
        !state.contains(") t") && !state.contains(") T"),
        "task left stopped: {state}"
    );
}

/// Children of this process named `criu`.
fn criu_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status.lines().any(|l| l == "Name:\tcriu")
                && status
                    .lines()
                    .any(|l| l.strip_prefix("PPid:\t") == Some(me.as_str()))
        })
        .collect()
}

#[tokio::test]
async fn version_reports_4_2_1() {
    let v = criu().version().await.unwrap();
    assert_eq!((v.major, v.minor, v.sublevel), (4, 2, 1), "{v:?}");
    assert_eq!(v.number(), 40201);
}

#[tokio::test]
async fn check_passes_and_features_answer() {
    let c = criu();
    c.check().await.unwrap();
    let f = c
        .feature_check(Features {
            mem_track: Some(true),
            lazy_pages: Some(true),
            pidfd_store: Some(true),
        })
        .await
        .unwrap();
    // This kernel has no soft-dirty tracking but does have pidfds.
    assert_eq!(f.pidfd_store, Some(true), "{f:?}");
}

#[tokio::test]
async fn dump_leave_running_then_restore_continues_count() {
    let c = criu();
    let tmp = tempfile::tempdir().unwrap();
    let (images, work) = image_dirs(tmp.path());
    let mut counter = Counter::start(tmp.path());
    let pid = counter.pid();

    let (ifd, wfd) = (dir_fd(&images), dir_fd(&work));
    let mut seen = Vec::new();
    let before = counter.read().unwrap();
    let mut handler = |n: Notify| {
        seen.push(n.script);
        async { Ok(()) }
    };
    let resp = c
        .dump(dump_opts(pid, &ifd, &wfd), &mut handler)
        .await
        .unwrap();
    let after = counter.read().unwrap();
    assert!(resp.success);
    assert!(
        seen.iter().any(|s| s == "pre-dump") && seen.iter().any(|s| s == "post-dump"),
        "notifications: {seen:?}"
    );
    assert!(images.join("inventory.img").exists() && work.join("dump.log").exists());
    // leave_running: the original keeps counting.
    counter.wait_for(|v| v > after + 2);
    assert!(counter.alive());

    restore_resumes(&c, &mut counter, &images, &work, before, after).await;
}

/// Kills and reaps a restored child on scope exit.
fn scopeguard(pid: i32) -> impl Drop {
    struct G(i32);
    impl Drop for G {
        fn drop(&mut self) {
            let p = nix::unistd::Pid::from_raw(self.0);
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(p, None);
        }
    }
    G(pid)
}

#[tokio::test]
async fn dump_of_missing_pid_is_a_typed_error_with_log_tail() {
    let c = criu();
    let tmp = tempfile::tempdir().unwrap();
    let fd = dir_fd(tmp.path());
    // pid_max is 32768 here and at most 4194304 anywhere: this pid cannot exist.
    let err = c
        .dump(dump_opts(4_194_303, &fd, &fd), &mut ack_all())
        .await
        .unwrap_err();
    match &err {
        Error::Failed {
            cr_errno, log_tail, ..
        } => {
            assert_eq!(*cr_errno, Some(libc::ESRCH), "{err}");
            assert!(
                log_tail.contains("Error") || log_tail.contains("4194303"),
                "log tail: {log_tail}"
            );
        }
        other => panic!("expected Error::Failed, got {other:?}"),
    }
    assert!(err.to_string().contains("CRIU log tail"), "{err}");
}

#[tokio::test]
async fn failing_notify_handler_aborts_dump_and_process_keeps_running() {
    let c = criu();
    let tmp = tempfile::tempdir().unwrap();
    let counter = Counter::start(tmp.path());
    let fd = dir_fd(tmp.path());
    for refuse in ["pre-dump", "post-dump"] {
        let mut handler = move |n: Notify| async move {
            if n.script == refuse {
                Err(format!("refusing {refuse}"))
            } else {
                Ok(())
            }
        };
        let err = c
            .dump(dump_opts(counter.pid(), &fd, &fd), &mut handler)
            .await
            .unwrap_err();
        match &err {
            Error::NotifyAborted { script, reason, .. } => {
                assert_eq!(script, refuse);
                assert!(reason.contains("refusing"));
            }
            other => panic!("expected NotifyAborted, got {other:?}"),
        }
        let now = counter.read().unwrap();
        counter.wait_for(|v| v > now + 2);
        assert!(counter.alive());
        assert_not_stopped(counter.pid());
    }
}

#[tokio::test]
async fn dropped_request_leaves_no_criu_child_and_the_task_running() {
    let c = criu().with_grace(Duration::from_secs(3));
    let tmp = tempfile::tempdir().unwrap();
    let counter = Counter::start(tmp.path());
    let fd = dir_fd(tmp.path());
    // The handler never answers post-dump: CRIU holds the seized tree while it waits.
    let mut handler = |n: Notify| async move {
        if n.script == "post-dump" {
            std::future::pending::<()>().await;
        }
        Ok(())
    };
    let fut = c.dump(dump_opts(counter.pid(), &fd, &fd), &mut handler);
    let res = tokio::time::timeout(Duration::from_millis(1500), fut).await;
    assert!(
        res.is_err(),
        "the dump should still be waiting on post-dump"
    );
    // CRIU sees EOF, aborts on its own and releases the task; the reaper collects it.
    let t = Instant::now();
    while !criu_children().is_empty() {
        assert!(
            t.elapsed() < c.grace() + Duration::from_secs(2),
            "CRIU left behind: {:?}",
            criu_children()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = counter.read().unwrap();
    counter.wait_for(|v| v > now + 2);
    assert!(counter.alive());
}

/// Reads every image CRIU streams, each pipe on its own thread, into memory.
fn capture_all(
    sock: criu_rpc::streamer::CaptureSocket,
) -> std::thread::JoinHandle<Vec<(String, Vec<u8>)>> {
    std::thread::spawn(move || {
        use std::io::Read;
        let mut conn = sock.accept(|| false).unwrap().unwrap();
        let mut readers = Vec::new();
        while let Some((name, pipe)) = conn.next_image().unwrap() {
            readers.push(std::thread::spawn(move || {
                let mut data = Vec::new();
                File::from(pipe).read_to_end(&mut data).unwrap();
                (name, data)
            }));
        }
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

#[tokio::test]
async fn cli_stream_dump_hands_over_every_image_and_they_restore() {
    let c = criu();
    let tmp = tempfile::tempdir().unwrap();
    let (images, work) = image_dirs(tmp.path());
    let mut counter = Counter::start(tmp.path());
    let pid = counter.pid();
    let sock = criu_rpc::streamer::CaptureSocket::bind(&images).unwrap();
    let captured = capture_all(sock);
    let opts = cli_opts(pid);
    let before = counter.read().unwrap();
    let mut dump = c.dump_cli(&opts, &images, &work, true, false).unwrap();
    dump.wait().await.unwrap();
    let after = counter.read().unwrap();
    let got = captured.join().unwrap();
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["inventory.img", "pstree.img", "pages-1.img"] {
        assert!(names.contains(&want), "{want} not streamed: {names:?}");
    }
    assert!(
        names.contains(&format!("pagemap-{pid}.img").as_str()),
        "{names:?}"
    );
    // Nothing was written to the images dir but the socket; statistics go to work.
    assert_eq!(
        std::fs::read_dir(&images).unwrap().count(),
        0,
        "images written besides the stream"
    );
    assert!(work.join("stats-dump").exists() && work.join("dump.log").exists());
    counter.wait_for(|v| v > after + 2);

    // The streamed images, written out as files, restore the counter.
    let restore_dir = tmp.path().join("restore");
    std::fs::create_dir(&restore_dir).unwrap();
    for (name, data) in &got {
        assert!(!name.contains('/'), "{name}");
        std::fs::write(restore_dir.join(name), data).unwrap();
    }
    restore_resumes(&c, &mut counter, &restore_dir, &work, before, after).await;
}

#[tokio::test]
async fn aborted_cli_dump_fails_at_post_dump_and_the_task_runs_on() {
    let c = criu();
    let tmp = tempfile::tempdir().unwrap();
    let counter = Counter::start(tmp.path());
    let mut dump = c
        .dump_cli(
            &cli_opts(counter.pid()),
            tmp.path(),
            tmp.path(),
            false,
            false,
        )
        .unwrap();
    dump.aborter().abort();
    let err = dump.wait().await.unwrap_err();
    match &err {
        Error::Exited { log_tail, .. } => assert!(
            log_tail.contains("post-dump") || log_tail.contains("script"),
            "log tail: {log_tail}"
        ),
        other => panic!("expected Error::Exited, got {other:?}"),
    }
    let now = counter.read().unwrap();
    counter.wait_for(|v| v > now + 2);
    assert_not_stopped(counter.pid());
}

/// Held at `pre-dump`, CRIU touches no task until answered: refused, it fails
/// and the task runs on; let go, it dumps, then holds the task stopped at
/// `post-dump` until answered again.
#[tokio::test]
async fn cli_dump_waits_at_its_stages_for_the_answer() {
    let c = criu();
    let tmp = tempfile::tempdir().unwrap();
    let counter = Counter::start(tmp.path());
    for go_on in [false, true] {
        let work = tmp.path().join(format!("w-{go_on}"));
        std::fs::create_dir(&work).unwrap();
        let mut dump = c
            .dump_cli(&cli_opts(counter.pid()), &work, &work, false, true)
            .unwrap();
        let mut stages = dump.take_stages().unwrap();
        let asked = tokio::time::timeout(Duration::from_secs(10), stages.asked())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(asked, criu_rpc::cli::Stage::PreDump);
        // Asked, and waiting: the task is still running, not seized.
        let now = counter.read().unwrap();
        counter.wait_for(|v| v > now + 1);
        assert_not_stopped(counter.pid());
        stages.answer(go_on).await.unwrap();
        if go_on {
            let asked = tokio::time::timeout(Duration::from_secs(10), stages.asked())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(asked, criu_rpc::cli::Stage::PostDump);
            // Every image is written, and the task is still stopped.
            assert!(work.join("inventory.img").exists());
            let now = counter.read().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                counter.read().unwrap(),
                now,
                "the task ran before post-dump was answered"
            );
            stages.answer(true).await.unwrap();
        }
        let r = dump.wait().await;
        drop(stages);
        assert_eq!(r.is_ok(), go_on, "{r:?}");
        assert_eq!(work.join("inventory.img").exists(), go_on);
        let now = counter.read().unwrap();
        counter.wait_for(|v| v > now + 1);
    }
}
