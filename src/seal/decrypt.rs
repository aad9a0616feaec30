//! The opening side: sealed members read back with identities, each part
//! authenticated as it is decrypted. A part whose identity is not among the
//! ones given is [`Error::Sealed`]; one that fails authentication (a changed
//! byte, a cut file) is [`Error::Tampered`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use super::{Identities, Marker, PART};
use crate::error::{Context, Error, Result};

/// Where a part lies in an archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartAt {
    pub at: u64,
    pub len: u64,
}

/// The sealed members of an archive: their parts, by index, where they lie.
pub type Parts = BTreeMap<String, BTreeMap<usize, PartAt>>;

/// Decrypts one part (`r`, an age file) into `out`; returns its plaintext size.
pub fn open_part(ids: &Identities, member: &str, r: impl Read, out: &mut dyn Write) -> Result<u64> {
    if ids.is_empty() {
        return Err(Error::Sealed(format!(
            "{member} is encrypted and no identity was given to decrypt it"
        )));
    }
    let tampered = |why: String| Error::Tampered(format!("{member}: {why}"));
    let d = age::Decryptor::new(r).map_err(|e| tampered(e.to_string()))?;
    let mut plain = d.decrypt(ids.iter()).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => Error::Sealed(format!(
            "{member} was encrypted to other recipients: no identity in {} decrypts it",
            ids.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        e => tampered(e.to_string()),
    })?;
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        let m = match plain.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(tampered(e.to_string())),
        };
        out.write_all(&buf[..m])
            .ctx(|| format!("write out {member}"))?;
        n += m as u64;
    }
}

/// Reads `len` bytes of a file from `at`, without moving its offset.
pub struct RangeReader<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl<'a> RangeReader<'a> {
    pub fn new(file: &'a File, p: PartAt) -> RangeReader<'a> {
        RangeReader {
            file,
            at: p.at,
            end: p.at + p.len,
        }
    }
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min((self.end - self.at) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Checks the parts found against `encryption.json`: every member it lists
/// with exactly its parts, and no sealed member it does not list.
pub fn check_parts(marker: &Marker, parts: &Parts) -> Result<()> {
    for m in &marker.members {
        let found = parts
            .get(&m.name)
            .map(|p| p.keys().copied().collect::<Vec<_>>())
            .unwrap_or_default();
        if found != (0..m.parts).collect::<Vec<_>>() {
            return Err(Error::Tampered(format!(
                "{} should have parts 0..{}, the archive has {found:?}",
                m.name, m.parts
            )));
        }
    }
    if let Some(extra) = parts
        .keys()
        .find(|n| !marker.members.iter().any(|m| &m.name == *n))
    {
        return Err(Error::Tampered(format!(
            "{extra} is sealed but not listed in {}",
            super::MARKER
        )));
    }
    Ok(())
}

/// Decrypts a member's parts in order into `out`; checks its size.
pub fn open_member(
    ids: &Identities,
    archive: &File,
    name: &str,
    parts: &BTreeMap<usize, PartAt>,
    out: &mut dyn Write,
) -> Result<u64> {
    let mut total = 0;
    let last = parts.len().saturating_sub(1);
    for (&k, &p) in parts {
        let n = open_part(
            ids,
            &super::part_name(name, k),
            RangeReader::new(archive, p),
            out,
        )?;
        part_size_ok(name, k, last, n)?;
        total += n;
    }
    Ok(total)
}

/// Every part but the last holds exactly [`PART`] bytes; the last, at most.
fn part_size_ok(name: &str, k: usize, last: usize, n: u64) -> Result<()> {
    let ok = if k < last {
        n == PART as u64
    } else {
        n <= PART as u64
    };
    if !ok {
        return Err(Error::Tampered(format!("{name} part {k} holds {n} bytes")));
    }
    Ok(())
}

/// Decrypts every sealed member of `archive` into `dest/<name>` (files made
/// root-only here), parts spread over the cores.
pub fn open_into(ids: &Identities, archive: &File, parts: &Parts, dest: &Path) -> Result<()> {
    let mut jobs = Vec::new();
    let mut files = Vec::new();
    for (name, ps) in parts {
        let out = dest.join(name);
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        }
        files.push(crate::safefs::create_new(&out, 0o600)?);
        let last = ps.len().saturating_sub(1);
        jobs.extend(
            ps.iter()
                .map(|(&k, &p)| (files.len() - 1, name.as_str(), k, last, p)),
        );
    }
    let jobs = Mutex::new(jobs.into_iter());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = Vec::with_capacity(PART);
                    loop {
                        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).next();
                        let Some((f, name, k, last, p)) = job else {
                            return Ok(());
                        };
                        buf.clear();
                        let n = open_part(
                            ids,
                            &super::part_name(name, k),
                            RangeReader::new(archive, p),
                            &mut buf,
                        )?;
                        part_size_ok(name, k, last, n)?;
                        files[f]
                            .write_all_at(&buf, (k * PART) as u64)
                            .ctx(|| format!("write {name}"))?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Other("decrypting worker panicked".into())))
            })
            .collect::<Result<Vec<()>>>()
    })?;
    Ok(())
}
