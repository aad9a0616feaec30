//! `/proc/<pid>/mountinfo`, as far as the engine needs it.

use std::path::{Path, PathBuf};

use crate::error::{Context, Result};

#[derive(Debug, Clone)]
pub struct Mount {
    /// Path of the mounted subtree inside its file system ("/" for a whole fs).
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

impl Mount {
    /// A `key=value` super-block option, such as overlay's `upperdir`.
    pub fn super_option(&self, key: &str) -> Option<String> {
        self.super_options
            .split(',')
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
            .map(unescape)
    }
}

pub fn read(pid: i32) -> Result<Vec<Mount>> {
    let path = format!("/proc/{pid}/mountinfo");
    let text = std::fs::read_to_string(&path).ctx(|| format!("read {path}"))?;
    Ok(parse(&text))
}

pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            Some(Mount {
                root: unescape(pre.get(3)?),
                mount_point: PathBuf::from(unescape(pre.get(4)?)),
                fs_type: post.next()?.to_string(),
                source: unescape(post.next()?),
                super_options: post.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// The last mount at `path` (later mounts hide earlier ones).
pub fn at<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_overlay_root_and_escapes() {
        let m = parse("69 46 0:39 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/a\\040b/up,workdir=/w\n\
                       77 76 0:29 /k/t1 /sys/fs/cgroup/cpu ro - cgroup cgroup rw,cpu\n");
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].fs_type, "overlay");
        assert_eq!(m[0].super_option("upperdir").as_deref(), Some("/a b/up"));
        assert_eq!(m[0].super_option("lowerdir").as_deref(), Some("/l"));
        assert_eq!(m[1].root, "/k/t1");
        assert_eq!(
            at(&m, Path::new("/sys/fs/cgroup/cpu")).unwrap().fs_type,
            "cgroup"
        );
    }
}
