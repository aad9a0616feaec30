//! A small CRI client for what crictl (../shared/bin) lacks: the benchmarks' in-process timed steps.
//!   cri-ctl SOCK run-counter POD_NAME MIB      → prints "<pod id> <container id>"
//!   cri-ctl SOCK create POD_NAME IMAGE         → a new pod and a container of IMAGE
//!                                                (e.g. a checkpoint), not started
//!   cri-ctl SOCK start ID
//!   cri-ctl SOCK restore POD_NAME ARCHIVE      → a new pod, then CreateContainer with
//!                                                the archive as image + StartContainer,
//!                                                timed: "<pod id> <container id> <ms>"
//!   cri-ctl SOCK checkpoint ID LOCATION [TIMEOUT_S]
//!   cri-ctl SOCK pull IMAGE                    → PullImage, as the kubelet: "<image ref> <ms>"
//!   cri-ctl SOCK rm-pod POD_ID
//!   cri-ctl SOCK info                          → the runtime's conditions, laid out as
//!                                                `crictl info` prints them

#[path = "cri_common.rs"]
mod cri_common;

use cri_common::*;
use k8s_cri::v1 as cri;

#[tokio::main]
async fn main() -> Res<()> {
    let a: Vec<String> = std::env::args().collect();
    let usage = "usage: cri-ctl SOCK run-counter POD MIB | checkpoint ID LOCATION [TIMEOUT] | rm-pod POD_ID | info";
    if a.len() < 3 {
        return Err(usage.into());
    }
    let mut c = connect(std::path::Path::new(&a[1])).await?;
    match (a[2].as_str(), &a[3..]) {
        ("run-counter", [pod, mib]) => {
            let logs = std::env::temp_dir().join(format!("cri-ctl-logs-{pod}"));
            let (p, id) =
                run_counter(&mut c, pod, "/ckpt-shim-bench", &logs, mib.parse()?, 1000).await?;
            println!("{p} {id}");
        }
        ("create", [pod, image]) => {
            let logs = std::env::temp_dir().join(format!("cri-ctl-logs-{pod}"));
            let (p, id) =
                create_in_new_pod(&mut c, pod, "/ckpt-shim-bench", &logs, Some(image), 0, 1000)
                    .await?;
            println!("{p} {id}");
        }
        ("restore", [pod, archive]) => {
            let logs = std::env::temp_dir().join(format!("cri-ctl-logs-{pod}"));
            let pod = new_pod(&mut c, pod, "/ckpt-shim-bench", &logs).await?;
            let t = std::time::Instant::now();
            let id = create_counter(&mut c, &pod, Some(archive), 0, 1000).await?;
            c.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
            println!("{} {id} {:.1}", pod.0, t.elapsed().as_secs_f64() * 1e3);
        }
        ("pull", [image]) => {
            let t = std::time::Instant::now();
            let mut images = cri::image_service_client::ImageServiceClient::new(
                channel(std::path::Path::new(&a[1])).await?,
            );
            let r = images
                .pull_image(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("{} {:.1}", r.image_ref, t.elapsed().as_secs_f64() * 1e3);
        }
        ("start", [id]) => {
            c.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        }
        ("checkpoint", [id, location, rest @ ..]) => {
            let timeout = rest.first().map(|t| t.parse()).transpose()?.unwrap_or(600);
            c.checkpoint_container(cri::CheckpointContainerRequest {
                container_id: id.clone(),
                location: location.clone(),
                timeout,
            })
            .await?;
        }
        ("rm-pod", [pod]) => {
            c.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await?;
            c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await?;
        }
        ("info", []) => {
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
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
