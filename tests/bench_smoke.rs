//! Every benchmark entry point (`hack/bench/run BENCH`) runs end to end at its
//! smallest size, one round, with its peers, and prints its tables whole.
//! Nothing here looks at a time or a ratio: the benchmarks measure on a shared
//! machine, and only a person reading a full run can judge the numbers
//! (docs/benchmarks.md). What this catches is a benchmark that no longer runs,
//! as `hack/bench/run restore` did for a while (`'RestoreBench' object has no
//! attribute 'sock'`), or whose tables come out with rows or cells missing.
//!
//! The benchmarks run the debug build this test was built with
//! (CKPT_BENCH_PROFILE=dev), not a release build of their own, and one at a
//! time: each starts its own containerd and its own shims.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A markdown table: its header's cells and each row's.
#[derive(Debug)]
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// The row whose first cells are `key` (as many as `key` has).
    fn row(&self, key: &[&str]) -> &[String] {
        self.rows
            .iter()
            .find(|r| r.len() >= key.len() && r.iter().zip(key).all(|(c, k)| c == k))
            .unwrap_or_else(|| panic!("no row {key:?} in the table {:?}", self.header))
    }

    /// The row whose cell `col` starts with `prefix`.
    fn row_at(&self, col: usize, prefix: &str) -> &[String] {
        self.rows
            .iter()
            .find(|r| r.get(col).is_some_and(|c| c.starts_with(prefix)))
            .unwrap_or_else(|| {
                panic!(
                    "no row with {prefix:?} in column {col} of {:?}",
                    self.header
                )
            })
    }
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

/// Every markdown table in `out`, each checked to be whole: a header, its
/// separator, and rows of as many cells as the header.
fn tables(out: &str) -> Vec<Table> {
    let mut tables = Vec::new();
    let mut lines = out.lines().peekable();
    while let Some(line) = lines.next() {
        if !line.starts_with('|') {
            continue;
        }
        let header = cells(line);
        let sep = lines.next().unwrap_or_default();
        assert!(
            cells(sep).iter().all(|c| c.chars().all(|ch| ch == '-'))
                && cells(sep).len() == header.len(),
            "a table's header {header:?} is not followed by its separator: {sep:?}"
        );
        let mut rows = Vec::new();
        while let Some(l) = lines.next_if(|l| l.starts_with('|')) {
            let row = cells(l);
            assert_eq!(row.len(), header.len(), "a row of {header:?} is cut: {l:?}");
            rows.push(row);
        }
        assert!(!rows.is_empty(), "the table {header:?} has no row");
        tables.push(Table { header, rows });
    }
    tables
}

/// A measured figure is there: not empty, "-", "nan" or "inf".
fn filled(cell: &str, what: &str) {
    let c = cell.trim_end_matches(['×', '%', '✓', '✗', ' ']);
    assert!(
        !c.is_empty() && c != "-" && c != "–" && !c.contains("nan") && !c.contains("inf"),
        "{what}: no figure ({cell:?})"
    );
}

/// The test binary's target dir and cargo profile, which the benchmarks use.
fn build() -> (PathBuf, &'static str) {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev",
        "release" => "release",
        other => panic!("a test binary in {other}: run it with the dev or release profile"),
    };
    (profile_dir.parent().unwrap().to_path_buf(), profile)
}

/// Runs `hack/bench/run ARGS` to its end (SIGINT past `limit`, then SIGKILL),
/// prints what it printed, and returns its stdout; fails unless it succeeded.
fn bench(args: &[&str], limit: Duration) -> String {
    // (crictl: on PATH or in ../shared/bin; the benchmarks say so when it is neither.)
    common::require(&["runc", "containerd", "criu", "cc"]);
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (target, profile) = build();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = format!(
        "/usr/local/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let started = Instant::now();
    let mut child = Command::new("bash")
        .arg(root.join("hack/bench/run"))
        .args(args)
        .env("CKPT_BENCH_PROFILE", profile)
        .env("CARGO_TARGET_DIR", &target)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("bash hack/bench/run");
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    let outs = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).ok();
        s
    });
    let mut interrupted = None;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        let late = started.elapsed();
        if late > limit && interrupted.is_none() {
            // The benchmark's own clean-up runs on SIGINT (KeyboardInterrupt).
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGINT);
            interrupted = Some(late);
        } else if late > limit + Duration::from_secs(90) {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (stdout, stderr) = (outs.join().unwrap(), errs.join().unwrap());
    println!(
        "== hack/bench/run {}: {status} after {:.0} s\n{stdout}\n-- its stderr:\n{stderr}",
        args.join(" "),
        started.elapsed().as_secs_f64()
    );
    assert!(
        interrupted.is_none(),
        "hack/bench/run {} was still running after {limit:?}",
        args.join(" ")
    );
    assert!(
        status.success(),
        "hack/bench/run {} failed: {stderr}",
        args.join(" ")
    );
    stdout
}

/// A work dir of this run's own under /var/tmp (the benchmarks remove it);
/// short, for podman's run root in it must stay under 50 bytes.
fn work(name: &str) -> String {
    format!("/var/tmp/ckbs-{name}.{}", std::process::id())
}

const LIMIT: Duration = Duration::from_secs(300);

#[test]
fn checkpoint_every_variant_at_the_tiny_size() {
    let w = work("ck");
    let out = bench(
        &[
            "checkpoint",
            "--sizes",
            "0",
            "--rounds",
            "1",
            "--probe-secs",
            "1",
            "--work",
            &w,
        ],
        LIMIT,
    );
    assert!(
        out.contains("(tiny MiB: 1 of 1)"),
        "the one round did not finish: {out}"
    );
    let t = tables(&out);
    assert_eq!(
        t.len(),
        5,
        "the variants, held against written through, the slow disk, the peers, the shims"
    );
    let variants = [
        "A",
        "A-d",
        "A-wt",
        "A-wt-d",
        "A-nf",
        "A-cli",
        "A-nf-wt",
        "A-cli-wt",
        "A-enc",
        "A-enc-wt",
        "A-stg",
        "A-stg-nf",
        "A-stg-nf-wt",
        "B",
        "C",
        "D",
        "A-slow",
        "A-wt-slow",
        "A-nf-slow",
        "A-nf-wt-slow",
    ];
    assert_eq!(
        t[0].rows.len(),
        variants.len(),
        "one row per variant: {:?}",
        t[0].rows
    );
    for v in variants {
        let row = t[0].row_at(1, &format!("{v}: "));
        filled(&row[2], &format!("{v}'s pause"));
        filled(&row[3], &format!("{v}'s total"));
        filled(&row[11], &format!("{v}'s output bytes"));
    }
    for v in ["B", "C", "D"] {
        filled(
            &t[0].row_at(1, &format!("{v}: "))[4],
            &format!("{v}'s durable time"),
        );
    }
    assert_eq!(t[1].rows.len(), 6, "six held/written-through pairs");
    assert_eq!(t[2].rows.len(), 4, "four slow-disk pairs");
    for row in t[1].rows.iter().chain(&t[2].rows).chain(&t[3].rows) {
        for c in &row[1..] {
            filled(c, &format!("{row:?}"));
        }
    }
    assert_eq!(t[3].rows.len(), 1, "one size against the peers");
    assert_eq!(t[4].rows.len(), 4, "the four serve shims");
}

#[test]
fn restore_against_runc_and_podman_at_the_tiny_size() {
    let w = work("re");
    let out = bench(
        &["restore", "--sizes", "0", "--rounds", "1", "--work", &w],
        LIMIT,
    );
    let t = tables(&out);
    assert_eq!(t.len(), 2, "the restores and their ratios");
    for label in [
        "ckpt-shim via CRI (Create+Start)",
        "… of it CreateContainer",
        "… every page in, from ckpt-runc's start",
        "… MiB written by the shim",
        "ckpt-shim via CRI, lazy (Create+Start)",
        "… lazy: until every page was in",
        "ckpt-shim via CRI, from a checkpoint image",
        "runc restore -d",
        "ckpt-shim restore (CLI)",
        "podman restore --import",
    ] {
        filled(&t[0].row(&["0", label])[2], label);
    }
    let ratios = t[1].row(&["0"]);
    for (h, c) in t[1].header.iter().zip(ratios).skip(1) {
        filled(c, h);
    }
}

#[test]
fn scale_two_restores_of_one_image_full_and_lazy() {
    let w = work("sc");
    let out = bench(
        &[
            "scale", "--mib", "0", "--scale", "2", "--wide", "0", "--rounds", "1", "--work", &w,
        ],
        LIMIT,
    );
    let t = tables(&out);
    assert_eq!(t.len(), 2, "the restores and their ratios");
    for v in ["FULL-1", "FULL-2", "LAZY-1", "LAZY-2"] {
        for (i, c) in t[0].row(&["0", v]).iter().enumerate().skip(2) {
            filled(c, &format!("{v}: {}", t[0].header[i]));
        }
    }
    for (h, c) in t[1].header.iter().zip(t[1].row(&["0", "2"])).skip(2) {
        filled(c, h);
    }
}

#[test]
fn pods_a_pod_of_two_against_its_containers_one_by_one() {
    let out = bench(
        &["pods", "--pods", "2", "--mib", "0", "--rounds", "1"],
        LIMIT,
    );
    let t = tables(&out);
    assert_eq!(t.len(), 1);
    for v in ["POD", "POD-1", "POD-h", "SEQ", "one"] {
        let row = t[0].row(&["2", v]);
        filled(&row[2], &format!("{v}'s pause"));
        filled(&row[3], &format!("{v} against one"));
        if v != "one" {
            filled(&row[4], &format!("{v}'s total"));
        }
    }
    filled(&t[0].row(&["2", "POD"])[5], "RestorePod to running");
}

#[test]
fn proxy_three_clients_direct_and_through_the_shim() {
    let w = work("px");
    let out = bench(
        &[
            "proxy",
            "--calls",
            "20",
            "--clients",
            "2",
            "--seconds",
            "0.5",
            "--work",
            &w,
        ],
        LIMIT,
    );
    let t = tables(&out);
    assert_eq!(t.len(), 2, "latency and throughput");
    for client in ["go", "python", "rust"] {
        for method in [
            "Version",
            "Status",
            "ListContainers",
            "ListImages",
            "ContainerStatus",
        ] {
            for c in &t[0].row(&[client, method])[2..] {
                filled(c, &format!("{client} {method}"));
            }
        }
        let row = t[1].row(&[client]);
        filled(&row[4], &format!("{client}'s shim CPU per call"));
        if client != "python" {
            for c in &row[1..] {
                filled(c, &format!("{client}'s throughput"));
            }
        }
    }
}

#[test]
fn workloads_redis_and_nginx_against_runc_and_criu_at_16_mib() {
    let w = work("wl");
    let out = bench(
        &["workloads", "--mib", "16", "--rounds", "1", "--work", &w],
        LIMIT,
    );
    assert!(
        out.contains("(redis: 1, nginx: 1 of 1)"),
        "the one round did not finish: {out}"
    );
    let t = tables(&out);
    assert_eq!(
        t.len(),
        3,
        "the runs, where their frozen time went, the ratios"
    );
    for app in ["redis, 16 MiB", "nginx"] {
        for v in ["SHIM", "RUNC", "CRIU"] {
            let row = t[0]
                .rows
                .iter()
                .find(|r| r[0] == app && r[1].starts_with(&format!("{v}: ")))
                .unwrap_or_else(|| panic!("no row {app} {v}: {:?}", t[0].rows));
            for i in [2, 3, 4, 6, 7] {
                filled(&row[i], &format!("{app} {v}: {}", t[0].header[i]));
            }
            assert_eq!(row[8], "0", "{app} {v}: the client counted errors");
            for c in &t[1].row(&[app, v])[2..] {
                filled(c, &format!("{app} {v}: CRIU's phases"));
            }
        }
        for c in &t[2].row(&[app])[1..] {
            filled(c, app);
        }
    }
}
