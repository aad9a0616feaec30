//! Settings: flags win over the TOML file, which wins over defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

pub const DEFAULT_LISTEN: &str = "/run/ckpt-shim/ckpt-shim.sock";
pub const DEFAULT_UPSTREAM: &str = "unix:///run/containerd/containerd.sock";
pub const DEFAULT_CONFIG: &str = "/etc/ckpt-shim/config.toml";
/// Where containerd's runc shim keeps runc state for CRI containers.
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc/k8s.io";
/// How long SIGTERM waits for checkpoints in flight: long enough for a few GiB
/// here, and well within systemd's default stop timeout (90 s).
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 30;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: PathBuf,
    pub upstream: String,
    /// Parent of staging dirs; `None` stages beside the archive (same file system).
    pub staging_dir: Option<PathBuf>,
    pub log_level: String,
    pub criu: PathBuf,
    /// runc state dir of the upstream's containers, to read `config.json` unchanged.
    pub runc_root: PathBuf,
    /// Dump established TCP connections (on by default: the kubelet passes no
    /// options, and a serving container has clients; docs/sockets.md).
    pub tcp_established: bool,
    pub file_locks: bool,
    /// `false` answers CheckpointContainer with UNIMPLEMENTED, like a runtime without it.
    pub checkpoint_enabled: bool,
    /// fdatasync each archive before answering (on by default).
    pub durable: bool,
    /// Stream CRIU's images straight into the archive (`criu dump --stream`, on by
    /// default); `false` dumps into staging first and builds the archive after.
    pub stream: bool,
    /// Where restores wait between CreateContainer and StartContainer; the
    /// runtime's `ckpt-runc` must see the same (`CKPT_SHIM_RESTORE_DIR`).
    pub restore_dir: PathBuf,
    /// Memory to hold frozen containers' pages in, so the pause never waits
    /// for the disk (see [`crate::checkpoint::hold::budget`]).
    pub hold: crate::checkpoint::hold::Policy,
    /// Seal every checkpoint to these age recipients (`age1…`, `ssh-ed25519 …`).
    pub encrypt_to: Vec<String>,
    /// Root-only identity files that open sealed checkpoints restored here.
    pub identities: Vec<PathBuf>,
    /// Serve Prometheus metrics here (`127.0.0.1:9464`, `unix:///path`); off when unset.
    pub metrics_listen: Option<String>,
    /// On SIGTERM, how long checkpoints in flight may go on before they are stopped.
    pub shutdown_grace_seconds: u64,
    /// Restore through CRI lazily: the process runs before its memory is in,
    /// its pages served from the archive as it touches them (docs/restore.md, "Lazy restore"); a
    /// CreateContainer annotation `io.ckpt-shim.lazy-pages` overrides it.
    pub lazy_pages: bool,
    /// Lazy restores' background pushes in flight on the node at once (faults
    /// never wait for one); unset: one per two CPUs.
    pub lazy_push_slots: Option<usize>,
    /// Restores hold the checkpoint's images against the new container's
    /// spec (`enforce`, the default), or restore them as they are (`off`).
    pub restore_policy: crate::restore::policy::Mode,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.into(),
            upstream: DEFAULT_UPSTREAM.into(),
            staging_dir: None,
            log_level: "info".into(),
            criu: "criu".into(),
            runc_root: DEFAULT_RUNC_ROOT.into(),
            tcp_established: true,
            file_locks: true,
            checkpoint_enabled: true,
            durable: true,
            stream: true,
            restore_dir: crate::restore::stage::DEFAULT_ROOT.into(),
            hold: crate::checkpoint::hold::Policy::default(),
            encrypt_to: Vec::new(),
            identities: Vec::new(),
            metrics_listen: None,
            shutdown_grace_seconds: DEFAULT_SHUTDOWN_GRACE_SECONDS,
            lazy_pages: false,
            lazy_push_slots: None,
            restore_policy: crate::restore::policy::Mode::Enforce,
        }
    }
}

impl Config {
    /// The defaults with the TOML file applied over them: `path`, or
    /// [`DEFAULT_CONFIG`] if it exists. Callers apply their flags after.
    pub fn load(path: Option<PathBuf>) -> Result<Config> {
        let (path, optional) = match path {
            Some(p) => (p, false),
            None => (PathBuf::from(DEFAULT_CONFIG), true),
        };
        let mut cfg = Config::default();
        FileConfig::load(&path, optional)?.apply(&mut cfg);
        Ok(cfg)
    }

    /// Where the server notes the cgroups it froze (beside its socket, on /run).
    pub fn journal_dir(&self) -> PathBuf {
        self.listen
            .parent()
            .unwrap_or(Path::new("/run/ckpt-shim"))
            .join("frozen")
    }
}

/// The file's shape; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<PathBuf>,
    pub upstream: Option<String>,
    pub staging_dir: Option<PathBuf>,
    pub log_level: Option<String>,
    pub criu: Option<PathBuf>,
    pub runc_root: Option<PathBuf>,
    pub tcp_established: Option<bool>,
    pub file_locks: Option<bool>,
    pub checkpoint_enabled: Option<bool>,
    pub durable: Option<bool>,
    pub stream: Option<bool>,
    pub restore_dir: Option<PathBuf>,
    /// `"auto"` or MiB.
    pub hold_pages: Option<crate::checkpoint::hold::HoldPages>,
    /// The number form's older name.
    pub hold_pages_mib: Option<u64>,
    pub hold_ceiling_mib: Option<u64>,
    pub hold_floor_mib: Option<u64>,
    pub hold_pressure_pct: Option<f64>,
    pub encrypt_to: Option<Vec<String>>,
    pub identities: Option<Vec<PathBuf>>,
    pub metrics_listen: Option<String>,
    pub shutdown_grace_seconds: Option<u64>,
    pub lazy_pages: Option<bool>,
    pub lazy_push_slots: Option<usize>,
    /// `"enforce"` or `"off"`.
    pub restore_policy: Option<crate::restore::policy::Mode>,
}

impl FileConfig {
    /// Reads `path`; a missing file is an empty config only when `optional`.
    pub fn load(path: &Path, optional: bool) -> Result<FileConfig> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display()))),
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(FileConfig::default())
            }
            Err(e) => Err(Error::InvalidArgument(format!("{}: {e}", path.display()))),
        }
    }

    pub fn apply(self, c: &mut Config) {
        macro_rules! take {
            ($($f:ident),*) => { $(if let Some(v) = self.$f { c.$f = v; })* };
        }
        take!(
            listen,
            upstream,
            log_level,
            criu,
            runc_root,
            tcp_established,
            file_locks,
            checkpoint_enabled,
            durable,
            stream,
            restore_dir,
            encrypt_to,
            identities,
            shutdown_grace_seconds,
            lazy_pages,
            restore_policy
        );
        if self.staging_dir.is_some() {
            c.staging_dir = self.staging_dir;
        }
        let h = &mut c.hold;
        if let Some(p) = self
            .hold_pages_mib
            .map(crate::checkpoint::hold::HoldPages::Mib)
        {
            h.pages = p;
        }
        if let Some(p) = self.hold_pages {
            h.pages = p;
        }
        if let Some(m) = self.hold_ceiling_mib {
            h.ceiling = m << 20;
        }
        if let Some(m) = self.hold_floor_mib {
            h.floor = m << 20;
        }
        if let Some(p) = self.hold_pressure_pct {
            h.pressure_pct = p;
        }
        if self.metrics_listen.is_some() {
            c.metrics_listen = self.metrics_listen;
        }
        if self.lazy_push_slots.is_some() {
            c.lazy_push_slots = self.lazy_push_slots;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_apply_and_unknown_keys_are_refused() {
        let f: FileConfig =
            toml::from_str("upstream = \"unix:///x.sock\"\ntcp_established = false\n").unwrap();
        let mut c = Config::default();
        assert!(c.tcp_established, "on by default");
        f.apply(&mut c);
        assert_eq!(
            (
                c.upstream.as_str(),
                c.tcp_established,
                c.listen.to_str().unwrap()
            ),
            ("unix:///x.sock", false, DEFAULT_LISTEN)
        );
        assert!(toml::from_str::<FileConfig>("listne = \"/x\"").is_err());
        use crate::checkpoint::hold::HoldPages;
        assert_eq!(c.hold.pages, HoldPages::Auto, "pages are held by default");
        let f: FileConfig = toml::from_str("hold_pages_mib = 64\nhold_floor_mib = 100").unwrap();
        f.apply(&mut c);
        assert_eq!(
            (c.hold.pages, c.hold.floor),
            (HoldPages::Mib(64), 100 << 20)
        );
        let d = tempfile::tempdir().unwrap();
        assert!(FileConfig::load(&d.path().join("absent.toml"), true).is_ok());
        assert!(FileConfig::load(&d.path().join("absent.toml"), false).is_err());
    }
}

#[cfg(test)]
mod shipped {
    /// The example config in hack/deploy parses and sets what it says.
    #[test]
    fn deploy_example_parses() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/deploy/config.toml");
        let f = super::FileConfig::load(&p, false).unwrap();
        assert_eq!(f.upstream.as_deref(), Some(super::DEFAULT_UPSTREAM));
        assert_eq!(f.checkpoint_enabled, Some(true));
        assert_eq!(f.tcp_established, Some(true));
        assert_eq!(
            f.restore_policy,
            Some(crate::restore::policy::Mode::Enforce)
        );
        assert_eq!(f.hold_pages, Some(crate::checkpoint::hold::HoldPages::Auto));
        let mut c = super::Config::default();
        f.apply(&mut c);
        assert_eq!(
            c.hold,
            crate::checkpoint::hold::Policy::default(),
            "it says the defaults"
        );
    }
}

/// The upstream's socket path from `unix:///path` (or a plain path).
pub fn socket_path(upstream: &str) -> Result<PathBuf> {
    let path = upstream.strip_prefix("unix://").unwrap_or(upstream);
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "upstream {upstream:?}: only unix:///absolute/path endpoints are supported"
        )));
    }
    Ok(PathBuf::from(path))
}
