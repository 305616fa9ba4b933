#!/usr/bin/python3
"""Draws the file-granular cold-start chart from `cargo bench --bench filegrain -- --json FILE`.

    bench/filegrain_chart.py RESULTS.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
order = ["eager", "whole_path", "by_file", "by_file_profile", "overlayfs_unpacked", "soci", "stargz"]
modes = [m for m in order if m in results]
labels = [results[m]["label"] for m in modes]
total = [results[m]["median"] for m in modes]
read = results["read_bytes"]

fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(modes)))
ax.barh(labels, total, color=[{"eager": "#d08a3c", "whole_path": "#4a7fc1", "by_file": "#7aa6d8", "by_file_profile": "#2f5f9e", "overlayfs_unpacked": "#6bb36b", "soci": "#9a6fb0", "stargz": "#b06f8f"}[m] for m in modes])
for i, m in enumerate(modes):
    r = results[m]
    mib = r["fetched_bytes"] / 1048576
    ax.text(
        total[i] + 0.1,
        i,
        f"{total[i]:.2f} s  ({r['speedup_over_eager']:.1f}x eager)  {mib:.1f} MiB ({r['fetched_bytes'] / read:.2f}x read)",
        va="center",
        fontsize=8,
    )
ax.invert_yaxis()
ax.set_xlim(0, max(total) * 1.9)
ax.set_xlabel("seconds from the pull to the first output line (median)")
ax.set_title(
    f"Cold start of python3 ({results['closure_bytes'] >> 20} MiB closure), 50 ms / 100 Mbit link"
)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
