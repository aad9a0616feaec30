//! A small CRI client for what crictl (../shared/bin) lacks: the benchmarks' in-process timed steps.
//!   cri-ctl SOCK run-counter POD_NAME MIB      → prints "<pod id> <container id>"
//!   cri-ctl SOCK create POD_NAME IMAGE         → a new pod and a container of IMAGE
//!                                                (e.g. a checkpoint), not started
//!   cri-ctl SOCK start ID
//!   cri-ctl SOCK restore POD_NAME ARCHIVE      → a new pod, then CreateContainer with
//!                                                the archive as image + StartContainer,
//!                                                timed: "<pod id> <container id> <ms>"
//!   cri-ctl SOCK restore-n POD_PREFIX N IMAGE  → N new pods (untimed), then every pod's
//!                                                CreateContainer + StartContainer at once,
//!                                                timed: "<pod id> <container id> <ms to
//!                                                started> <ms to created>" a line each,
//!                                                then "all <ms>" (until the last start)
//!   cri-ctl SOCK checkpoint ID LOCATION [TIMEOUT_S]
//!   cri-ctl SOCK pull IMAGE                    → PullImage, as the kubelet: "<image ref> <ms>"
//!   cri-ctl SOCK rm-pod POD_ID
//!   cri-ctl SOCK info                          → the runtime's conditions, laid out as
//!                                                `crictl info` prints them
//!   cri-ctl SOCK checkpointp POD --export DIR [--container ID]… [--option K=V]… [--timeout S]
//!                                              → CheckpointPod (KEP-5823) of POD's running
//!                                                containers (or those named) into DIR
//!   cri-ctl SOCK restorep DIR --config pod.json --container-config c.json… [--runtime-handler H]
//!                                                [--timeout S]
//!                                              → RestorePod: a new pod, its containers CREATED;
//!                                                prints "<pod id>" then "<name> <container id>"
//!                                                a line each (then `start` each)
//! The JSON files hold CRI's PodSandboxConfig and ContainerConfig with CRI's field
//! names (snake_case, as crictl's); fields left out take their defaults, enums are numbers.

use cri_client::client::*;
use cri_client::pods as cri_pods;
use k8s_cri::v1 as cri;

#[tokio::main]
async fn main() -> Res<()> {
    let a: Vec<String> = std::env::args().collect();
    let usage = "usage: cri-ctl SOCK run-counter POD MIB | checkpoint ID LOCATION [TIMEOUT] | rm-pod POD_ID | info \
                 | checkpointp POD --export DIR [--container ID]... [--option K=V]... \
                 | restorep DIR --config pod.json --container-config c.json... | start ID";
    if a.len() < 3 {
        return Err(usage.into());
    }
    let sock = std::path::Path::new(&a[1]);
    let mut c = connect(sock).await?;
    match (a[2].as_str(), &a[3..]) {
        ("run-counter", [pod, mib]) => {
            let (p, id) =
                run_counter(&mut c, pod, BENCH_CG, &logs(pod), mib.parse()?, 1000).await?;
            println!("{p} {id}");
        }
        ("create", [pod, image]) => {
            let (p, id) =
                create_in_new_pod(&mut c, pod, BENCH_CG, &logs(pod), Some(image), 0, 1000).await?;
            println!("{p} {id}");
        }
        ("restore", [pod, archive]) => restore_one(&mut c, pod, archive).await?,
        ("restore-n", [prefix, n, image]) => restore_n(&mut c, prefix, n.parse()?, image).await?,
        ("pull", [image]) => pull(sock, image).await?,
        ("start", [id]) => start(&mut c, id).await?,
        ("checkpoint", [id, location, rest @ ..]) => {
            let timeout = rest.first().map(|t| t.parse()).transpose()?.unwrap_or(600);
            c.checkpoint_container(cri::CheckpointContainerRequest {
                container_id: id.clone(),
                location: location.clone(),
                timeout,
            })
            .await?;
        }
        ("rm-pod", [pod]) => remove_pod(&mut c, pod).await?,
        ("info", []) => info(&mut c).await?,
        ("checkpointp", [pod, rest @ ..]) => {
            checkpoint_pod(&mut c, sock, pod, &Flags::parse(rest)?).await?
        }
        ("restorep", [dir, rest @ ..]) => restore_pod(sock, dir, &Flags::parse(rest)?).await?,
        _ => return Err(usage.into()),
    }
    Ok(())
}

/// The cgroup parent of the pods this tool makes.
const BENCH_CG: &str = "/ckpt-shim-bench";

/// Where a pod's container logs go.
fn logs(pod: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cri-ctl-logs-{pod}"))
}

/// A new pod, the counter restored into it from `archive` and started;
/// prints the pod, the container and the milliseconds Create+Start took.
async fn restore_one(c: &mut Client, pod: &str, archive: &str) -> Res<()> {
    let pod = new_pod(c, pod, BENCH_CG, &logs(pod)).await?;
    let t = std::time::Instant::now();
    let id = create_counter(c, &pod, Some(archive), 0, 1000).await?;
    start(c, &id).await?;
    println!("{} {id} {:.1}", pod.0, t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

async fn start(c: &mut Client, id: &str) -> Res<()> {
    c.start_container(cri::StartContainerRequest {
        container_id: id.to_string(),
    })
    .await?;
    Ok(())
}

/// PullImage; prints the image's ref and the milliseconds it took.
async fn pull(sock: &std::path::Path, image: &str) -> Res<()> {
    let t = std::time::Instant::now();
    let mut images = cri::image_service_client::ImageServiceClient::new(channel(sock).await?);
    let r = images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("{} {:.1}", r.image_ref, t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

async fn remove_pod(c: &mut Client, pod: &str) -> Res<()> {
    c.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    })
    .await?;
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    })
    .await?;
    Ok(())
}

/// The runtime's conditions, as `crictl info` prints them.
async fn info(c: &mut Client) -> Res<()> {
    let s = c
        .status(cri::StatusRequest { verbose: false })
        .await?
        .into_inner();
    let conditions: Vec<serde_json::Value> = s
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .map(|c| {
            serde_json::json!({"type": c.r#type, "status": c.status,
                "reason": c.reason, "message": c.message})
        })
        .collect();
    let info = serde_json::json!({"status": {"conditions": conditions}});
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(())
}

/// `n` restores of one checkpoint `image` started together, as a scale-out
/// does: the pods first, then every Create+Start concurrently.
async fn restore_n(c: &mut Client, prefix: &str, n: usize, image: &str) -> Res<()> {
    let mut pods = Vec::new();
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        let logs = std::env::temp_dir().join(format!("cri-ctl-logs-{name}"));
        pods.push(new_pod(c, &name, "/ckpt-shim-bench", &logs).await?);
    }
    let t = std::time::Instant::now();
    let mut calls = Vec::new();
    for pod in pods {
        let (mut c, image) = (c.clone(), image.to_string());
        calls.push(tokio::spawn(async move {
            let id = create_counter(&mut c, &pod, Some(&image), 0, 1000)
                .await
                .map_err(|e| format!("CreateContainer in {}: {e}", pod.0))?;
            let created = t.elapsed();
            c.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(|e| format!("StartContainer {id}: {e}"))?;
            Ok::<_, String>((pod.0, id, created, t.elapsed()))
        }));
    }
    for call in calls {
        let (pod, id, created, took) = call.await??;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        println!("{pod} {id} {:.1} {:.1}", ms(took), ms(created));
    }
    println!("all {:.1}", t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

/// The `--name value` flags of the pod subcommands; repeated ones in order.
#[derive(Default)]
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> Res<Flags> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) if n.starts_with("--") && n != "--option" => (n, v.to_string()),
                _ => (
                    flag.as_str(),
                    it.next().ok_or(format!("{flag} needs a value"))?.clone(),
                ),
            };
            let name = name
                .strip_prefix("--")
                .ok_or(format!("unexpected {flag}"))?;
            out.push((name.to_string(), value));
        }
        Ok(Flags(out))
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.all(name).pop()
    }

    fn timeout(&self) -> Res<std::time::Duration> {
        let s: u64 = self
            .one("timeout")
            .map(str::parse)
            .transpose()?
            .unwrap_or(600);
        Ok(std::time::Duration::from_secs(s))
    }
}

/// CheckpointPod; without `--container`, of every running container of the pod.
async fn checkpoint_pod(c: &mut Client, sock: &std::path::Path, pod: &str, f: &Flags) -> Res<()> {
    let export = f.one("export").ok_or("checkpointp needs --export DIR")?;
    let mut ids: Vec<String> = f.all("container").into_iter().map(String::from).collect();
    if ids.is_empty() {
        let filter = cri::ContainerFilter {
            pod_sandbox_id: pod.into(),
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        };
        let list = c
            .list_containers(cri::ListContainersRequest {
                filter: Some(filter),
            })
            .await?;
        ids = list
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect();
    }
    let mut options = std::collections::HashMap::new();
    for kv in f.all("option") {
        let (k, v) = kv
            .split_once('=')
            .ok_or(format!("--option {kv}: not K=V"))?;
        options.insert(k.to_string(), v.to_string());
    }
    let req = cri_pods::CheckpointPodRequest {
        pod_sandbox_id: pod.into(),
        output_path: export.into(),
        container_ids: ids,
        options,
    };
    let t = std::time::Instant::now();
    cri_pods::checkpoint_pod(channel(sock).await?, req, f.timeout()?).await?;
    eprintln!("checkpointed in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

async fn restore_pod(sock: &std::path::Path, dir: &str, f: &Flags) -> Res<()> {
    let config = f.one("config").ok_or("restorep needs --config pod.json")?;
    let containers = f.all("container-config");
    if containers.is_empty() {
        return Err("restorep needs --container-config c.json (one per container)".into());
    }
    let req = cri_pods::RestorePodRequest {
        checkpoint_path: dir.into(),
        config: Some(from_json(config, pod_template())?),
        runtime_handler: f.one("runtime-handler").unwrap_or_default().into(),
        options: Default::default(),
        container_configs: containers
            .into_iter()
            .map(|p| from_json(p, container_template()))
            .collect::<Res<_>>()?,
    };
    let r = cri_pods::restore_pod(channel(sock).await?, req, f.timeout()?).await?;
    println!("{}", r.pod_sandbox_id);
    for x in r.restored_containers {
        println!("{} {}", x.name, x.container_id);
    }
    Ok(())
}

/// A CRI message from a JSON file, over `template`: a message with every
/// nested message present (and one element in lists of messages), whose
/// defaults fill what the file leaves out. A nested message the file does
/// not mention stays unset.
fn from_json<T: serde::Serialize + serde::de::DeserializeOwned>(path: &str, template: T) -> Res<T> {
    let given: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path)?).map_err(|e| format!("{path}: {e}"))?;
    let filled = fill(&serde_json::to_value(template)?, given);
    Ok(serde_json::from_value(filled).map_err(|e| format!("{path}: {e}"))?)
}

fn fill(template: &serde_json::Value, given: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let is_message = |v: &Value| v.as_object().is_some_and(|o| !o.is_empty());
    match (template, given) {
        (Value::Object(t), Value::Object(mut g)) if !t.is_empty() => {
            let mut out = serde_json::Map::new();
            for (k, tv) in t {
                let v = match g.remove(k) {
                    Some(gv) => fill(tv, gv),
                    // An unset nested message, an empty list; a map's or a field's default.
                    None if is_message(tv) => Value::Null,
                    None if tv.is_array() => Value::Array(Vec::new()),
                    None => tv.clone(),
                };
                out.insert(k.clone(), v);
            }
            // Unknown names are kept, for serde to refuse by name.
            out.extend(g);
            Value::Object(out)
        }
        (Value::Array(t), Value::Array(g)) if t.len() == 1 => {
            Value::Array(g.into_iter().map(|x| fill(&t[0], x)).collect())
        }
        (_, g) => g,
    }
}

fn pod_template() -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(Default::default()),
        dns_config: Some(Default::default()),
        port_mappings: vec![Default::default()],
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(Default::default()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_template() -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(Default::default()),
        image: Some(Default::default()),
        envs: vec![Default::default()],
        mounts: vec![Default::default()],
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(Default::default()),
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(Default::default()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}
