#!/usr/bin/python3
"""Draws the pod cold-start chart from `cargo bench --bench podstart -- --json FILE`.

    bench/podstart_chart.py RESULTS.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
order = ["nix_ref", "pushed_nix", "oci_overlayfs", "nix_ref_file_granular", "nix_ref_file_granular_profile", "pushed_nix_file_granular_profile"]
modes = [m for m in order if m in results]
labels = [results[m]["label"] for m in modes]
pull = [results[m]["pull"] for m in modes]
total = [results[m]["median"] for m in modes]
rest = [t - p for t, p in zip(total, pull)]

fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(modes)))
ax.barh(labels, pull, label="PullImage")
ax.barh(labels, rest, left=pull, label="create, start, to first log line")
for i, m in enumerate(modes):
    r = results[m]
    ax.text(
        total[i] + 0.1,
        i,
        f"{total[i]:.2f} s  ({r['speedup']:.1f}x)  {r['cache_mib']:.0f} MiB cache + {r['registry_mib']:.0f} MiB registry",
        va="center",
        fontsize=8,
    )
ax.invert_yaxis()
ax.set_xlim(0, max(total) * 1.9)
ax.set_xlabel("seconds from PullImage to the container's first log line (median)")
ax.set_title(
    f"Pod cold start, python3 from a {results['closure_mib']} MiB closure, 50 ms / 100 Mbit links"
)
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
