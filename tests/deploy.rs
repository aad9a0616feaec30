//! Node set-up scripts, run against scratch files.

use std::path::Path;
use std::process::Command;

#[test]
fn install_links_ckpt_runc_and_sets_it_as_the_runtimes_runc() {
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("config.toml");
    let section = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]"#;
    std::fs::write(
        &config,
        format!("version = 2\n{section}\n    SystemdCgroup = true\n    BinaryName = \"/usr/sbin/runc\"\n[other]\n  BinaryName = \"keep\"\n"),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/deploy/install.sh");
    let prefix = d.path().join("prefix");
    for _ in 0..2 {
        let out = Command::new("bash")
            .arg(&script)
            .args(["--binary", env!("CARGO_BIN_EXE_ckpt-shim"), "--prefix"])
            .arg(&prefix)
            .arg("--containerd-config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&config).unwrap();
    let want = format!("BinaryName = \"{}/bin/ckpt-runc\"", prefix.display());
    assert_eq!(text.matches("BinaryName").count(), 2, "{text}");
    assert!(
        text.contains(&format!("{section}\n  {want}\n    SystemdCgroup = true")),
        "{text}"
    );
    assert!(
        text.contains("BinaryName = \"keep\""),
        "another section's was changed: {text}"
    );
    assert_eq!(
        std::fs::read_link(prefix.join("bin/ckpt-runc")).unwrap(),
        Path::new("ckpt-shim")
    );
    // ckpt-runc is runc for everything it does not restore.
    let v = Command::new(prefix.join("bin/ckpt-runc"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("runc version"),
        "{v:?}"
    );
}

/// Runs `debian_archive_uri ROOT` from hack/apt-source.sh.
fn archive_uri(root: &Path) -> std::process::Output {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/apt-source.sh");
    Command::new("bash")
        .arg("-c")
        .arg(r#"source "$1"; debian_archive_uri "$2""#)
        .arg("bash")
        .arg(&lib)
        .arg(root)
        .output()
        .unwrap()
}

fn fake_root(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("etc/apt/sources.list.d")).unwrap();
    for (path, text) in files {
        std::fs::write(d.path().join(path), text).unwrap();
    }
    d
}

#[test]
fn setup_takes_the_debian_archive_from_apts_own_configuration() {
    const MIRROR: &str = "http://mirror.example.invalid/debian";
    let stdout = |root: &Path| {
        let out = archive_uri(root);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // deb822, as Debian 12 writes it; the security archive and a third-party
    // repository for the same release come first and are passed over.
    let deb822 = fake_root(&[(
        "etc/apt/sources.list.d/debian.sources",
        "Types: deb\nURIs: http://mirror.example.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
         Types: deb\nURIs: https://download.example.invalid/linux/debian\nSuites: bookworm\nComponents: stable\n\n\
         # the archive\nTypes: deb deb-src\nURIs: http://mirror.example.invalid/debian http://other.example.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main contrib\n",
    )]);
    assert_eq!(stdout(deb822.path()), format!("{MIRROR}\n"));

    // The classic one-line form, with options in brackets.
    let classic = fake_root(&[(
        "etc/apt/sources.list",
        "deb http://mirror.example.invalid/debian-security bookworm-security main\n\
         # deb http://commented.example.invalid/debian bookworm main\n\
         deb [ arch=amd64 signed-by=/usr/share/keyrings/k.gpg ] http://mirror.example.invalid/debian bookworm main non-free\n",
    )]);
    assert_eq!(stdout(classic.path()), format!("{MIRROR}\n"));

    let empty = fake_root(&[]);
    let out = archive_uri(empty.path());
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no Debian archive found"),
        "{out:?}"
    );
}
