//! Shared by the hack/ CRI tools and the CRI tests: a client on a unix socket,
//! and the pod and container configs kubelet would send for the counter workload.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub type Client = RuntimeServiceClient<Channel>;
pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

pub async fn connect(sock: &Path) -> Res<Client> {
    Ok(RuntimeServiceClient::new(channel(sock).await?))
}

/// A gRPC channel on a unix socket, with one connection.
pub async fn channel(sock: &Path) -> Res<Channel> {
    let s: PathBuf = sock.to_path_buf();
    Ok(Endpoint::try_from("http://[::]")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let s = s.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
            }
        }))
        .await?)
}

/// What kubelet asks for: the pod's network (through the CNI plugin) or the
/// node's, an own pid namespace, pod IPC.
fn namespaces(host_network: bool) -> cri::NamespaceOption {
    let network = if host_network {
        cri::NamespaceMode::Node
    } else {
        cri::NamespaceMode::Pod
    };
    cri::NamespaceOption {
        network: network as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

pub fn sandbox(
    name: &str,
    cgroup_parent: &str,
    logs: &Path,
    host_network: bool,
) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        // runc cannot set a hostname without a private UTS namespace.
        hostname: if host_network {
            String::new()
        } else {
            name.into()
        },
        log_directory: logs.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("{cgroup_parent}/{name}"),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces(host_network)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The counter workload touching `mib` MiB, counting every `interval_ms`.
pub fn counter(name: &str, mib: u32, interval_ms: u32, host_network: bool) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: "docker.io/library/ckpt-counter:latest".into(),
            ..Default::default()
        }),
        command: vec!["/bin/counter".into()],
        args: vec![
            "/tmp/count".into(),
            mib.to_string(),
            interval_ms.to_string(),
        ],
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces(host_network)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn exec(c: &mut Client, id: &str, script: &str) -> Res<String> {
    let cmd = vec!["/bin/sh".into(), "-c".into(), script.into()];
    let r = c
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd,
            timeout: 10,
        })
        .await?
        .into_inner();
    Ok(String::from_utf8_lossy(&r.stdout).trim().to_string())
}

/// Runs a new pod; its id and config.
pub async fn new_pod(
    c: &mut Client,
    pod_name: &str,
    cgroup_parent: &str,
    logs: &Path,
) -> Res<(String, cri::PodSandboxConfig)> {
    std::fs::create_dir_all(logs)?;
    let sb = sandbox(pod_name, cgroup_parent, logs, false);
    let pod = c
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sb.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    Ok((pod, sb))
}

/// Creates the counter container in `pod` from `image` (the counter's image,
/// or a checkpoint); its id.
pub async fn create_counter(
    c: &mut Client,
    pod: &(String, cri::PodSandboxConfig),
    image: Option<&str>,
    mib: u32,
    interval_ms: u32,
) -> Res<String> {
    let mut config = counter("counter", mib, interval_ms, false);
    if let Some(image) = image {
        config.image = Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        });
    }
    let id = c
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.0.clone(),
            config: Some(config),
            sandbox_config: Some(pod.1.clone()),
        })
        .await?
        .into_inner()
        .container_id;
    Ok(id)
}

/// Runs a pod and creates a container from `image` (the counter's image, or a
/// checkpoint) in it; returns (pod id, container id).
pub async fn create_in_new_pod(
    c: &mut Client,
    pod_name: &str,
    cgroup_parent: &str,
    logs: &Path,
    image: Option<&str>,
    mib: u32,
    interval_ms: u32,
) -> Res<(String, String)> {
    let pod = new_pod(c, pod_name, cgroup_parent, logs).await?;
    let id = create_counter(c, &pod, image, mib, interval_ms).await?;
    Ok((pod.0, id))
}

/// Creates and starts a counter in a new pod; returns (pod id, container id)
/// once the counter has counted (so its memory is touched).
pub async fn run_counter(
    c: &mut Client,
    pod_name: &str,
    cgroup_parent: &str,
    logs: &Path,
    mib: u32,
    interval_ms: u32,
) -> Res<(String, String)> {
    let (pod, id) =
        create_in_new_pod(c, pod_name, cgroup_parent, logs, None, mib, interval_ms).await?;
    c.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    let t = std::time::Instant::now();
    while exec(c, &id, "cat /tmp/count 2>/dev/null || echo 0")
        .await?
        .parse::<u64>()
        .unwrap_or(0)
        < 2
    {
        if t.elapsed() > std::time::Duration::from_secs(120) {
            return Err("counter did not start".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok((pod, id))
}
