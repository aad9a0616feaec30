//! `ckpt-shim check`, the node preflight, run as the built binary.

mod common;

use std::path::Path;
use std::process::{Command, Output};

const REAL_CRIU: &str = "/usr/local/sbin/criu";

/// Runs `ckpt-shim check` with an empty config file (so the node's own
/// /etc/ckpt-shim never counts), an upstream socket that does not exist, and
/// `criu`.
fn check(dir: &Path, criu: &Path) -> Output {
    let config = dir.join("config.toml");
    std::fs::write(&config, "").unwrap();
    let upstream = format!("unix://{}", dir.join("absent.sock").display());
    Command::new(env!("CARGO_BIN_EXE_ckpt-shim"))
        .args(["check", "--upstream", &upstream, "--config"])
        .arg(&config)
        .arg("--criu")
        .arg(criu)
        .output()
        .unwrap()
}

/// The result column of the row named `name`.
fn result<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(name)).then(|| cols.next()).flatten()
        })
        .unwrap_or_else(|| panic!("no {name} row in:\n{stdout}"))
}

#[test]
fn a_failing_criu_check_fails_the_preflight() {
    let d = tempfile::tempdir().unwrap();
    let stub = common::criu_stub(d.path(), "Error: stub kernel lacks everything");
    let out = check(d.path(), &stub);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert_eq!(result(&stdout, "criu-version"), "ok", "{stdout}");
    assert_eq!(result(&stdout, "criu-check"), "FAIL", "{stdout}");
    assert!(
        stdout.contains("stub kernel lacks everything"),
        "the failing check's output is shown: {stdout}"
    );
    // The stub fails every `check --feature` too: both features are missing.
    assert_eq!(result(&stdout, "criu-features"), "warn", "{stdout}");
    assert!(
        stdout.contains("soft-dirty tracking (pre-copy): no; userfaultfd (lazy restore): no"),
        "{stdout}"
    );
    // A CRIU that never says it loaded its kernel probe cache: a warning.
    assert_eq!(result(&stdout, "criu-kdat-cache"), "warn", "{stdout}");
}

#[test]
fn the_real_criu_passes_and_an_absent_upstream_fails() {
    assert!(
        Path::new(REAL_CRIU).is_file(),
        "{REAL_CRIU} is missing: run `hack/setup.sh` as root first"
    );
    let d = tempfile::tempdir().unwrap();
    let out = check(d.path(), Path::new(REAL_CRIU));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for row in ["criu", "criu-version", "criu-check"] {
        assert_eq!(result(&stdout, row), "ok", "{stdout}");
    }
    assert_eq!(result(&stdout, "upstream"), "FAIL", "{stdout}");
    // The real CRIU keeps its kernel probe cache (hack/setup.sh sees to it
    // here), in a file that is there.
    assert_eq!(result(&stdout, "criu-kdat-cache"), "ok", "{stdout}");
    let kept = stdout
        .lines()
        .find_map(|l| l.split_once("kept in ").map(|(_, f)| f.trim()))
        .unwrap_or_else(|| panic!("no file named in:\n{stdout}"));
    assert!(Path::new(kept).is_file(), "{kept}");
    // The features row says what CRIU itself finds on this kernel.
    let has = |f: &str| {
        let ok = Command::new(REAL_CRIU)
            .args(["check", "--feature", f])
            .output()
            .unwrap()
            .status
            .success();
        if ok {
            "yes"
        } else {
            "no"
        }
    };
    let (dirty, uffd) = (has("mem_dirty_track"), has("uffd-noncoop"));
    let row =
        format!("soft-dirty tracking (pre-copy): {dirty}; userfaultfd (lazy restore): {uffd}");
    assert!(stdout.contains(&row), "{row} in:\n{stdout}");
    let want = if (dirty, uffd) == ("yes", "yes") {
        "ok"
    } else {
        "warn"
    };
    assert_eq!(result(&stdout, "criu-features"), want, "{stdout}");
    assert!(!out.status.success(), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checks failed"),
        "{out:?}"
    );
}
