//! Step 1: find a container and what a checkpoint needs to know about it.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::error::{Context, Error, Result};

/// A running container, as the engine sees it.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    /// Human-readable name for `config.dump` (CRI: `<container>_<pod>_<ns>_<uid>_<attempt>`).
    pub name: String,
    /// Host pid of the container's init process.
    pub pid: i32,
    /// The OCI config exactly as the runtime received it: written unchanged as `spec.dump`.
    pub spec_raw: Vec<u8>,
    pub spec: Spec,
    /// The container's root directory as the host sees it.
    pub rootfs: PathBuf,
    /// RFC 3339 creation time.
    pub created: String,
    /// Runtime name for `config.dump` (`runc`, `io.containerd.runc.v2`, …).
    pub runtime: String,
    pub image_name: Option<String>,
    pub image_ref: Option<String>,
}

impl Container {
    /// Builds a container from its spec and init pid (the CRI path gets these from
    /// the upstream runtime); checks the process is alive.
    pub fn from_spec(
        id: String,
        pid: i32,
        spec_raw: Vec<u8>,
        bundle: Option<&Path>,
    ) -> Result<Container> {
        let spec: Spec = serde_json::from_slice(&spec_raw)
            .map_err(|e| Error::Other(format!("container {id}: bad OCI spec: {e}")))?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = match (root.is_absolute(), bundle) {
            (true, _) => root,
            (false, Some(b)) => b.join(root),
            // Without a bundle the init process's root is the container root.
            (false, None) => PathBuf::from(format!("/proc/{pid}/root")),
        };
        let annotation = |k: &str| spec.annotations().as_ref().and_then(|a| a.get(k).cloned());
        let image_name = annotation("io.kubernetes.cri.image-name");
        if pid <= 0 || !process_alive(pid) {
            return Err(Error::NotRunning {
                id,
                state: "no init process".into(),
            });
        }
        Ok(Container {
            name: id.clone(),
            id,
            pid,
            spec_raw,
            spec,
            rootfs,
            created: String::new(),
            runtime: "runc".into(),
            image_name,
            image_ref: None,
        })
    }
}

/// Finds container `id_or_prefix` in an OCI runtime state dir (runc/crun layout:
/// `<root>/<id>/state.json`). A full ID wins; otherwise the prefix must be unique.
pub fn from_runtime_root(root: &Path, id_or_prefix: &str) -> Result<Container> {
    validate_id(id_or_prefix)?;
    let id = resolve_prefix(root, id_or_prefix)?;
    let state_path = root.join(&id).join("state.json");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&state_path).ctx(|| format!("read {}", state_path.display()))?,
    )
    .map_err(|e| Error::Other(format!("{}: {e}", state_path.display())))?;
    let pid = state["init_process_pid"].as_i64().unwrap_or(0) as i32;
    let start = state["init_process_start"].as_u64();
    if pid <= 0 || !process_alive(pid) || start.is_some_and(|s| start_time(pid) != Some(s)) {
        return Err(Error::NotRunning {
            id,
            state: "stopped".into(),
        });
    }
    let bundle = bundle_of(&state)
        .ok_or_else(|| Error::Other(format!("{}: no bundle label", state_path.display())))?;
    let config = bundle.join("config.json");
    let spec_raw = std::fs::read(&config).ctx(|| format!("read {}", config.display()))?;
    let mut c = Container::from_spec(id, pid, spec_raw, Some(&bundle))?;
    // runc resolved the rootfs when it started the container; trust that over the bundle.
    if let Some(r) = state["config"]["rootfs"].as_str() {
        c.rootfs = PathBuf::from(r);
    }
    c.created = state["created"].as_str().unwrap_or_default().to_string();
    Ok(c)
}

/// The bundle dir runc recorded in a container's `state.json` (its `bundle=` label).
pub fn bundle_of(state: &serde_json::Value) -> Option<PathBuf> {
    state["config"]["labels"]
        .as_array()?
        .iter()
        .find_map(|l| l.as_str()?.strip_prefix("bundle="))
        .map(PathBuf::from)
}

fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
        return Err(Error::InvalidArgument(format!("bad container ID {id:?}")));
    }
    Ok(())
}

fn resolve_prefix(root: &Path, prefix: &str) -> Result<String> {
    let entries =
        std::fs::read_dir(root).ctx(|| format!("read runtime root {}", root.display()))?;
    let mut matches: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("state.json").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    if matches.iter().any(|m| m == prefix) {
        return Ok(prefix.to_string());
    }
    matches.sort();
    match matches.len() {
        0 => Err(Error::NotFound(prefix.to_string())),
        1 => Ok(matches.remove(0)),
        _ => Err(Error::Ambiguous {
            prefix: prefix.to_string(),
            matches,
        }),
    }
}

/// Alive and not a zombie.
pub fn process_alive(pid: i32) -> bool {
    stat_field(pid, 0).is_some_and(|state| state != "Z" && state != "X")
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks): tells a recycled pid apart.
fn start_time(pid: i32) -> Option<u64> {
    stat_field(pid, 19)?.parse().ok()
}

/// The `n`th field of /proc/<pid>/stat after the command name (0 = state).
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split(' ').nth(n).map(str::to_string)
}
