//! `ckpt-shim inspect`: what an archive holds, without extracting it.

use std::fmt::Formatter;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use criu_rpc::proto::DumpStatsEntry;

use crate::checkpoint::collect::ConfigDump;
use crate::error::{Context, Error, Result};
use crate::seal::decrypt::{self, PartAt, Parts};
use crate::seal::{self, Identities, Marker};

#[derive(Debug, Default)]
pub struct Summary {
    pub members: Vec<(String, u64)>,
    pub has_checkpoint_dir: bool,
    pub config: Option<ConfigDump>,
    pub engine: String,
    pub images_bytes: u64,
    pub pages_bytes: u64,
    pub rootfs_diff_bytes: Option<u64>,
    pub deleted_files: Vec<String>,
    pub stats: Option<DumpStatsEntry>,
    pub archive_bytes: u64,
    pub sealed: Option<SealSummary>,
}

/// What a sealed archive's marker says, and whether it was opened.
#[derive(Debug, Default)]
pub struct SealSummary {
    pub members: usize,
    pub parts: usize,
    /// The identity files every part was decrypted and authenticated with.
    pub opened_with: Option<Vec<std::path::PathBuf>>,
}

pub fn inspect(path: &Path) -> Result<Summary> {
    inspect_with(path, &Identities::default())
}

/// [`inspect`]; a sealed archive's sizes come from its marker, and with
/// identities every part is decrypted (authenticated) and `deleted.files` read.
pub fn inspect_with(path: &Path, ids: &Identities) -> Result<Summary> {
    let file = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let meta = file.metadata().ctx(|| format!("stat {}", path.display()))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut s = Summary {
        archive_bytes: meta.len(),
        ..Default::default()
    };
    let mut archive = tar::Archive::new(
        file.try_clone()
            .ctx(|| format!("open {}", path.display()))?,
    );
    let (mut parts, mut marker) = (Parts::new(), None);
    for entry in archive
        .entries_with_seek()
        .ctx(|| format!("read {}", path.display()))?
    {
        let mut e = entry.ctx(|| format!("read {}", path.display()))?;
        let name = e
            .path()
            .ctx(|| "member name".into())?
            .to_string_lossy()
            .into_owned();
        let size = e.size();
        if let Some((base, k)) = seal::parse_part(&name) {
            let at = PartAt {
                at: e.raw_file_position(),
                len: size,
            };
            parts.entry(base.to_string()).or_default().insert(k, at);
        }
        if let Some(m) = s.read_member(&name, size, &mut e)? {
            marker = Some(m);
        }
        s.members.push((name, size));
    }
    if let Some(m) = marker {
        s.sealed = Some(sealed_summary(
            &mut s,
            &Marker::parse(&m)?,
            &parts,
            &file,
            ids,
        )?);
    }
    Ok(s)
}

impl Summary {
    /// What member `name` (of `size` bytes) tells of the checkpoint; the
    /// seal's marker is returned for later.
    fn read_member(
        &mut self,
        name: &str,
        size: u64,
        e: &mut tar::Entry<File>,
    ) -> Result<Option<Vec<u8>>> {
        if e.header().entry_type().is_dir() && name.trim_end_matches('/') == "checkpoint" {
            self.has_checkpoint_dir = true;
        }
        if let Some(img) = name.strip_prefix("checkpoint/") {
            self.images_bytes += size;
            if img.starts_with("pages-") {
                self.pages_bytes += size;
            }
        }
        let mut small = || -> Result<Vec<u8>> {
            let mut b = Vec::new();
            e.take(16 << 20)
                .read_to_end(&mut b)
                .ctx(|| format!("read member {name}"))?;
            Ok(b)
        };
        match name {
            "config.dump" => self.config = serde_json::from_slice(&small()?).ok(),
            "spec.dump" => {
                let spec: serde_json::Value = serde_json::from_slice(&small()?).unwrap_or_default();
                let manager = spec["annotations"]["io.container.manager"].as_str();
                self.engine = engine_name(manager).into();
            }
            "stats-dump" => self.stats = criu_rpc::stats::parse_dump_stats(&small()?).ok(),
            "deleted.files" => {
                self.deleted_files = serde_json::from_slice(&small()?).unwrap_or_default()
            }
            "rootfs-diff.tar" => self.rootfs_diff_bytes = Some(size),
            seal::MARKER => return Ok(Some(small()?)),
            _ => {}
        }
        Ok(None)
    }
}

/// The sizes of a sealed archive's members as its marker gives them (the
/// plaintexts'), and with identities, every part opened.
fn sealed_summary(
    s: &mut Summary,
    m: &Marker,
    parts: &Parts,
    file: &File,
    ids: &Identities,
) -> Result<SealSummary> {
    decrypt::check_parts(m, parts)?;
    let images = m
        .members
        .iter()
        .filter(|x| x.name.starts_with("checkpoint/"));
    s.images_bytes = images.clone().map(|x| x.bytes).sum();
    s.pages_bytes = images
        .filter(|x| x.name.starts_with("checkpoint/pages-"))
        .map(|x| x.bytes)
        .sum();
    s.rootfs_diff_bytes = m
        .members
        .iter()
        .find(|x| x.name == "rootfs-diff.tar")
        .map(|x| x.bytes);
    let mut summary = SealSummary {
        members: m.members.len(),
        parts: m.members.iter().map(|x| x.parts).sum(),
        opened_with: None,
    };
    if ids.is_empty() {
        return Ok(summary);
    }
    for (name, ps) in parts {
        let mut data = Vec::new();
        let mut sink = std::io::sink();
        let out: &mut dyn std::io::Write = if name == "deleted.files" {
            &mut data
        } else {
            &mut sink
        };
        decrypt::open_member(ids, file, name, ps, out)?;
        if name == "deleted.files" {
            s.deleted_files = serde_json::from_slice(&data).unwrap_or_default();
        }
    }
    summary.opened_with = Some(ids.files.clone());
    Ok(summary)
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut Formatter<'_>) -> std::fmt::Result {
        if let Some(c) = &self.config {
            write_container(f, c)?;
        }
        self.write_contents(f)?;
        if let Some(x) = &self.sealed {
            write_sealed(f, x)?;
        }
        if let Some(st) = &self.stats {
            write_stats(f, st)?;
        }
        Ok(())
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

/// Which container was checkpointed, from `config.dump`.
fn write_container(f: &mut Formatter<'_>, c: &ConfigDump) -> std::fmt::Result {
    let runtime = match c.runtime.is_empty() {
        true => "-",
        false => &c.runtime,
    };
    writeln!(f, "container:    {} ({})", c.name, c.id)?;
    writeln!(
        f,
        "image:        {}",
        c.rootfs_image_name.as_deref().unwrap_or("-")
    )?;
    writeln!(f, "runtime:      {runtime}")?;
    writeln!(f, "created:      {}", c.created_time)?;
    writeln!(f, "checkpointed: {}", c.checkpointed_time)
}

impl Summary {
    /// The engine, and what the archive holds: its size and members, CRIU's
    /// images and pages, the rootfs diff.
    fn write_contents(&self, f: &mut Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "engine:       {}", self.engine)?;
        writeln!(
            f,
            "archive:      {} in {} members",
            mib(self.archive_bytes),
            self.members.len()
        )?;
        writeln!(
            f,
            "criu images:  {} (memory pages {})",
            mib(self.images_bytes),
            mib(self.pages_bytes)
        )?;
        match self.rootfs_diff_bytes {
            Some(b) => writeln!(
                f,
                "rootfs diff:  {} , {} deleted paths",
                mib(b),
                self.deleted_files.len()
            ),
            None => writeln!(f, "rootfs diff:  none"),
        }
    }
}

/// How a sealed archive is sealed, and whether it was opened.
fn write_sealed(f: &mut Formatter<'_>, x: &SealSummary) -> std::fmt::Result {
    let files = |p: &[std::path::PathBuf]| {
        p.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &x.opened_with {
        Some(with) => writeln!(f, "encrypted:    age, {} members in {} parts; every part opened and authenticated with {}", x.members, x.parts, files(with)),
        None => writeln!(f, "encrypted:    age, {} members in {} parts (--identity opens and authenticates them, and shows deleted paths)", x.members, x.parts),
    }
}

/// CRIU's own statistics of the dump.
fn write_stats(f: &mut Formatter<'_>, st: &DumpStatsEntry) -> std::fmt::Result {
    let ms = |us: Option<u32>| format!("{:.1} ms", us.unwrap_or(0) as f64 / 1000.0);
    writeln!(
        f,
        "criu stats:   freezing {}, frozen {}, memdump {}, memwrite {}, pages scanned {}, written {}",
        ms(st.freezing_time),
        ms(st.frozen_time),
        ms(st.memdump_time),
        ms(st.memwrite_time),
        st.pages_scanned.unwrap_or(0),
        st.pages_written.unwrap_or(0)
    )
}

/// The engine that made a checkpoint, as checkpointctl tells it: by the spec's
/// `io.container.manager` annotation.
pub fn engine_name(manager: Option<&str>) -> &'static str {
    match manager {
        Some("cri-o") => "CRI-O",
        Some("libpod") => "Podman",
        _ => "containerd",
    }
}

/// [`engine_name`] from a spec's annotations.
pub fn engine_of(annotations: &std::collections::HashMap<String, String>) -> &'static str {
    engine_name(annotations.get("io.container.manager").map(String::as_str))
}
