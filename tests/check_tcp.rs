//! `ckpt-shim check`'s `criu-tcp-dump` row: a real dump, with the real CRIU,
//! of a throwaway holding a listening and an established loopback TCP socket.

mod common;

use std::path::Path;
use std::process::{Command, Output};

const REAL_CRIU: &str = "/usr/local/sbin/criu";

/// `ckpt-shim check` with an empty config and `criu`, its temporary files in
/// `dir/tmp`, run through `wrap` (e.g. `setpriv …`) if given.
fn check(dir: &Path, criu: &Path, wrap: &[&str]) -> Output {
    common::require(&["setpriv"]);
    let config = dir.join("config.toml");
    std::fs::write(&config, "").unwrap();
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let upstream = format!("unix://{}", dir.join("absent.sock").display());
    let shim = env!("CARGO_BIN_EXE_ckpt-shim");
    let mut cmd = match wrap {
        [] => Command::new(shim),
        [first, rest @ ..] => {
            let mut c = Command::new(first);
            c.args(rest).arg(shim);
            c
        }
    };
    cmd.args(["check", "--upstream", &upstream, "--config"])
        .arg(&config)
        .arg("--criu")
        .arg(criu)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap()
}

/// The (result, detail) of the row named `name`.
fn row<'a>(stdout: &'a str, name: &str) -> (&'a str, &'a str) {
    stdout
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?.trim_start();
            let (result, detail) = rest.split_once(char::is_whitespace)?;
            Some((result, detail.trim()))
        })
        .unwrap_or_else(|| panic!("no {name} row in:\n{stdout}"))
}

/// Nothing of the probe is left: no temporary images, and no throwaway (it
/// has `dir/tmp` as its TMPDIR, inherited from the check).
fn assert_nothing_left(dir: &Path) {
    let tmp = dir.join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    let marker = format!("TMPDIR={}", tmp.display());
    let alive: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .unwrap_or_default()
                .split(|&b| b == 0)
                .any(|v| v == marker.as_bytes())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(alive.is_empty(), "the throwaway runs on: pids {alive:?}");
}

#[test]
fn criu_4_2_1_dumps_a_listening_and_an_established_tcp_socket() {
    common::require(&["criu", "sleep"]);
    let d = tempfile::tempdir().unwrap();
    let out = check(d.path(), Path::new(REAL_CRIU), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (result, detail) = row(&stdout, "criu-tcp-dump");
    assert_eq!(result, "ok", "{stdout}");
    assert!(
        detail.contains("established loopback TCP socket") && detail.contains("works on"),
        "{stdout}"
    );
    assert_eq!(row(&stdout, "criu-version"), ("ok", "4.2.1"), "{stdout}");
    assert_nothing_left(d.path());
}

/// Without CAP_NET_ADMIN (dropped from the bounding set, so CRIU, the
/// check's child, has it neither) CRIU cannot put the connection into repair
/// mode: the row fails with that line of CRIU's log, not with one of the
/// harmless errors CRIU logs before it.
#[test]
fn without_net_admin_the_row_fails_with_criu_s_reason() {
    common::require(&["criu", "sleep"]);
    let d = tempfile::tempdir().unwrap();
    let wrap = [
        "setpriv",
        "--bounding-set",
        "-net_admin",
        "--inh-caps",
        "-net_admin",
    ];
    let out = check(d.path(), Path::new(REAL_CRIU), &wrap);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let (result, detail) = row(&stdout, "criu-tcp-dump");
    assert_eq!(result, "FAIL", "{stdout}");
    assert!(
        detail.starts_with("CRIU cannot dump TCP sockets: ")
            && detail.contains("Can't turn TCP repair mode ON: Operation not permitted"),
        "{stdout}"
    );
    assert_nothing_left(d.path());
}

/// A CRIU that is not 4.2.x passes the version row with a warning: the lazy
/// restore's page server speaks 4.2's protocol only. This one cannot run
/// the dump.
#[test]
fn a_criu_other_than_4_2_warns_and_fails_the_dump_row() {
    let d = tempfile::tempdir().unwrap();
    let stub = d.path().join("criu-4.1");
    std::fs::write(
        &stub,
        "#!/bin/sh\n[ \"$1\" = --version ] && exec echo 'Version: 4.1.1'\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = check(d.path(), &stub, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (result, detail) = row(&stdout, "criu-version");
    assert_eq!(result, "warn", "{stdout}");
    assert!(
        detail.contains("4.1.1") && detail.contains("tested on CRIU 4.2.x only"),
        "{stdout}"
    );
    let (result, detail) = row(&stdout, "criu-tcp-dump");
    assert_eq!(result, "FAIL", "{stdout}");
    // It exits at once: our request meets a closed socket, or CRIU's exit.
    assert!(
        detail.starts_with("CRIU cannot dump TCP sockets: CRIU "),
        "{stdout}"
    );
    assert_nothing_left(d.path());
}
