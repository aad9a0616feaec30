//! Issue 26: what real programs hold comes back, and no process is silently
//! left out. Through CRI (containerd, the shim, ckpt-runc):
//!
//! - a process tree holding threads, children, epoll, eventfd, timerfd,
//!   signalfd, inotify, System V and POSIX shared memory, a memfd, a
//!   deleted file and flock and fcntl locks (tests/fixtures/workloads/trees.c),
//!   checkpointed and restored into a new pod: every object still works and
//!   the count goes on;
//! - a container with a terminal and stdin open (what `kubectl run -it`
//!   makes), checkpointed and restored with a new terminal: it goes on
//!   writing through it, and `crictl attach` reaches it;
//! - in a pod that shares one PID namespace, processes daemonized out of the
//!   container's tree: CheckpointContainer refuses, naming them, and leaves
//!   nothing; a restore into that namespace while the checkpoint's PIDs are
//!   taken fails at StartContainer naming the PID, and nothing of it runs.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::cri::{self as ccri, Client, Env};
use common::restore::{create, restore_config};
use k8s_cri::v1 as cri;

/// The images these tests run: hack/build-oci-images.sh's, with
/// tests/fixtures/workloads/trees.c built in (hack/build-image.sh), in a directory
/// named after their sources. The node-wide cache
/// (`/var/cache/ckpt-shim/images`) is rebuilt only when its stamp changes,
/// so one made before trees.c would lack it.
fn use_own_images() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let workloads = root.join("tests/fixtures/workloads");
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut sources: Vec<PathBuf> = common::entries(&workloads)
            .into_iter()
            .map(|n| workloads.join(n))
            .collect();
        sources
            .extend(["build-image.sh", "build-oci-images.sh"].map(|s| root.join("hack").join(s)));
        for s in sources {
            for b in std::fs::read(&s).unwrap() {
                hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("images-{hash:016x}"));
        // Set before any test of this binary starts a process: every test
        // comes here first, and waits here while another does.
        std::env::set_var("CKPT_SHIM_IMAGES", dir);
    });
}

fn start(toml: &str) -> Env {
    use_own_images();
    Env::start_configured(toml)
}

/// Lines of a CRI log (`TIME STREAM TAG TEXT`), their text.
fn log_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .map(|t| t.trim_end_matches('\r').to_string())
        .collect()
}

/// Waits (20 s at most) until `log` has a line `pred` picks; its value.
fn wait_log<T>(log: &Path, what: &str, pred: impl Fn(&[String]) -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = pred(&log_lines(log)) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: not in {}: {:?}",
            log.display(),
            log_lines(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pod of `name`, its PID namespace the pod's own (shared by its
/// containers) or each container's.
async fn pod(
    env: &mut Env,
    c: &mut Client,
    name: &str,
    shared_pid: bool,
) -> (String, cri::PodSandboxConfig) {
    let mut cfg = env.sandbox_config(name, false);
    if shared_pid {
        let sc = cfg.linux.as_mut().unwrap().security_context.as_mut();
        sc.unwrap().namespace_options.as_mut().unwrap().pid = cri::NamespaceMode::Pod as i32;
    }
    std::fs::create_dir_all(&cfg.log_directory).unwrap();
    let req = cri::RunPodSandboxRequest {
        config: Some(cfg.clone()),
        runtime_handler: String::new(),
    };
    let id = c
        .run_pod_sandbox(req)
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    env.pods.push(id.clone());
    (id, cfg)
}

/// A container `name` of the counter image running `argv`, in a pod whose
/// PID namespace it shares or not.
fn config(name: &str, argv: &[&str], shared_pid: bool) -> cri::ContainerConfig {
    let mut cfg = ccri::counter_config(name, false);
    cfg.command = argv.iter().map(|s| s.to_string()).collect();
    cfg.args = vec![];
    if shared_pid {
        shared(&mut cfg);
    }
    cfg
}

/// Creates and starts `cfg` in `pod`; its ID and log.
async fn run(
    c: &mut Client,
    pod: &(String, cri::PodSandboxConfig),
    cfg: cri::ContainerConfig,
) -> (String, PathBuf) {
    let log = Path::new(&pod.1.log_directory).join(&cfg.log_path);
    let id = ccri::create(c, pod, cfg).await;
    ccri::start_container(c, &id).await;
    (id, log)
}

/// CreateContainer of `archive` in `pod` as `name`, as `cfg` says
/// otherwise; its ID and log.
async fn create_restore(
    env: &Env,
    c: &mut Client,
    pod: &(String, cri::PodSandboxConfig),
    (name, archive): (&str, &Path),
    tune: impl FnOnce(&mut cri::ContainerConfig),
) -> (String, PathBuf) {
    let mut cfg = restore_config(env, name, archive.to_str().unwrap());
    tune(&mut cfg);
    let log = Path::new(&pod.1.log_directory).join(&cfg.log_path);
    let id = create(c, pod, cfg)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer of {}: {e:?}", archive.display()));
    (id, log)
}

/// What `read` says once the runtime has copied to the log what the
/// container wrote before the checkpoint returned.
fn settled<T>(read: impl FnOnce() -> T) -> T {
    std::thread::sleep(Duration::from_millis(50));
    read()
}

// ---- the process tree ----------------------------------------------------

/// The checks of trees.c's rounds: (round, the checks that failed).
fn rounds(lines: &[String]) -> Vec<(u64, Vec<String>)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("trees "))
        .filter_map(|l| {
            let mut words = l.split(' ');
            let n = words.next()?.parse().ok()?;
            let failed = words.filter(|w| !w.ends_with("=ok")).map(String::from);
            Some((n, failed.collect()))
        })
        .collect()
}

/// Every object trees.c checks, as its lines name them.
const OBJECTS: &[&str] = &[
    "epoll", "threads", "tree", "eventfd", "timerfd", "signalfd", "inotify", "children", "sysvshm",
    "posixshm", "memfd", "deleted", "flock", "fcntl",
];

/// The last round trees.c logged, once it has logged `min`; every round up
/// to it passed all its checks.
fn last_round(log: &Path, min: u64) -> u64 {
    let r = wait_log(log, "trees' rounds", |l| {
        rounds(l).last().filter(|r| r.0 >= min).map(|r| r.0)
    });
    let lines = log_lines(log);
    for (n, failed) in rounds(&lines) {
        assert!(failed.is_empty(), "round {n} failed {failed:?}");
    }
    let first = lines.iter().find(|l| l.starts_with("trees ")).unwrap();
    for o in OBJECTS {
        assert!(
            first.contains(&format!(" {o}=ok")),
            "{o} unchecked: {first}"
        );
    }
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_tree_and_its_kernel_objects_come_back_whole() {
    let mut env = start("");
    let mut c = env.client().await;
    let p = pod(&mut env, &mut c, "trees", false).await;
    let (id, log) = run(&mut c, &p, config("trees", &["/bin/trees", "200"], false)).await;
    let before = last_round(&log, 3);
    let out = common::out_dir();
    let archive = out.path().join("trees.tar");
    ccri::checkpoint(&mut c, &id, &archive).await.unwrap();
    let after = settled(|| last_round(&log, before));
    // The original goes on, every object working.
    last_round(&log, after + 3);

    let p2 = pod(&mut env, &mut c, "trees-restored", false).await;
    let (rid, rlog) = create_restore(&env, &mut c, &p2, ("trees", &archive), |_| {}).await;
    ccri::start_container(&mut c, &rid).await;
    let first = wait_log(&rlog, "a restored round", |l| {
        rounds(l).first().map(|r| r.0)
    });
    assert!(
        first > before && first <= after + 1,
        "restored at round {first}; the checkpoint saw {before}..{after}"
    );
    // Every object keeps working, round after round, in the new pod.
    let last = last_round(&rlog, first + 5);
    let ns: Vec<u64> = rounds(&log_lines(&rlog)).iter().map(|r| r.0).collect();
    assert_eq!(
        ns,
        (first..=ns[ns.len() - 1]).collect::<Vec<_>>(),
        "rounds skipped"
    );
    assert!(last >= first + 5);
}

// ---- a terminal ------------------------------------------------------------

/// Counts in memory, saying each number and the terminal it writes to, and
/// echoes each line it reads from that terminal.
const TTY_LOOP: &str = "i=0; while true; do i=$((i+1)); echo \"tick $i $(tty)\"; \
                        if read -t 1 l; then echo \"got $l\"; fi; done";

/// The last "tick N /dev/pts/M" line in `log`, once N reaches `min`.
fn last_tick(log: &Path, min: u64) -> u64 {
    wait_log(log, "ticks", |lines| {
        // Every tick is checked, not only the last.
        let ticks: Vec<u64> = lines
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix("tick ")?;
                let (n, tty) = rest.split_once(' ')?;
                assert!(tty.starts_with("/dev/pts/"), "not on a terminal: {l}");
                n.parse().ok()
            })
            .collect();
        ticks.last().copied().filter(|n| *n >= min)
    })
}

/// `echo LINE | crictl attach -i ID` through the shim: it reaches the
/// container's terminal. Returns once the container has logged it back.
fn attach_and_say(env: &Env, id: &str, log: &Path, line: &str) {
    let config = env.dir.join("crictl.yaml");
    std::fs::write(&config, "").unwrap();
    let mut attach = Command::new(common::shared_bin("crictl"))
        .arg("--config")
        .arg(&config)
        .arg(format!(
            "--runtime-endpoint=unix://{}",
            env.shim_sock.display()
        ))
        .args(["--timeout=20s", "attach", "-i", id])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = attach.stdin.take().unwrap();
    writeln!(stdin, "{line}").unwrap();
    let got = format!("got {line}");
    wait_log(log, "the attached line read back", |l| {
        l.contains(&got).then_some(())
    });
    drop(stdin);
    let out = attach.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "crictl attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_with_a_terminal_comes_back_on_a_new_one() {
    let mut env = start("");
    let mut c = env.client().await;
    let p = pod(&mut env, &mut c, "tty", false).await;
    let mut cfg = config("shell", &["/bin/sh", "-c", TTY_LOOP], false);
    (cfg.tty, cfg.stdin) = (true, true);
    let (id, log) = run(&mut c, &p, cfg).await;
    let before = last_tick(&log, 2);
    let out = common::out_dir();
    let archive = out.path().join("tty.tar");
    ccri::checkpoint(&mut c, &id, &archive).await.unwrap();
    let after = settled(|| last_tick(&log, before));
    attach_and_say(&env, &id, &log, "to-the-original");

    let p2 = pod(&mut env, &mut c, "tty-restored", false).await;
    // Without a terminal asked for, the runtime would give it none.
    let no_tty = restore_config(&env, "shell", archive.to_str().unwrap());
    let e = create(&mut c, &p2, no_tty).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("had a terminal"), "{e:?}");
    assert_eq!(env.restores(), Vec::<String>::new());
    let (rid, rlog) = create_restore(&env, &mut c, &p2, ("shell", &archive), |cfg| {
        (cfg.tty, cfg.stdin) = (true, true);
    })
    .await;
    ccri::start_container(&mut c, &rid).await;
    let first = wait_log(&rlog, "a restored tick", |l| {
        l.iter().find_map(|l| {
            l.strip_prefix("tick ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
    });
    assert!(
        first > before && first <= after + 1,
        "restored at tick {first}; the checkpoint saw {before}..{after}"
    );
    // On a terminal still (a new one, from the runtime's console socket),
    // which carries what is typed at it.
    last_tick(&rlog, first + 1);
    attach_and_say(&env, &rid, &rlog, "to-the-restored");
    assert!(!log_lines(&log)
        .iter()
        .any(|l| l.contains("to-the-restored")));
}

// ---- no process left out ---------------------------------------------------

/// The pid of host process `pid` in its own PID namespace.
fn ns_pid(pid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap();
    line.split_whitespace().last().unwrap().parse().unwrap()
}

/// The processes in container `id`'s cgroup (containerd names it after
/// the pod's cgroup parent and the container's ID), none if it is gone.
fn cgroup_procs(p: &(String, cri::PodSandboxConfig), id: &str) -> Vec<i32> {
    let parent = &p.1.linux.as_ref().unwrap().cgroup_parent;
    std::fs::read_to_string(format!("/sys/fs/cgroup/freezer{parent}/{id}/cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_outside_the_tree_refuse_the_checkpoint_and_taken_pids_the_restore() {
    let mut env = start("");
    let mut c = env.client().await;
    let p = pod(&mut env, &mut c, "shared", true).await;
    // httpd daemonizes; the subshell's sleep is orphaned: both go to the
    // pod's init, out of the tree under the container's.
    let script = "httpd -p 8080 -h /tmp; (sleep 1000 &); exec /bin/counter /tmp/count 1 50";
    let (daemons, _) = run(
        &mut c,
        &p,
        config("daemons", &["/bin/sh", "-c", script], true),
    )
    .await;
    common::wait_count(&env.rootfs(&daemons), |v| v >= 3);
    let init = ccri::container_pid(&mut c, &daemons).await;
    let outside: Vec<i32> = cgroup_procs(&p, &daemons)
        .into_iter()
        .filter(|p| *p != init)
        .collect();
    assert_eq!(outside.len(), 2, "{outside:?}");

    let out = common::out_dir();
    let e = ccri::checkpoint(&mut c, &daemons, &out.path().join("d.tar"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    for pid in &outside {
        let named = format!(
            "pid {pid} ({}, pid {} in the container)",
            comm(*pid),
            ns_pid(*pid)
        );
        assert!(
            e.message().contains(&named),
            "{named} not in {:?}",
            e.message()
        );
    }
    assert!(
        e.message().contains("(httpd") && e.message().contains("(sleep"),
        "{e:?}"
    );
    // Nothing left: it runs on, thawed; no archive, no staging.
    env.assert_running(&mut c, &daemons).await;
    assert_eq!(common::entries(out.path()), Vec::<String>::new());

    // A container of the same pod whose processes are all its init's: the
    // pod's init and the other container's are not in its cgroup.
    let cfg = config("plain", &["/bin/counter", "/tmp/count", "1", "50"], true);
    let (plain, _) = run(&mut c, &p, cfg).await;
    common::wait_count(&env.rootfs(&plain), |v| v >= 3);
    let archive = out.path().join("plain.tar");
    let counts = common::restore::checkpoint_to(&env, &mut c, &plain, &archive).await;
    taken_pids_fail_the_restore(&mut env, &mut c, &p, &plain, &archive).await;

    let p2 = pod(&mut env, &mut c, "shared-restored", true).await;
    let (rid, rlog) = create_restore(&env, &mut c, &p2, ("plain", &archive), shared).await;
    ccri::start_container(&mut c, &rid).await;
    common::restore::assert_continues(&env, &rid, &rlog, counts, "into a new shared PID namespace");
}

/// The container's PID namespace is its pod's.
fn shared(cfg: &mut cri::ContainerConfig) {
    let sc = cfg.linux.as_mut().unwrap().security_context.as_mut();
    sc.unwrap().namespace_options.as_mut().unwrap().pid = cri::NamespaceMode::Pod as i32;
}

/// Restored into the pod it came from while it runs there: its PIDs are
/// taken. StartContainer fails naming the first, nothing of it runs, and
/// its restore goes with it.
async fn taken_pids_fail_the_restore(
    env: &mut Env,
    c: &mut Client,
    p: &(String, cri::PodSandboxConfig),
    original: &str,
    archive: &Path,
) {
    let nspid = ns_pid(ccri::container_pid(c, original).await);
    let (rid, _) = create_restore(env, c, p, ("again", archive), shared).await;
    assert!(env.restores().contains(&rid), "{:?}", env.restores());
    let req = cri::StartContainerRequest {
        container_id: rid.clone(),
    };
    let e = c.start_container(req).await.unwrap_err();
    let taken = format!("Can't fork for {nspid}: File exists");
    assert!(
        e.message().contains(&taken),
        "{taken} not in {:?}",
        e.message()
    );
    assert_eq!(
        env.state(c, &rid).await,
        cri::ContainerState::ContainerExited
    );
    assert_eq!(
        cgroup_procs(p, &rid),
        Vec::<i32>::new(),
        "something of it runs"
    );
    let req = cri::RemoveContainerRequest {
        container_id: rid.clone(),
    };
    c.remove_container(req).await.unwrap();
    assert!(!env.restores().contains(&rid), "{:?}", env.restores());
    env.assert_running(c, original).await;
}
