#!/usr/bin/python3
"""Draws the read-stall chart from `cargo bench --bench continuity -- --json FILE`.

    bench/continuity_chart.py RESULTS.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
cases = results["cases"]
fig, ax = plt.subplots(figsize=(8, 4))
xs = range(len(cases))
w = 0.35
ys = [c["longest_read_s"] for c in cases]
bars = ax.bar([x - w / 2 for x in xs], ys, w, color="#4c72b0", label="longest read a container saw (median of rounds)")
ax.bar_label(bars, labels=[f"{y:.2f}s" for y in ys], fontsize=8)
gaps = [c["gap_s"] for c in cases]
bars = ax.bar([x + w / 2 for x in xs], gaps, w, color="#dd8452", label="service gap: stop or kill until served again (max)")
ax.bar_label(bars, labels=[f"{y:.3f}s" for y in gaps], fontsize=8)
for x, c in zip(xs, cases):
    if c["target_s"] is not None:
        ax.hlines(c["target_s"], x - 0.3, x + 0.3, colors="#c44e52", linestyles="dashed")
        ax.annotate(f"target {c['target_s']}s", (x + 0.3, c["target_s"]), fontsize=7, color="#c44e52")
ax.set_xticks(list(xs), [c["label"] for c in cases], fontsize=8, rotation=10)
ax.set_ylabel("seconds")
ax.set_title(f"Longest read of a running container while the daemon goes ({results['rounds']} rounds)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
