//! The sealing side: members encrypted part by part as they are written, so
//! that no plaintext reaches a disk.
//!
//! A stream (CRIU's pages, through a pipe) is sealed by three kinds of thread:
//! one reads the stream into free slots (memory faulted in before the freeze,
//! so that during the pause the pipe drains at memory speed), workers encrypt
//! full slots into parts (one per core: age runs at about 0.8 GB/s a core
//! here), and the caller's thread writes the parts in order. A slot is free
//! again once its part is encrypted.
//!
//! While the stream still flows and most slots are free, the workers wait
//! ([`Gate`]): with the pages held in memory, the stream is CRIU dumping a
//! frozen container, and encrypting alongside would take the two cores from
//! CRIU and the reader, and so lengthen the pause. They start once the stream
//! has ended (the container runs again) or the free slots run low.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::{part_name, Marker, Recipients, SealedMember, PART};
use crate::checkpoint::archive::ArchiveWriter;
use crate::error::{Context, Error, Result};

/// Where sealed parts go.
pub trait PartSink {
    fn put(&mut self, member: &str, data: &[u8]) -> Result<()>;
}

impl PartSink for ArchiveWriter {
    fn put(&mut self, member: &str, data: &[u8]) -> Result<()> {
        self.add_bytes(member, data)
    }
}

/// Seals the members of one archive to its recipients, and keeps the list
/// `encryption.json` gives.
pub struct Sealer {
    recipients: Arc<Recipients>,
    sealed: Mutex<Vec<SealedMember>>,
    workers: usize,
}

impl Sealer {
    pub fn new(recipients: Arc<Recipients>) -> Sealer {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Sealer {
            recipients,
            sealed: Mutex::default(),
            workers,
        }
    }

    /// How many slots [`add_stream`](Self::add_stream) needs at least.
    pub fn min_slots(&self) -> usize {
        self.workers + 1
    }

    /// `plain` as one age file, into `out` (cleared first).
    pub fn seal_part(&self, plain: &[u8], out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        let mut w = self
            .recipients
            .encryptor()?
            .wrap_output(&mut *out)
            .ctx(|| "start an age file".into())?;
        w.write_all(plain).ctx(|| "encrypt".into())?;
        w.finish().ctx(|| "finish an age file".into())?;
        Ok(())
    }

    fn record(&self, name: &str, parts: usize, bytes: u64) {
        let m = SealedMember {
            name: name.into(),
            parts,
            bytes,
        };
        self.sealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(m);
    }

    /// `encryption.json` for the members sealed so far.
    pub fn marker(&self) -> Vec<u8> {
        let members = self
            .sealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        serde_json::to_vec_pretty(&Marker::new(members)).expect("JSON serialises")
    }

    /// Seals `data` as member `name` into `sink`, on this thread.
    pub fn add_bytes(&self, sink: &mut dyn PartSink, name: &str, data: &[u8]) -> Result<()> {
        let mut ct = Vec::new();
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![data]
        } else {
            data.chunks(PART).collect()
        };
        for (k, chunk) in chunks.iter().enumerate() {
            self.seal_part(chunk, &mut ct)?;
            sink.put(&part_name(name, k), &ct)?;
        }
        self.record(name, chunks.len(), data.len() as u64);
        Ok(())
    }

    /// Seals everything `source` yields as member `name` into `sink` (see the
    /// module's doc), reading into `slots` ([`PART`] bytes each). `ended` is
    /// called once the source is exhausted; `stop` abandons the member.
    /// Returns the plaintext's size.
    pub fn add_stream(
        &self,
        sink: &mut dyn PartSink,
        name: &str,
        source: &mut (dyn Read + Send),
        slots: Vec<&mut [u8]>,
        ended: &(dyn Fn() + Sync),
        stop: &AtomicBool,
    ) -> Result<u64> {
        assert!(slots.len() > self.workers && slots.iter().all(|s| s.len() == PART));
        let failed = AtomicBool::new(false);
        let halt = || stop.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed);
        let (free_tx, free_rx) = mpsc::channel::<&mut [u8]>();
        let nslots = slots.len();
        for s in slots {
            free_tx.send(s).expect("receiver alive");
        }
        let (work_tx, work_rx) = mpsc::sync_channel::<(usize, &mut [u8], usize)>(nslots);
        let work_rx = Mutex::new(work_rx);
        let (done_tx, done_rx) = mpsc::channel::<Result<(usize, Vec<u8>, usize)>>();
        let pool: Mutex<Vec<Vec<u8>>> = Mutex::default();
        let gate = Gate::new(nslots.saturating_sub(2 * self.workers));
        std::thread::scope(|s| {
            let (halt, gate) = (&halt, &gate);
            let reader = s.spawn(move || {
                // However the reader ends (a panic too), the workers go on.
                let _open = OpenOnDrop(gate);
                read_parts(source, &free_rx, work_tx, halt, ended, gate)
            });
            for _ in 0..self.workers {
                let (done, free) = (done_tx.clone(), free_tx.clone());
                let (work_rx, pool, failed) = (&work_rx, &pool, &failed);
                s.spawn(move || {
                    gate.wait();
                    self.encrypt_parts(work_rx, free, done, pool, failed)
                });
            }
            drop(done_tx);
            let written = write_in_order(sink, name, done_rx, &pool);
            if written.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            let read = reader
                .join()
                .unwrap_or_else(|_| Err(Error::Other("part reader panicked".into())));
            let (parts, bytes) = written?;
            read?;
            if stop.load(Ordering::SeqCst) {
                return Err(crate::checkpoint::archive::abandoned()).ctx(|| format!("seal {name}"));
            }
            self.record(name, parts, bytes);
            Ok(bytes)
        })
    }

    /// A worker: encrypts full slots until there are none, freeing each slot
    /// as soon as its part is sealed.
    fn encrypt_parts<'s>(
        &self,
        work: &Mutex<mpsc::Receiver<(usize, &'s mut [u8], usize)>>,
        free: mpsc::Sender<&'s mut [u8]>,
        done: mpsc::Sender<Result<(usize, Vec<u8>, usize)>>,
        pool: &Mutex<Vec<Vec<u8>>>,
        failed: &AtomicBool,
    ) {
        loop {
            let next = work.lock().unwrap_or_else(|p| p.into_inner()).recv();
            let Ok((k, slot, n)) = next else { return };
            let mut ct = pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(PART + (64 << 10)));
            let r = if failed.load(Ordering::Relaxed) {
                Err(crate::checkpoint::archive::abandoned()).ctx(|| "seal".into())
            } else {
                self.seal_part(&slot[..n], &mut ct)
            };
            let _ = free.send(slot);
            let _ = done.send(r.map(|()| (k, ct, n)));
        }
    }
}

/// Holds the workers back while the stream flows and slots are plenty: opens
/// when `filled` reaches the slots that may fill before encryption must start,
/// or when the reader ends.
struct Gate {
    open: Mutex<bool>,
    opened: std::sync::Condvar,
    may_fill: usize,
}

impl Gate {
    fn new(may_fill: usize) -> Gate {
        Gate {
            open: Mutex::new(may_fill == 0),
            opened: std::sync::Condvar::new(),
            may_fill,
        }
    }

    fn filled(&self, k: usize) {
        if k >= self.may_fill {
            self.open();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let _open = self
            .opened
            .wait_while(open, |o| !*o)
            .unwrap_or_else(|p| p.into_inner());
    }
}

struct OpenOnDrop<'g>(&'g Gate);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// The reader: fills free slots from `source` and queues them, until the
/// source ends (then `ended`) or `halt`.
fn read_parts<'s>(
    source: &mut (dyn Read + Send),
    free: &mpsc::Receiver<&'s mut [u8]>,
    work: mpsc::SyncSender<(usize, &'s mut [u8], usize)>,
    halt: &(dyn Fn() -> bool + Sync),
    ended: &(dyn Fn() + Sync),
    gate: &Gate,
) -> Result<()> {
    let mut k = 0;
    loop {
        let slot = loop {
            if halt() {
                return Err(crate::checkpoint::archive::abandoned()).ctx(|| "read a part".into());
            }
            match free.recv_timeout(Duration::from_millis(50)) {
                Ok(s) => break s,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Other("no free slot".into()))
                }
            }
        };
        let n = fill(source, slot).ctx(|| "read the stream to seal".into())?;
        // A stream ending on a part boundary has no empty part after it.
        if n == 0 && k > 0 {
            break;
        }
        let last = n < slot.len();
        if work.send((k, slot, n)).is_err() {
            return Err(Error::Other("the sealing workers stopped".into()));
        }
        k += 1;
        gate.filled(k);
        if last {
            break;
        }
    }
    ended();
    Ok(())
}

/// Reads until `buf` is full or the source ends; how much it read.
fn fill(source: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The writer: puts the parts into `sink` in order as they come; returns how
/// many parts and plaintext bytes.
fn write_in_order(
    sink: &mut dyn PartSink,
    name: &str,
    done: mpsc::Receiver<Result<(usize, Vec<u8>, usize)>>,
    pool: &Mutex<Vec<Vec<u8>>>,
) -> Result<(usize, u64)> {
    let (mut next, mut bytes) = (0usize, 0u64);
    let mut waiting: BTreeMap<usize, (Vec<u8>, usize)> = BTreeMap::new();
    for r in done {
        let (k, ct, n) = r?;
        waiting.insert(k, (ct, n));
        while let Some((ct, n)) = waiting.remove(&next) {
            sink.put(&part_name(name, next), &ct)?;
            pool.lock().unwrap_or_else(|p| p.into_inner()).push(ct);
            bytes += n as u64;
            next += 1;
        }
    }
    if !waiting.is_empty() {
        return Err(Error::Other(format!("sealing {name} lost part {next}")));
    }
    Ok((next, bytes))
}

/// Memory to read a stream into: `n` zeroed slots, faulted in as they are used.
pub fn owned_slots(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|_| vec![0u8; PART]).collect()
}

/// Sealed parts kept until they can go into the archive: in memory while
/// small, then in an unlinked file (ciphertext only) in a private dir.
pub struct CipherSpool {
    dir: PathBuf,
    parts: Vec<(String, Kept)>,
    in_memory: usize,
    file: Option<(File, u64)>,
}

enum Kept {
    Mem(Vec<u8>),
    File(u64, u64),
}

const SPOOL_MEM: usize = 4 << 20;

impl CipherSpool {
    pub fn new(dir: &Path) -> CipherSpool {
        CipherSpool {
            dir: dir.to_path_buf(),
            parts: Vec::new(),
            in_memory: 0,
            file: None,
        }
    }

    /// Adds the parts to the archive, in the order they came.
    pub fn append(self, w: &mut ArchiveWriter) -> Result<()> {
        for (name, kept) in &self.parts {
            match kept {
                Kept::Mem(data) => w.add_bytes(name, data)?,
                Kept::File(at, len) => {
                    let (f, _) = self.file.as_ref().expect("parts in a file have one");
                    w.add_file_range(name, f, *at, *len)?
                }
            }
        }
        Ok(())
    }
}

impl PartSink for CipherSpool {
    fn put(&mut self, member: &str, data: &[u8]) -> Result<()> {
        if self.in_memory + data.len() <= SPOOL_MEM {
            self.in_memory += data.len();
            self.parts.push((member.into(), Kept::Mem(data.to_vec())));
            return Ok(());
        }
        if self.file.is_none() {
            let f = tempfile::tempfile_in(&self.dir)
                .ctx(|| format!("spool in {}", self.dir.display()))?;
            self.file = Some((f, 0));
        }
        let (f, end) = self.file.as_mut().expect("just made");
        f.write_all(data).ctx(|| format!("spool {member}"))?;
        self.parts
            .push((member.into(), Kept::File(*end, data.len() as u64)));
        *end += data.len() as u64;
        Ok(())
    }
}

/// A writer that seals what it is given as member `name`, part by part on the
/// writing thread (for the rootfs diff, written as it is walked).
pub struct SealWriter {
    sealer: Arc<Sealer>,
    name: String,
    buf: Vec<u8>,
    ct: Vec<u8>,
    parts: usize,
    bytes: u64,
    spool: CipherSpool,
}

impl SealWriter {
    pub fn new(sealer: Arc<Sealer>, name: &str, spool_dir: &Path) -> SealWriter {
        SealWriter {
            sealer,
            name: name.into(),
            buf: Vec::new(),
            ct: Vec::new(),
            parts: 0,
            bytes: 0,
            spool: CipherSpool::new(spool_dir),
        }
    }

    fn seal_buffered(&mut self) -> Result<()> {
        self.sealer.seal_part(&self.buf, &mut self.ct)?;
        self.spool
            .put(&part_name(&self.name, self.parts), &self.ct)?;
        self.parts += 1;
        self.bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Seals the last part; the parts, to append to the archive.
    pub fn finish(mut self) -> Result<CipherSpool> {
        if !self.buf.is_empty() || self.parts == 0 {
            self.seal_buffered()?;
        }
        self.sealer.record(&self.name, self.parts, self.bytes);
        Ok(self.spool)
    }
}

impl Write for SealWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(PART - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PART {
            self.seal_buffered().map_err(std::io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
