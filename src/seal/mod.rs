//! Encrypted checkpoints ("sealed" archives), with the `age` crate: the
//! memory and files of a container readable only by the holder of the
//! operator's key.
//!
//! The archive stays a tar at the same place, and what identifies it stays
//! readable: `config.dump`, `stats-dump`, `bind.mounts`, the `checkpoint/`
//! directory entry, and `spec.dump` with its secrets taken out (the process's
//! arguments after the program, and the values of its environment, where
//! Kubernetes puts Secrets). So `checkpointctl show` and `ckpt-shim inspect`
//! still name the container, its image and its sizes. Every other member (every
//! CRIU image, `rootfs-diff.tar`, `deleted.files`, CRIU's log, and the full
//! `spec.dump`) is stored as age files: member `NAME` becomes `NAME.0.age`,
//! `NAME.1.age`, …, each an age file of the next [`PART`] bytes of `NAME`,
//! encrypted to every recipient. `age -d` decrypts any of them; their
//! plaintexts in order are `NAME`. Parts let both cores encrypt one image.
//! The member [`MARKER`], `encryption.json`, says the archive is sealed and
//! lists every sealed member with its part count and size, so that a missing
//! or reordered part is refused.
//!
//! age authenticates every 64 KiB of a part: a changed byte fails decryption.
//! It does not authenticate the sender: whoever has a recipient (a public key)
//! can make an archive for it, as anyone can make a plain one.

pub mod decrypt;
pub mod encrypt;

use std::io::BufRead;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Plaintext bytes per part.
pub const PART: usize = 16 << 20;
/// The member that marks a sealed archive.
pub const MARKER: &str = "encryption.json";
const FORMAT: &str = "ckpt-shim-sealed/1";

/// The name of part `k` of member `name`.
pub fn part_name(name: &str, k: usize) -> String {
    format!("{name}.{k}.age")
}

/// The member and part index a part's name stands for.
pub fn parse_part(member: &str) -> Option<(&str, usize)> {
    let stem = member.strip_suffix(".age")?;
    let (name, k) = stem.rsplit_once('.')?;
    let k = k
        .parse()
        .ok()
        .filter(|_| k.bytes().all(|b| b.is_ascii_digit()))?;
    (!name.is_empty()).then_some((name, k))
}

/// `encryption.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    pub format: String,
    pub cipher: String,
    pub part_bytes: u64,
    /// Plaintext members whose secrets were taken out (their full form is sealed).
    pub redacted: Vec<String>,
    pub members: Vec<SealedMember>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SealedMember {
    pub name: String,
    pub parts: usize,
    pub bytes: u64,
}

impl Marker {
    pub fn new(members: Vec<SealedMember>) -> Marker {
        Marker {
            format: FORMAT.into(),
            cipher: "age-encryption.org/v1".into(),
            part_bytes: PART as u64,
            redacted: vec!["spec.dump".into()],
            members,
        }
    }

    pub fn parse(data: &[u8]) -> Result<Marker> {
        let m: Marker = serde_json::from_slice(data)
            .map_err(|e| Error::InvalidArgument(format!("{MARKER}: {e}")))?;
        if m.format != FORMAT || m.part_bytes != PART as u64 {
            return Err(Error::InvalidArgument(format!(
                "{MARKER}: sealed as {} with {}-byte parts; this ckpt-shim reads {FORMAT} with {PART}",
                m.format, m.part_bytes
            )));
        }
        Ok(m)
    }
}

/// The OCI spec with its secrets taken out: the arguments after the program,
/// and every environment variable's value (names stay, so it is clear what
/// was there).
pub fn redact_spec(spec_json: &[u8]) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(spec_json) else {
        return b"{}".to_vec();
    };
    let p = &mut v["process"];
    if let Some(args) = p["args"].as_array_mut() {
        args.truncate(1);
    }
    if let Some(env) = p["env"].as_array_mut() {
        for e in env.iter_mut() {
            let name = e.as_str().and_then(|s| s.split_once('=')).map(|(n, _)| n);
            *e = format!("{}=", name.unwrap_or_default()).into();
        }
    }
    serde_json::to_vec(&v).expect("JSON serialises")
}

/// The age recipients a shim encrypts every checkpoint to.
pub struct Recipients(Vec<Box<dyn age::Recipient + Send + Sync>>);

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recipients({})", self.0.len())
    }
}

impl Recipients {
    /// Parses X25519 (`age1…`) and SSH (`ssh-ed25519 …`, `ssh-rsa …`) public
    /// keys; `None` for an empty list. Any bad one is an error naming it.
    pub fn parse(keys: &[String]) -> Result<Option<Recipients>> {
        let mut out: Vec<Box<dyn age::Recipient + Send + Sync>> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let key = key.trim();
            if let Ok(r) = key.parse::<age::x25519::Recipient>() {
                out.push(Box::new(r));
            } else if let Ok(r) = key.parse::<age::ssh::Recipient>() {
                out.push(Box::new(r));
            } else {
                let shown: String = key.chars().take(24).collect();
                return Err(Error::InvalidArgument(format!(
                    "encrypt_to[{i}] ({shown}…) is not an age recipient (age1…) or an SSH public key (ssh-ed25519 …, ssh-rsa …)"
                )));
            }
        }
        Ok((!out.is_empty()).then_some(Recipients(out)))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn encryptor(&self) -> Result<age::Encryptor> {
        age::Encryptor::with_recipients(self.0.iter().map(|r| r.as_ref() as &dyn age::Recipient))
            .map_err(|e| Error::InvalidArgument(format!("age recipients: {e}")))
    }
}

/// The identities (private keys) a shim or a command decrypts with, read from
/// root-only files: age identity files (`AGE-SECRET-KEY-1…` lines) or
/// unencrypted SSH private keys.
#[derive(Default)]
pub struct Identities {
    keys: Vec<Box<dyn age::Identity + Send + Sync>>,
    pub files: Vec<PathBuf>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities({:?})", self.files)
    }
}

impl Identities {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn load(files: &[PathBuf]) -> Result<Identities> {
        let mut keys = Vec::new();
        for f in files {
            keys.extend(read_identity_file(f)?);
        }
        Ok(Identities {
            keys,
            files: files.to_vec(),
        })
    }

    fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.keys.iter().map(|k| k.as_ref() as &dyn age::Identity)
    }
}

/// One identity file's keys, refused unless root's and private to root: a key
/// others can read decrypts every checkpoint.
fn read_identity_file(path: &Path) -> Result<Vec<Box<dyn age::Identity + Send + Sync>>> {
    let bad = |why: String| Error::InvalidArgument(format!("identity {}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o}, owner uid {}: must be root's and not accessible to group or others (chmod 600)",
            meta.mode() & 0o7777,
            meta.uid()
        )));
    }
    let text = std::io::read_to_string(file).map_err(|e| bad(e.to_string()))?;
    if text.contains("PRIVATE KEY-----") {
        return match age::ssh::Identity::from_buffer(text.as_bytes(), None) {
            Ok(k @ age::ssh::Identity::Unencrypted(_)) => Ok(vec![Box::new(k)]),
            Ok(age::ssh::Identity::Encrypted(_)) => Err(bad(
                "a passphrase-protected SSH key cannot be used unattended".into(),
            )),
            Ok(age::ssh::Identity::Unsupported(_)) => {
                Err(bad("an SSH key type age does not support".into()))
            }
            Err(e) => Err(bad(e.to_string())),
        };
    }
    let mut keys: Vec<Box<dyn age::Identity + Send + Sync>> = Vec::new();
    for (n, line) in text.as_bytes().lines().enumerate() {
        let line = line.map_err(|e| bad(e.to_string()))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = line.parse::<age::x25519::Identity>().map_err(|_| {
            bad(format!(
                "line {} is not an age identity (AGE-SECRET-KEY-1…)",
                n + 1
            ))
        })?;
        keys.push(Box::new(key));
    }
    if keys.is_empty() {
        return Err(bad("no identity in it".into()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_round_trip() {
        assert_eq!(
            part_name("checkpoint/pages-1.img", 12),
            "checkpoint/pages-1.img.12.age"
        );
        assert_eq!(
            parse_part("checkpoint/pages-1.img.12.age"),
            Some(("checkpoint/pages-1.img", 12))
        );
        for not in [
            "x.age", ".1.age", "a.b.age", "a.1.agex", "a.-1.age", "a.+1.age",
        ] {
            assert_eq!(parse_part(not), None, "{not}");
        }
    }

    #[test]
    fn the_readable_spec_keeps_no_secrets() {
        let spec = br#"{"process":{"args":["/app","--password=hunter2"],"env":["PATH=/bin","TOKEN=s3cret"]},"annotations":{"a":"b"}}"#;
        let r: serde_json::Value = serde_json::from_slice(&redact_spec(spec)).unwrap();
        assert_eq!(r["process"]["args"], serde_json::json!(["/app"]));
        assert_eq!(r["process"]["env"], serde_json::json!(["PATH=", "TOKEN="]));
        assert_eq!(r["annotations"]["a"], "b");
    }

    #[test]
    fn recipients_must_be_keys() {
        let id = age::x25519::Identity::generate();
        let ok = vec![
            id.to_public().to_string(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW+uObz5dvMgjz1OxfM/XXUB+VHtZ6isGN"
                .into(),
        ];
        assert_eq!(Recipients::parse(&ok).unwrap().unwrap().len(), 2);
        assert!(Recipients::parse(&[]).unwrap().is_none());
        let err = Recipients::parse(&["age1notakey".into()]).err().unwrap();
        assert!(err.to_string().contains("encrypt_to[0]"), "{err}");
    }

    #[test]
    fn identity_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key.txt");
        let id = age::x25519::Identity::generate();
        use age::secrecy::ExposeSecret;
        std::fs::write(&f, format!("# a key\n{}\n", id.to_string().expose_secret())).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identities::load(std::slice::from_ref(&f)).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!Identities::load(std::slice::from_ref(&f))
            .unwrap()
            .is_empty());
        std::fs::write(&f, "not a key\n").unwrap();
        assert!(Identities::load(&[f]).is_err());
    }
}
