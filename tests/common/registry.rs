//! Serves an OCI image-layout tar as a read-only registry (the distribution
//! API's pull side: manifests by tag and digest, blobs), through the test
//! HTTP server, so its access log shows which blobs a pull fetched.

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
