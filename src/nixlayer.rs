//! The image format's Nix layer, as labels say it: the facts both `image`
//! (which writes them) and `snapshots` (which reads them) need. Depends on
//! neither.

use std::collections::BTreeMap;

pub const LABEL_CLOSURE: &str = "containerd.io/snapshot/nix-closure";
pub const LABEL_LAYER: &str = "containerd.io/snapshot/nix-layer";
pub const LABEL_PATH_PREFIX: &str = "containerd.io/snapshot/nix-store-path.";
/// Ours: a JSON list of the image's copyToRoot store paths. Its presence says
/// the layer is exactly the closure's mountpoints plus those paths' links,
/// so the layer can be made without fetching it (the remote-snapshot
/// shortcut). Images without it (the Go project's) are fetched and applied.
pub const LABEL_COPY_TO_ROOT: &str = "containerd.io/snapshot/nix-copy-to-root";

/// The labels that determine a Nix layer's whole content, when they do
/// (the copyToRoot marker is there): closure and copyToRoot. Two layers
/// with the same are the same layer, whoever asked for them.
pub fn content_labels(labels: &BTreeMap<String, String>) -> Option<BTreeMap<&str, &str>> {
    labels.get(LABEL_COPY_TO_ROOT)?;
    Some(
        labels
            .iter()
            .filter(|(k, _)| {
                k.as_str() == LABEL_COPY_TO_ROOT
                    || k.as_str() == LABEL_CLOSURE
                    || k.as_str() == LABEL_LAYER
                    || k.starts_with(LABEL_PATH_PREFIX)
            })
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
    )
}

/// Whether a committed snapshot (key `their_key`, labels `theirs`) may
/// stand in for the layer a Prepare under `key` with labels `ours` asks for
/// by chain ID. Within one containerd namespace, yes: containerd itself
/// trusts chain IDs there. Across namespaces only for a Nix layer whose
/// labels determine its content and say the same: another namespace's
/// layer content is not ours to vouch for, and one client that skipped the
/// diff_id check must not poison every namespace.
pub fn may_share(
    their_key: &str,
    theirs: &BTreeMap<String, String>,
    key: &str,
    ours: &BTreeMap<String, String>,
) -> bool {
    let namespace = |k: &str| k.split('/').next().unwrap_or_default().to_string();
    if namespace(their_key) == namespace(key) {
        return true;
    }
    matches!((content_labels(theirs), content_labels(ours)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn layers_are_shared_across_namespaces_only_when_labels_determine_them() {
        let plain = labels(&[("containerd.io/snapshot.ref", "sha256:c")]);
        assert!(may_share("a/1/x", &plain, "a/7/y", &plain));
        assert!(!may_share("a/1/x", &plain, "b/7/y", &plain));
        let nix = labels(&[(LABEL_CLOSURE, "/nix/store/x-closure-info"), (LABEL_COPY_TO_ROOT, "[]")]);
        assert!(may_share("a/1/x", &nix, "b/7/y", &nix));
        let other = labels(&[(LABEL_CLOSURE, "/nix/store/y-closure-info"), (LABEL_COPY_TO_ROOT, "[]")]);
        assert!(!may_share("a/1/x", &nix, "b/7/y", &other));
        // Unmarked Nix layers were applied from their (unchecked) content.
        let unmarked = labels(&[(LABEL_CLOSURE, "/nix/store/x-closure-info")]);
        assert!(!may_share("a/1/x", &unmarked, "b/7/y", &unmarked));
    }
}
