//! A checkpoint archive, opened for a restore: checked member by member before
//! anything is written, its metadata read, and extracted into a private dir.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::Deserialize;

use crate::archive::{safe_member_name, ArchiveWriter, Target};
use crate::collect::ConfigDump;
use crate::error::{Context, Error, Result};
use crate::safefs;
use crate::seal::decrypt::{self, PartAt, Parts};
use crate::seal::{self, Identities, Marker};
use std::sync::Arc;

/// Members read into memory while checking the archive; they are small.
const METADATA: &[&str] = &["spec.dump", "config.dump", "bind.mounts", seal::MARKER];
const METADATA_MAX: u64 = 16 << 20;

/// CRI-O's `bind.mounts` entry, as `collect::bind_mounts` writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct BindMount {
    pub source: String,
    pub destination: String,
    pub file_type: String,
}

/// What a restore needs to know of an archive before extracting it.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub spec: Spec,
    pub config: ConfigDump,
    pub bind_mounts: Vec<BindMount>,
    /// A sealed archive's parts (see [`crate::seal`]); `spec` is then the
    /// readable one, with its secrets out, until [`Checkpoint::unseal`].
    pub sealed: Option<Sealed>,
}

#[derive(Debug)]
pub struct Sealed {
    pub marker: Marker,
    pub parts: Parts,
    /// The identities that opened it.
    opened: Option<Arc<Identities>>,
}

impl Checkpoint {
    /// Checks `path` as a checkpoint archive and reads its metadata. Refused
    /// (InvalidArgument) unless it is a regular file holding a tar of safe
    /// regular files and directories with `checkpoint/inventory.img`,
    /// `spec.dump` and `config.dump`; sealed, with every part
    /// `encryption.json` lists. Page data is skipped, not read.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let not = |why: String| {
            Error::InvalidArgument(format!(
                "{} is not a checkpoint archive: {why}",
                path.display()
            ))
        };
        let file = regular_file(path)?;
        let mut ar = tar::Archive::new(file);
        let (mut found_inventory, mut meta) = (false, std::collections::HashMap::new());
        let mut parts = Parts::new();
        for entry in ar.entries_with_seek().map_err(|e| not(e.to_string()))? {
            let mut e = entry.map_err(|e| not(e.to_string()))?;
            let name = check_entry(&e)?;
            let name = name.to_string_lossy().into_owned();
            let (base, part) = match seal::parse_part(&name) {
                Some((base, k)) => (base, Some(k)),
                None => (name.as_str(), None),
            };
            found_inventory |= base == "checkpoint/inventory.img";
            if let Some(k) = part {
                let at = PartAt {
                    at: e.raw_file_position(),
                    len: e.size(),
                };
                parts.entry(base.to_string()).or_default().insert(k, at);
                continue;
            }
            if METADATA.contains(&name.as_str()) {
                if e.size() > METADATA_MAX {
                    return Err(not(format!("{name} is {} bytes", e.size())));
                }
                let mut buf = Vec::with_capacity(e.size() as usize);
                e.read_to_end(&mut buf).map_err(|e| not(e.to_string()))?;
                meta.insert(name, buf);
            }
        }
        let mut take = |n: &str| meta.remove(n).ok_or_else(|| not(format!("no {n}")));
        if !found_inventory {
            return Err(not("no checkpoint/inventory.img".into()));
        }
        let spec = serde_json::from_slice(&take("spec.dump")?)
            .map_err(|e| not(format!("spec.dump: {e}")))?;
        let config = serde_json::from_slice(&take("config.dump")?)
            .map_err(|e| not(format!("config.dump: {e}")))?;
        let bind_mounts = match take("bind.mounts") {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| not(format!("bind.mounts: {e}")))?,
            Err(_) => Vec::new(),
        };
        let sealed = match take(seal::MARKER) {
            Ok(m) => {
                let marker = Marker::parse(&m)?;
                decrypt::check_parts(&marker, &parts)?;
                Some(Sealed {
                    marker,
                    parts,
                    opened: None,
                })
            }
            Err(_) if parts.is_empty() => None,
            Err(_) => return Err(not(format!("sealed parts but no {}", seal::MARKER))),
        };
        Ok(Checkpoint {
            path: path.to_path_buf(),
            spec,
            config,
            bind_mounts,
            sealed,
        })
    }

    /// Opens a sealed archive with `ids`: its full spec is read (so a wrong key
    /// fails here, before anything is written), and [`extract`](Self::extract)
    /// can decrypt the rest. Nothing to do for a plain archive.
    pub fn unseal(&mut self, ids: Arc<Identities>) -> Result<()> {
        let Some(sealed) = &mut self.sealed else {
            return Ok(());
        };
        let spec_parts = sealed.parts.get("spec.dump").ok_or_else(|| {
            Error::InvalidArgument(format!("{}: no sealed spec.dump", self.path.display()))
        })?;
        let file = regular_file(&self.path)?;
        let mut spec = Vec::new();
        decrypt::open_member(&ids, &file, "spec.dump", spec_parts, &mut spec)?;
        self.spec = serde_json::from_slice(&spec)
            .map_err(|e| Error::InvalidArgument(format!("sealed spec.dump: {e}")))?;
        sealed.opened = Some(ids);
        Ok(())
    }

    /// Extracts the archive into `dest`, a fresh private directory; a sealed
    /// one decrypted (it must have been [`unseal`](Self::unseal)ed).
    pub fn extract(&self, dest: &Path) -> Result<()> {
        let Some(sealed) = &self.sealed else {
            return extract(&self.path, dest);
        };
        let Some(ids) = &sealed.opened else {
            return Err(Error::Sealed(format!(
                "{} is encrypted; give the identity that opens it",
                self.path.display()
            )));
        };
        extract_except(&self.path, dest, &sealed.marker.redacted)?;
        decrypt::open_into(ids, &regular_file(&self.path)?, &sealed.parts, dest)
    }

    /// Writes the plain archive of an unsealed one at `output` (new, root-only,
    /// renamed into place when complete): the members as they were, each
    /// sealed member decrypted in its place, without the readable spec or the
    /// marker. Returns its size.
    pub fn write_plain(&self, output: &Path) -> Result<u64> {
        let (sealed, ids) = match &self.sealed {
            Some(Sealed {
                opened: Some(ids), ..
            }) => (self.sealed.as_ref().expect("matched"), ids),
            Some(_) => return Err(Error::Sealed("give the identity that opens it".into())),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "{} is not encrypted",
                    self.path.display()
                )))
            }
        };
        let src = regular_file(&self.path)?;
        let mut w = ArchiveWriter::create(&Target::new(output)?)?;
        let mut ar = tar::Archive::new(
            src.try_clone()
                .ctx(|| format!("open {}", self.path.display()))?,
        );
        let mut done = std::collections::HashSet::new();
        for entry in ar
            .entries_with_seek()
            .ctx(|| format!("read {}", self.path.display()))?
        {
            let e = entry.ctx(|| format!("read {}", self.path.display()))?;
            let name = check_entry(&e)?.to_string_lossy().into_owned();
            if let Some((base, _)) = seal::parse_part(&name) {
                if done.insert(base.to_string()) {
                    let bytes = sealed
                        .marker
                        .members
                        .iter()
                        .find(|m| m.name == base)
                        .map_or(0, |m| m.bytes);
                    let parts = &sealed.parts[base];
                    w.add_with(base, bytes, |out| {
                        decrypt::open_member(ids, &src, base, parts, out)
                    })?;
                }
            } else if e.header().entry_type() == tar::EntryType::Directory {
                w.add_dir(&name)?;
            } else if name != seal::MARKER && !sealed.marker.redacted.contains(&name) {
                w.add_file_range(&name, &src, e.raw_file_position(), e.size())?;
            }
        }
        w.commit(true)
    }

    /// The image the checkpointed container ran: its ID or digest, then its name.
    pub fn base_image(&self) -> (Option<&str>, Option<&str>) {
        let c = &self.config;
        let name = c.rootfs_image_name.as_deref().or(c.rootfs_image.as_deref());
        (
            c.rootfs_image_ref.as_deref().filter(|s| !s.is_empty()),
            name.filter(|s| !s.is_empty()),
        )
    }
}

pub(crate) fn regular_file(path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::InvalidArgument(format!("{}: no such file", path.display()))
        }
        _ => Error::InvalidArgument(format!("{}: {e}", path.display())),
    })?;
    let meta = file.metadata().ctx(|| format!("stat {}", path.display()))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// A member's name, if it is one a restore may write: relative, without `..`,
/// and a regular file or a directory.
pub(crate) fn check_entry<R: Read>(e: &tar::Entry<R>) -> Result<PathBuf> {
    let name = e.path().ctx(|| "member name".into())?.into_owned();
    if !safe_member_name(&name) {
        return Err(Error::UnsafeArchive(name.display().to_string()));
    }
    match e.header().entry_type() {
        tar::EntryType::Directory | tar::EntryType::Regular | tar::EntryType::Continuous => {
            Ok(name)
        }
        other => Err(Error::UnsafeArchive(format!(
            "{} ({other:?} entries are refused)",
            name.display()
        ))),
    }
}

/// Members at least this large are moved with [`crate::fcopy`] (shared extents
/// where the file system has them); smaller ones are read and written.
const MOVE_FROM: u64 = 1 << 20;

/// Extracts `archive` into `dest` (a fresh directory): regular files and
/// directories only, relative names without `..`, nothing followed or replaced.
/// Large members (the memory pages) move file to file in the kernel, and share
/// the archive's extents on XFS or btrfs (archives 4 KiB-align them). Sealed
/// parts and the seal's marker are left out (see [`Checkpoint::extract`]).
pub fn extract(archive: &Path, dest: &Path) -> Result<()> {
    extract_except(archive, dest, &[])
}

/// [`extract`], leaving out the `skip`ped members too.
pub(crate) fn extract_except(archive: &Path, dest: &Path, skip: &[String]) -> Result<()> {
    let source = regular_file(archive)?;
    let mut ar = tar::Archive::new(
        source
            .try_clone()
            .ctx(|| format!("open {}", archive.display()))?,
    );
    for entry in ar
        .entries_with_seek()
        .ctx(|| format!("read {}", archive.display()))?
    {
        let mut e = entry.ctx(|| format!("read {}", archive.display()))?;
        let name = check_entry(&e)?;
        let text = name.to_string_lossy();
        if seal::parse_part(&text).is_some()
            || text == seal::MARKER
            || skip.iter().any(|s| *s == text)
        {
            continue;
        }
        let out = dest.join(&name);
        let dir = if e.header().entry_type() == tar::EntryType::Directory {
            Some(out.as_path())
        } else {
            out.parent()
        };
        if let Some(d) = dir {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .ctx(|| format!("create {}", d.display()))?;
        }
        if e.header().entry_type() == tar::EntryType::Directory {
            continue;
        }
        // Parents were made by us from checked names, so no link can redirect this.
        let mut f = safefs::create_new(&out, 0o600)?;
        let size = e.size();
        if size >= MOVE_FROM {
            crate::fcopy::copy_range(&source, e.raw_file_position(), &f, 0, size, true)
                .ctx(|| format!("extract {}", out.display()))?;
        } else {
            std::io::copy(&mut e, &mut f).ctx(|| format!("extract {}", out.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with one entry whose name and type are written raw, bypassing the
    /// tar crate's own checks, as a hostile archive would be.
    fn hostile(name: &str, kind: tar::EntryType, link: Option<&str>) -> tempfile::NamedTempFile {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        b.append(&h, std::io::empty()).unwrap();
        b.finish().unwrap();
        f
    }

    #[test]
    fn extraction_refuses_traversal_links_and_devices() {
        let cases = [
            ("/etc/evil", tar::EntryType::Regular, None),
            ("../evil", tar::EntryType::Regular, None),
            ("checkpoint/../../evil", tar::EntryType::Regular, None),
            (
                "checkpoint/link",
                tar::EntryType::Symlink,
                Some("/etc/passwd"),
            ),
            ("checkpoint/hard", tar::EntryType::Link, Some("/etc/passwd")),
            ("checkpoint/null", tar::EntryType::Char, None),
            ("checkpoint/fifo", tar::EntryType::Fifo, None),
        ];
        for (name, kind, link) in cases {
            let ar = hostile(name, kind, link);
            let dest = tempfile::tempdir().unwrap();
            let err = extract(ar.path(), dest.path()).unwrap_err();
            assert!(matches!(err, Error::UnsafeArchive(_)), "{name}: {err:?}");
            assert_eq!(
                std::fs::read_dir(dest.path()).unwrap().count(),
                0,
                "{name}: something was written"
            );
        }
    }

    #[test]
    fn extraction_of_a_plain_archive_works() {
        let ar = hostile("checkpoint/inventory.img", tar::EntryType::Regular, None);
        let dest = tempfile::tempdir().unwrap();
        extract(ar.path(), dest.path()).unwrap();
        assert!(dest.path().join("checkpoint/inventory.img").is_file());
    }

    /// An archive with these (name, data) regular files, then one hostile entry.
    fn archive_with(
        files: &[(&str, &[u8])],
        hostile_last: Option<&str>,
    ) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            b.append_data(&mut h, name, *data).unwrap();
        }
        if let Some(name) = hostile_last {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        b.finish().unwrap();
        f
    }

    #[test]
    fn open_checks_every_member_and_reads_the_metadata() {
        let spec = serde_json::to_vec(&oci_spec::runtime::Spec::default()).unwrap();
        let config = br#"{"id":"x","name":"n","rootfsImageName":"docker.io/library/a:1","rootfsImageRef":"sha256:ab","createdTime":"","checkpointedTime":"","restoredTime":"","restored":false}"#;
        let good: Vec<(&str, &[u8])> = vec![
            ("spec.dump", &spec),
            ("config.dump", config),
            ("checkpoint/inventory.img", b"i"),
        ];
        let c = Checkpoint::open(archive_with(&good, None).path()).unwrap();
        assert_eq!(
            c.base_image(),
            (Some("sha256:ab"), Some("docker.io/library/a:1"))
        );
        assert!(c.bind_mounts.is_empty());
        // A link after the metadata is still seen, before anything is written.
        assert!(matches!(
            Checkpoint::open(archive_with(&good, Some("checkpoint/x")).path()),
            Err(Error::UnsafeArchive(_))
        ));
        for missing in ["spec.dump", "config.dump", "checkpoint/inventory.img"] {
            let some: Vec<_> = good
                .iter()
                .filter(|(n, _)| *n != missing)
                .cloned()
                .collect();
            let err = Checkpoint::open(archive_with(&some, None).path()).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(ref m) if m.contains(missing)),
                "{err}"
            );
        }
        let not_tar = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_tar.path(), vec![7u8; 2000]).unwrap();
        assert!(matches!(
            Checkpoint::open(not_tar.path()),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Checkpoint::open(Path::new("/")),
            Err(Error::InvalidArgument(_))
        ));
    }
}
