//! RestorePod's checks of the request against the checkpoint, before anything
//! is created: the container configs name exactly the checkpoint's
//! containers, and what each says of the process (image, command, args,
//! working dir, env) matches what was checkpointed wherever it can be
//! compared. The checkpoint is authoritative: a config only confirms it.

use std::collections::BTreeSet;

use super::manifest::{ContainerEntry, Manifest};
use crate::cri::ContainerConfig;
use crate::error::{Error, Result};
use crate::restore::Checkpoint;

/// The configs' names are non-empty, unique, and exactly the checkpoint's.
pub fn check_names(m: &Manifest, configs: &[ContainerConfig]) -> Result<()> {
    if configs.is_empty() {
        return Err(Error::InvalidArgument("container_configs is empty".into()));
    }
    let mut given = BTreeSet::new();
    for c in configs {
        let name = name_of(c);
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "a container config has no metadata name".into(),
            ));
        }
        if !given.insert(name) {
            return Err(Error::InvalidArgument(format!(
                "container config {name:?} is given twice"
            )));
        }
    }
    let have: BTreeSet<&str> = m.containers.iter().map(|c| c.name.as_str()).collect();
    let missing: Vec<&str> = have.difference(&given).copied().collect();
    let extra: Vec<&str> = given.difference(&have).copied().collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "container_configs must name exactly the checkpoint's containers ({}): missing {missing:?}, not in the checkpoint {extra:?}",
        have.into_iter().collect::<Vec<_>>().join(", ")
    )))
}

pub fn name_of(c: &ContainerConfig) -> &str {
    c.metadata.as_ref().map_or("", |m| m.name.as_str())
}

/// The image a config names is the checkpointed one: by name or reference,
/// or (`same_id`) the runtime resolves both to one image.
pub fn check_image(cfg: &ContainerConfig, entry: &ContainerEntry, same_id: bool) -> Result<()> {
    let wanted = cfg.image.as_ref().map_or("", |i| i.image.as_str());
    if wanted.is_empty() || same_id || [&entry.image, &entry.image_ref].contains(&&wanted.into()) {
        return Ok(());
    }
    Err(mismatch(
        &entry.name,
        "image",
        wanted,
        &format!("{} ({})", entry.image, entry.image_ref),
    ))
}

/// Command and args, working dir and env against the checkpointed process.
/// A config that leaves command or args to the image cannot be compared
/// there; the env a config sets must all be in the process's.
pub fn check_process(name: &str, cfg: &ContainerConfig, ckpt: &Checkpoint) -> Result<()> {
    let process = ckpt.spec.process().as_ref().ok_or_else(|| {
        Error::InvalidArgument(format!("container {name:?}: the checkpoint has no process"))
    })?;
    let argv: Vec<String> = process.args().clone().unwrap_or_default();
    let shown = |v: &[String]| format!("{v:?}");
    if !cfg.command.is_empty() {
        let want: Vec<String> = cfg.command.iter().chain(&cfg.args).cloned().collect();
        if want != argv {
            return Err(mismatch(
                name,
                "command and args",
                &shown(&want),
                &shown(&argv),
            ));
        }
    } else if !cfg.args.is_empty() && !argv.ends_with(&cfg.args) {
        return Err(mismatch(name, "args", &shown(&cfg.args), &shown(&argv)));
    }
    let cwd = process.cwd().to_string_lossy();
    if !cfg.working_dir.is_empty() && cfg.working_dir != cwd {
        return Err(mismatch(name, "working_dir", &cfg.working_dir, &cwd));
    }
    let env = process.env().clone().unwrap_or_default();
    for kv in &cfg.envs {
        // The runtime sets the new pod's own hostname.
        if kv.key == "HOSTNAME" {
            continue;
        }
        let pair = format!("{}={}", kv.key, kv.value);
        if !env.contains(&pair) {
            let found = env
                .iter()
                .find(|e| e.split_once('=').is_some_and(|(k, _)| k == kv.key))
                .map_or("(unset)".to_string(), |e| format!("{e:?}"));
            return Err(mismatch(name, "env", &format!("{pair:?}"), &found));
        }
    }
    Ok(())
}

fn mismatch(container: &str, field: &'static str, wanted: &str, found: &str) -> Error {
    Error::Mismatch {
        container: container.into(),
        field,
        wanted: wanted.into(),
        found: found.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::{ContainerMetadata, KeyValue};

    fn ckpt() -> Checkpoint {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/bin/counter", "/tmp/count", "8"], "cwd": "/",
                        "env": ["PATH=/bin", "A=1"], "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
        });
        Checkpoint {
            path: "/c.tar".into(),
            spec: serde_json::from_value(spec).unwrap(),
            config: Default::default(),
            bind_mounts: vec![],
            sealed: None,
        }
    }

    fn cfg(command: &[&str], args: &[&str]) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "web".into(),
                attempt: 0,
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_process_a_config_describes_must_be_the_checkpointed_one() {
        let c = ckpt();
        for (config, ok) in [
            (cfg(&["/bin/counter"], &["/tmp/count", "8"]), true),
            (cfg(&[], &["/tmp/count", "8"]), true),
            (cfg(&[], &[]), true),
            (cfg(&["/bin/sh"], &["/tmp/count", "8"]), false),
            (cfg(&[], &["9"]), false),
        ] {
            let r = check_process("web", &config, &c);
            assert_eq!(
                r.is_ok(),
                ok,
                "{:?} {:?}: {r:?}",
                config.command,
                config.args
            );
        }
        let mut env = cfg(&[], &[]);
        env.envs = vec![KeyValue {
            key: "A".into(),
            value: "2".into(),
        }];
        let e = check_process("web", &env, &c).unwrap_err();
        assert!(
            e.to_string().contains("env") && e.to_string().contains("web"),
            "{e}"
        );
        let mut wd = cfg(&[], &[]);
        wd.working_dir = "/srv".into();
        assert!(check_process("web", &wd, &c).is_err());
    }
}
