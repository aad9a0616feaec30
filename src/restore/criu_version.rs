//! Which CRIU a served restore may rely on.
//!
//! A served restore's page source is the restore's lazy-pages daemon
//! ([`super::push`]); it was once CRIU's own daemon, fed by a page server
//! here, and that protocol's header changed between CRIU 4.1 and 4.2 (criu
//! commit 7e0da4d97), so served restores were held to CRIU 4.2.x. The
//! daemon's side (criu/uffd.c: a pid, its userfaultfd, "restore finished")
//! is the same in every 4.x, but only 4.2.x is tested here: any other CRIU
//! still gets its pages copied (a full restore from the restore dir).

/// Whether the `criu` on PATH (what runc runs) is one served restores are
/// tested on; asked once.
pub fn criu_supported() -> std::result::Result<(), String> {
    static ANSWER: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let out = std::process::Command::new("criu")
                .arg("--version")
                .output()
                .map_err(|e| format!("run criu --version: {e}"))?;
            check_criu_version(&String::from_utf8_lossy(&out.stdout))
        })
        .clone()
}

/// Only CRIU 4.2.x is accepted (see the module's docs).
pub fn check_criu_version(version_output: &str) -> Result<(), String> {
    let v = version_output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(str::trim)
        .ok_or_else(|| format!("cannot tell CRIU's version from {version_output:?}"))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(Some(4)), Some(Some(2))) => Ok(()),
        _ => Err(format!(
            "served restores are tested on CRIU 4.2.x only; this CRIU is {v}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_criu_4_2_is_accepted() {
        assert!(check_criu_version("Version: 4.2.1\n").is_ok());
        assert!(check_criu_version("Version: 4.2\nGitID: v4.2-3-gabc").is_ok());
        let old = check_criu_version("Version: 4.1.1\n").unwrap_err();
        assert!(old.contains("4.2.x") && old.contains("4.1.1"), "{old}");
        assert!(check_criu_version("Version: 4.0\n").is_err());
        assert!(check_criu_version("Version: 4.3\n").is_err());
        assert!(check_criu_version("Version: 5.2\n").is_err());
        assert!(check_criu_version("nonsense").is_err());
    }
}
