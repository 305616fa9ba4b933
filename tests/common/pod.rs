//! Pods through containerd's CRI runtime service, driven as a kubelet
//! drives them (there is no kubelet or crictl in Debian): a sandbox on the
//! host network, one container, its CRI log file, stop and removal.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix_snapshotter::api::cri::runtime_service_client::RuntimeServiceClient;
use nix_snapshotter::api::cri::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;

/// A pod sandbox with its logs under `logs`.
pub struct Pod {
    runtime: RuntimeServiceClient<Channel>,
    pub id: String,
    config: PodSandboxConfig,
    logs: PathBuf,
    containers: Vec<String>,
}

impl Pod {
    /// RunPodSandbox on the CRI at `cri` (host network, as the tests have
    /// no CNI), logs under `logs`.
    pub async fn run(cri: &Path, name: &str, logs: &Path) -> Pod {
        let mut runtime = RuntimeServiceClient::new(nix_snapshotter::uds::connect(cri).await.unwrap());
        std::fs::create_dir_all(logs).unwrap();
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: super::unique("uid"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: String::new(),
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: String::new(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                    }),
                }),
            }),
            ..Default::default()
        };
        let id = runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}"))
            .into_inner()
            .pod_sandbox_id;
        Pod {
            runtime,
            id,
            config,
            logs: logs.to_path_buf(),
            containers: Vec::new(),
        }
    }

    /// CreateContainer and StartContainer of `image` (already pulled) as
    /// container `name`, logging to `<logs>/<name>.log`; its id, or the
    /// CRI's error.
    pub async fn start(&mut self, name: &str, image: &str) -> Result<String, tonic::Status> {
        let id = self
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: self.id.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.into(),
                        ..Default::default()
                    }),
                    log_path: format!("{name}.log"),
                    ..Default::default()
                }),
                sandbox_config: Some(self.config.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        self.containers.push(id.clone());
        self.runtime
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        Ok(id)
    }

    /// Container `name`'s log as the CRI wrote it (`<time> stdout F <line>`).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits (up to `timeout`) until container `id` exited; its status.
    pub async fn wait_exit(&mut self, id: &str, timeout: Duration) -> ContainerStatus {
        let start = Instant::now();
        loop {
            let s = self
                .runtime
                .container_status(ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if s.state == ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(start.elapsed() < timeout, "container still running: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes its containers, stops and removes the sandbox.
    pub async fn remove(mut self) {
        for id in std::mem::take(&mut self.containers) {
            self.runtime
                .remove_container(RemoveContainerRequest { container_id: id })
                .await
                .unwrap();
        }
        self.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            })
            .await
            .unwrap();
        self.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: self.id.clone(),
            })
            .await
            .unwrap();
    }
}
