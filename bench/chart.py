#!/usr/bin/python3
"""Draws the cold/warm start chart from `cargo bench --bench coldstart -- --json FILE`.

    bench/chart.py RESULTS.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
links = [k for k in results if isinstance(results[k], dict) and "cold_lazy" in results[k]]
series = [
    ("cold_lazy", "cold, lazy (nix-snapshotter)"),
    ("cold_eager", "cold, eager (nix copy, then start)"),
    ("warm", "warm (nix-snapshotter)"),
    ("overlayfs", "ordinary image, overlayfs"),
]
fig, ax = plt.subplots(figsize=(8, 4.5))
width = 0.2
for i, (key, label) in enumerate(series):
    xs = [j + (i - 1.5) * width for j in range(len(links))]
    ys = [results[link][key] for link in links]
    bars = ax.bar(xs, ys, width, label=label)
    ax.bar_label(bars, labels=[f"{y:.2f}s" for y in ys], fontsize=7)
ax.set_xticks(range(len(links)), links)
ax.set_ylabel("seconds from ctr run to first output line")
ax.set_yscale("log")
mib = results[links[0]]["closure_bytes"] / 2**20
ax.set_title(f"python3 from a {mib:.0f} MiB closure: time to first output")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
