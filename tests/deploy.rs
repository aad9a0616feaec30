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
