//! Registries on 127.0.0.1: an OCI image-layout tar served read-only (the
//! distribution API's pull side: manifests by tag and digest, blobs)
//! through the test HTTP server, so its access log shows which blobs a pull
//! fetched; and Debian's `docker-registry`, for pushes.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::http::Server;

/// What a served image is made of.
pub struct Served {
    /// `127.0.0.1:PORT/<repo>:<tag>`
    pub reference: String,
    pub manifest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
}

pub fn serve_image(server: &Server, repo: &str, tag: &str, archive: &Path) -> Served {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.insert(name, data);
    }
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let desc = &index["manifests"][0];
    let manifest_digest = desc["digest"].as_str().unwrap().to_string();
    let media_type = desc["mediaType"].as_str().unwrap().to_string();
    let blob = |d: &str| files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))].clone();
    let manifest_bytes = blob(&manifest_digest);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();

    server.route("/v2/", "application/json", b"{}".to_vec(), &[]);
    for r in [tag, manifest_digest.as_str()] {
        server.route(
            &format!("/v2/{repo}/manifests/{r}"),
            &media_type,
            manifest_bytes.clone(),
            &[("docker-content-digest", &manifest_digest)],
        );
    }
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    digests.extend(layers.iter().cloned());
    for d in digests {
        server.route(
            &format!("/v2/{repo}/blobs/{d}"),
            "application/octet-stream",
            blob(&d),
            &[("docker-content-digest", &d)],
        );
    }
    Served {
        reference: format!("{}/{repo}:{tag}", server.addr),
        manifest: manifest_digest,
        layers,
    }
}

/// Debian's `docker-registry` on 127.0.0.1, its data and log under a
/// directory: the registry users push Nix images to.
pub struct DockerRegistry {
    child: std::process::Child,
    pub log: std::path::PathBuf,
    /// `127.0.0.1:PORT`
    pub host: String,
}

impl DockerRegistry {
    pub fn start(dir: &Path) -> DockerRegistry {
        std::fs::create_dir_all(dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let logf = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("docker-registry must be installed (scripts/install-deps)");
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(&host).is_err() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "the registry did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        DockerRegistry { child, log, host }
    }

    /// The blobs it served (GETs of /v2/.../blobs/<digest>).
    pub fn blob_gets(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
