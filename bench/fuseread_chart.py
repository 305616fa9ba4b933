#!/usr/bin/python3
"""Draws the warm read chart from `cargo bench --bench fuseread -- --json FILE`.

    bench/fuseread_chart.py RESULTS.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = json.load(open(sys.argv[1]))
cases = []
for r in rows:
    c = (r["workload"], r["cache"])
    if c not in cases:
        cases.append(c)
sources = []
for r in rows:
    if r["source"] not in sources:
        sources.append(r["source"])

fig, ax = plt.subplots(figsize=(9, 4.5))
width = 0.8 / len(sources)
for j, s in enumerate(sources):
    ratios = [next(r["ratio"] for r in rows if (r["workload"], r["cache"]) == c and r["source"] == s) for c in cases]
    mibs = [next(r["mib_s"] for r in rows if (r["workload"], r["cache"]) == c and r["source"] == s) for c in cases]
    xs = [i + (j - (len(sources) - 1) / 2) * width for i in range(len(cases))]
    ax.bar(xs, ratios, width, label=s)
    for x, ratio, mib in zip(xs, ratios, mibs):
        ax.text(x, ratio + 0.02, f"{ratio:.2f}x\n{mib:.0f}", ha="center", fontsize=7)
ax.axhline(0.8, color="grey", linestyle="--", linewidth=0.8)
ax.text(len(cases) - 0.5, 0.81, "target 0.8x", fontsize=7, ha="right", color="grey")
ax.set_xticks(range(len(cases)))
ax.set_xticklabels([f"{w}\n{c}" for w, c in cases], fontsize=8)
ax.set_ylabel("throughput / local disk (MiB/s on the bars)")
ax.set_ylim(0, 1.35)
ax.set_title("Warm reads of store files: through the daemon (rootless), passthrough, local disk")
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
