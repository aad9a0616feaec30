//! Pages held in memory while the container is frozen (docs/design.md, "Holding pages
//! during the pause"): by default, within one budget that every checkpoint in
//! flight shares, with what does not fit written through.

mod common;

use std::path::Path;

use common::cri::{checkpoint, Env};
use common::scrape::{free_port, get, value};

/// The shim's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kib << 10
}

/// The size of the archive's first pages image.
fn pages_len(archive: &Path) -> u64 {
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            e.path()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint/pages-")
        })
        .map(|e| e.size())
        .max()
        .unwrap_or(0)
}

/// Two 64 MiB containers checkpointed at once under a 100 MiB ceiling: both
/// succeed with complete archives, together they hold no more than the
/// ceiling (so one of them writes part of its pages through), the budget is
/// all given back, and the shim's memory returns to what it was.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_checkpoints_share_one_budget() {
    const CEILING: f64 = (100 << 20) as f64;
    let port = free_port();
    let toml = format!("metrics_listen = \"127.0.0.1:{port}\"\nhold_ceiling_mib = 100\n");
    let mut env = Env::start_configured(&toml);
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "hold-share", true).await;
    let a = env.counter(&mut c, &pod, "a", 64, true).await;
    let b = env.counter(&mut c, &pod, "b", 64, true).await;
    let (_, before) = get(port, "/metrics");
    let idle = rss(env.shim_pid());

    let out = common::out_dir();
    let (pa, pb) = (out.path().join("a.tar"), out.path().join("b.tar"));
    let (mut ca, mut cb) = (env.client().await, env.client().await);
    let (ra, rb) = tokio::join!(checkpoint(&mut ca, &a, &pa), checkpoint(&mut cb, &b, &pb));
    ra.unwrap();
    rb.unwrap();

    let (_, after) = get(port, "/metrics");
    let delta = |s: &str| value(&after, s) - value(&before, s);
    let held = delta("ckpt_shim_checkpoint_held_bytes_total");
    let through = delta("ckpt_shim_checkpoint_frozen_written_bytes_total");
    assert!(
        held > (32 << 20) as f64 && held <= CEILING,
        "held {held} of a 100 MiB ceiling"
    );
    assert!(
        through > (16 << 20) as f64,
        "what did not fit was written through: {through}"
    );
    assert_eq!(value(&after, "ckpt_shim_hold_in_use_bytes"), 0.0, "{after}");
    assert_eq!(value(&after, "ckpt_shim_hold_budget_bytes"), CEILING);
    for (id, archive) in [(&a, &pa), (&b, &pb)] {
        assert!(
            pages_len(archive) >= 64 << 20,
            "{id}: every touched page is in"
        );
        ckpt_shim::inspect::inspect(archive).unwrap();
        env.assert_running(&mut c, id).await;
    }
    let now = rss(env.shim_pid());
    assert!(
        now < idle + (24 << 20),
        "the shim holds {now} bytes, {idle} before"
    );
}

/// The longest gap the probe in `c` saw, in µs, once it has written it.
fn probe_verdict(c: &common::Runc, name: &str) -> u64 {
    let path = c.overlay.rootfs.join("tmp").join(name);
    let t = std::time::Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed().as_secs() < 30,
            "the probe never wrote {}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["longest_us"].as_u64().unwrap()
}

/// The pause as the container sees it (tests/fixtures/workloads/pauseprobe.c spinning
/// inside it) of one checkpoint with `pages` into `location`, and the bytes
/// of pages it held.
async fn pause_of(
    c: &common::Runc,
    n: usize,
    pages: ckpt_shim::checkpoint::hold::HoldPages,
    location: &Path,
) -> (u64, u64) {
    let name = format!("pause-{n}");
    c.exec(&format!(
        "/bin/pauseprobe /tmp/{name} 5 </dev/null >/dev/null 2>&1 &"
    ));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let found = ckpt_shim::checkpoint::locate::from_runtime_root(&c.root, &c.id).unwrap();
    let opts = ckpt_shim::checkpoint::Options {
        stream: true,
        hold: ckpt_shim::checkpoint::hold::Budget::new(ckpt_shim::checkpoint::hold::Policy {
            pages,
            ..Default::default()
        }),
        ..common::checkpoint_opts(location)
    };
    let r = ckpt_shim::checkpoint::checkpoint(&found, &opts)
        .await
        .unwrap();
    r.cleanup.wait();
    std::fs::remove_file(location).unwrap();
    (probe_verdict(c, &name), r.pages_held)
}

/// On a disk that takes 50 MB/s, a 64 MiB container's pause from inside is
/// shorter with its pages held (the default) than written through, every
/// time, in turn: holding keeps the disk out of the pause.
#[tokio::test(flavor = "multi_thread")]
async fn held_pages_keep_a_slow_disk_out_of_the_pause() {
    use ckpt_shim::checkpoint::hold::HoldPages;
    common::require(&["runc", "criu", "cc"]);
    let dir = tempfile::tempdir().unwrap();
    let slow = common::slowfs::SlowFs::mount(dir.path(), 50.0);
    let c = common::Runc::start_with(
        "hold-slow",
        common::Spec {
            mib: 64,
            ..Default::default()
        },
    );
    let location = slow.mnt.join("c.tar");
    let (mut held, mut through) = (Vec::new(), Vec::new());
    for round in 0..2 {
        let (pause, pages_held) = pause_of(&c, 2 * round, HoldPages::Auto, &location).await;
        assert!(pages_held > 32 << 20, "auto holds: {pages_held}");
        held.push(pause);
        let (pause, pages_held) = pause_of(&c, 2 * round + 1, HoldPages::Mib(0), &location).await;
        assert_eq!(pages_held, 0);
        through.push(pause);
    }
    let worst_held = held.iter().max().unwrap();
    let best_through = through.iter().min().unwrap();
    assert!(
        worst_held < best_through,
        "pauses (µs) held {held:?}, written through {through:?}"
    );
    c.assert_running();
}
