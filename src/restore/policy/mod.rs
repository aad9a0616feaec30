//! A checkpoint is untrusted input: CRIU restores each process's credentials,
//! capabilities, seccomp filters, limits and mount tree from the images, and
//! the images are whatever the archive's author wrote. Before any restore,
//! the images are held against the new container's OCI spec (the one the
//! runtime generated for this CreateContainer, RestorePod or bundle), never
//! against `config.dump` or `spec.dump`, and the restored tree never holds
//! more than a fresh container of that spec could:
//!
//! - [`creds`]: IDs and groups (refused on a mismatch), capabilities (cut
//!   down), no_new_privs (set), securebits and LSM labels (refused);
//! - [`seccomp`]: the spec's filter replaces the images' chain;
//! - [`limits`]: rlimits, OOM score and scheduling (lowered);
//! - [`mounts`]: the mount tree and the namespaces (refused unless the spec's);
//! - [`files`]: ghost files and terminals (refused if special);
//! - [`images`]: reading all of it as hostile input.
//!
//! What may be lowered is rewritten in the images; what cannot is refused,
//! naming the process, the field, the checkpoint's value and the allowed one.
//! [`confine`] computes the rewrite without writing; [`Confined::write`]
//! writes it. CreateContainer runs the first (to refuse early), the runtime's
//! `ckpt-runc create` and `ckpt-shim restore` both.

pub mod creds;
pub mod files;
pub mod images;
pub mod limits;
pub mod mounts;
pub mod seccomp;
pub mod spec;

use std::path::{Path, PathBuf};

use criu_rpc::image::{self, Kind};
use criu_rpc::images::{SeccompEntry, SeccompFilter, TaskCoreEntry, ThreadCoreEntry};
use prost::Message;
use serde_json::Value;

use crate::error::{Context, Result};
use crate::pbwire::Fields;
use images::{bad, Images, Task, Thread};
use spec::Allowed;

/// The operator's setting (`restore_policy` in the config): `enforce` (the
/// default) or `off`, which restores the images as they are, for a node
/// whose every archive comes from a trusted source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Off,
}

/// The images as a restore may use them: whole files to replace.
#[derive(Debug)]
pub struct Confined {
    writes: Vec<(PathBuf, Vec<u8>)>,
    pub threads: usize,
    pub filtered: bool,
}

const SECCOMP_MODE_FILTER: u64 = 2;

/// Holds the images in `dir` against `spec` (an OCI runtime spec as JSON).
pub fn confine(dir: &Path, spec: &Value) -> Result<Confined> {
    let a = Allowed::from_json(spec)?;
    let images = Images::read(dir)?;
    files::check(&images, &a)?;
    mounts::check(&images, &a)?;
    let bpf = a.seccomp.as_ref().map(seccomp::compile).transpose()?;
    let mut writes = Vec::new();
    for (i, task) in images.tasks.iter().enumerate() {
        for th in task.threads.iter().filter(|t| !t.zombie()) {
            let core = thread(task, th, i == 0, &a, bpf.is_some())?;
            writes.push((th.file.clone(), image::encode(Kind::Core, &[core])));
        }
    }
    let filters = bpf.map(|filter| SeccompFilter {
        filter,
        prev: None,
        flags: Some(0),
    });
    let entry = SeccompEntry {
        seccomp_filters: filters.into_iter().collect(),
    };
    writes.push((
        dir.join("seccomp.img"),
        image::encode(Kind::Seccomp, &[entry.encode_to_vec()]),
    ));
    Ok(Confined {
        threads: writes.len() - 1,
        filtered: !entry.seccomp_filters.is_empty(),
        writes,
    })
}

/// One thread's core image as the restore may use it.
fn thread(task: &Task, th: &Thread, init: bool, a: &Allowed, filtered: bool) -> Result<Vec<u8>> {
    let name = th
        .file
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let wire = |e| bad(&name, e);
    let mut core = Fields::parse(&th.raw).map_err(wire)?;
    let tc: &ThreadCoreEntry = th.core.thread_core.as_ref().expect("checked when read");
    let creds = creds::confine(&task.name(), init, tc.creds.as_ref().expect("checked"), a)?;
    let sched = limits::sched(tc, a);
    let mut t = Fields::parse(core.get(5).unwrap_or_default()).map_err(wire)?;
    t.set(10, &[&creds.encode_to_vec()]);
    if let Some(n) = sched.sched_nice {
        t.set_varint(3, u64::from(((n << 1) ^ (n >> 31)) as u32));
    }
    for (field, v) in [(4, sched.sched_policy), (5, sched.sched_prio)] {
        if let Some(v) = v {
            t.set_varint(field, u64::from(v));
        }
    }
    match filtered {
        true => {
            t.set_varint(11, SECCOMP_MODE_FILTER);
            t.set_varint(12, 0);
        }
        false => {
            t.remove(11);
            t.remove(12);
        }
    }
    core.set(5, &[&t.encode()]);
    if let Some(task_core) = &th.core.tc {
        let raw = core.get(3).unwrap_or_default().to_vec();
        core.set(3, &[&task_core_fields(&raw, task_core, a).map_err(wire)?]);
    }
    Ok(core.encode())
}

/// The task's own part: limits lowered, the old per-task seccomp fields gone.
fn task_core_fields(
    raw: &[u8],
    tc: &TaskCoreEntry,
    a: &Allowed,
) -> Result<Vec<u8>, crate::pbwire::WireError> {
    let mut t = Fields::parse(raw)?;
    if let Some(r) = &tc.rlimits {
        t.set(8, &[&limits::rlimits(r, a).encode_to_vec()]);
    }
    if let Some(v) = limits::oom_score_adj(tc.oom_score_adj, a) {
        t.set_varint(14, v as i64 as u64);
    }
    t.remove(11);
    t.remove(12);
    Ok(t.encode())
}

impl Confined {
    /// Replaces the images, each file whole (a new file renamed over it).
    pub fn write(&self) -> Result<()> {
        for (path, bytes) in &self.writes {
            use std::io::Write;
            let tmp = path.with_extension("img.confined");
            let _ = std::fs::remove_file(&tmp);
            crate::safefs::create_new(&tmp, 0o600)?
                .write_all(bytes)
                .ctx(|| format!("write {}", tmp.display()))?;
            std::fs::rename(&tmp, path).ctx(|| format!("replace {}", path.display()))?;
        }
        Ok(())
    }
}

/// [`confine`] then [`Confined::write`], as the runtime runs it; `Off` does
/// nothing.
pub fn enforce(dir: &Path, spec: &Value, mode: Mode) -> Result<Option<Confined>> {
    if mode == Mode::Off {
        tracing::warn!(images = %dir.display(), "restore policy off: the checkpoint's privileges are restored as they are");
        return Ok(None);
    }
    let c = confine(dir, spec)?;
    c.write()?;
    Ok(Some(c))
}

#[cfg(test)]
mod tests;
