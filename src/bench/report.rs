//! What a bench found, for people (a table), scripts (JSON) and slides (a
//! chart: SVG written here, PNG through `rsvg-convert` when asked for).

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use super::BenchError;
use crate::commands::human;

/// One timed start.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub mode: &'static str,
    pub index: usize,
    pub seconds: f64,
    /// For `eager`: the part spent fetching the closure before the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_seconds: Option<f64>,
    /// Store paths with bytes downloaded during the run, sorted.
    pub fetched_paths: Vec<String>,
    pub fetched_bytes: u64,
    pub downloads: Vec<Download>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Download {
    pub path: String,
    /// `path` (a whole NAR) or `range` (frames of a seekable NAR).
    pub kind: String,
    pub bytes: u64,
    pub seconds: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub mode: &'static str,
    pub runs: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub median_fetched_paths: usize,
    pub median_fetched_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub image: String,
    pub command: Vec<String>,
    pub ready: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    pub closure_paths: usize,
    /// Whether page caches were dropped before cold runs (root only).
    pub caches_dropped: bool,
    pub summary: Vec<Summary>,
    pub runs: Vec<Run>,
    /// The slowest downloads of all cold runs.
    pub slowest: Vec<Download>,
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

impl Report {
    pub fn summarize(&mut self) {
        let mut modes: Vec<&'static str> = Vec::new();
        for r in &self.runs {
            if !modes.contains(&r.mode) {
                modes.push(r.mode);
            }
        }
        self.summary = modes
            .into_iter()
            .map(|mode| {
                let runs: Vec<&Run> = self.runs.iter().filter(|r| r.mode == mode).collect();
                let secs: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
                Summary {
                    mode,
                    runs: runs.len(),
                    median: median(secs.clone()).unwrap_or(0.0),
                    min: secs.iter().copied().fold(f64::INFINITY, f64::min),
                    max: secs.iter().copied().fold(0.0, f64::max),
                    median_fetched_paths: median(runs.iter().map(|r| r.fetched_paths.len()).collect()).unwrap_or(0),
                    median_fetched_bytes: median(runs.iter().map(|r| r.fetched_bytes).collect()).unwrap_or(0),
                }
            })
            .collect();
        let mut all: Vec<Download> = self
            .runs
            .iter()
            .filter(|r| r.mode == "cold")
            .flat_map(|r| r.downloads.iter().cloned())
            .collect();
        all.sort_by(|a, b| b.seconds.partial_cmp(&a.seconds).unwrap_or(std::cmp::Ordering::Equal));
        all.truncate(5);
        self.slowest = all;
    }

    /// The table printed at the end.
    pub fn table(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out)?;
        writeln!(
            out,
            "{}: ready at {}; {} store paths in its closure{}",
            self.image,
            self.ready,
            self.closure_paths,
            self.link.as_ref().map(|l| format!("; link {l}")).unwrap_or_default()
        )?;
        writeln!(
            out,
            "{:<6} {:>4} {:>9} {:>9} {:>9} {:>14} {:>11}",
            "mode", "runs", "median", "min", "max", "paths fetched", "bytes"
        )?;
        for s in &self.summary {
            writeln!(
                out,
                "{:<6} {:>4} {:>8.3}s {:>8.3}s {:>8.3}s {:>6} of {:<5} {:>11}",
                s.mode,
                s.runs,
                s.median,
                s.min,
                s.max,
                s.median_fetched_paths,
                self.closure_paths,
                human(s.median_fetched_bytes)
            )?;
        }
        let by = |m: &str| self.summary.iter().find(|s| s.mode == m).map(|s| s.median);
        if let (Some(c), Some(w)) = (by("cold"), by("warm")) {
            writeln!(out, "cold / warm: {:.1}x", c / w.max(1e-9))?;
        }
        if let (Some(c), Some(e)) = (by("cold"), by("eager")) {
            writeln!(out, "eager / cold: {:.1}x (lazy is that much faster)", e / c.max(1e-9))?;
        }
        if !self.caches_dropped {
            writeln!(
                out,
                "note: page caches were not dropped (not root): cold runs may read some files from memory"
            )?;
        }
        if !self.slowest.is_empty() {
            writeln!(out, "slowest downloads (cold runs):")?;
            for d in &self.slowest {
                writeln!(
                    out,
                    "  {:>8.3}s {:>10} {:<5} {}{}",
                    d.seconds,
                    human(d.bytes),
                    d.kind,
                    d.path,
                    if d.error.is_empty() {
                        String::new()
                    } else {
                        format!(" (failed: {})", d.error)
                    }
                )?;
            }
        }
        if let Some(cold) = self.runs.iter().find(|r| r.mode == "cold") {
            writeln!(out, "store paths fetched by the first cold run:")?;
            for p in &cold.fetched_paths {
                writeln!(out, "  {p}")?;
            }
        }
        Ok(())
    }

    /// A bar chart of the medians, min–max whiskers: SVG, or PNG converted
    /// from it by `rsvg-convert` (librsvg2-bin).
    pub fn chart(&self, to: &Path) -> Result<(), BenchError> {
        let svg = self.svg();
        let write = |p: &Path, data: &[u8]| {
            std::fs::write(p, data).map_err(|e| BenchError::Output {
                path: p.to_path_buf(),
                msg: e.to_string(),
            })
        };
        match to.extension().and_then(|e| e.to_str()) {
            Some("svg") => write(to, svg.as_bytes()),
            Some("png") => {
                let tmp = to.with_extension("svg.tmp");
                write(&tmp, svg.as_bytes())?;
                let out = std::process::Command::new("rsvg-convert")
                    .args(["--format", "png", "--background-color", "white", "--output"])
                    .arg(to)
                    .arg(&tmp)
                    .output();
                let _ = std::fs::remove_file(&tmp);
                match out {
                    Ok(o) if o.status.success() => Ok(()),
                    Ok(o) => Err(BenchError::Output {
                        path: to.to_path_buf(),
                        msg: format!("rsvg-convert: {}", String::from_utf8_lossy(&o.stderr).trim()),
                    }),
                    Err(e) => Err(BenchError::Output {
                        path: to.to_path_buf(),
                        msg: format!(
                            "a PNG chart needs rsvg-convert (apt-get install librsvg2-bin), or ask for .svg: {e}"
                        ),
                    }),
                }
            }
            _ => Err(BenchError::Usage(format!(
                "--chart {}: the file must end in .svg or .png",
                to.display()
            ))),
        }
    }

    fn svg(&self) -> String {
        let (w, h, left, top, bottom) = (640.0, 120.0 + 60.0 * self.summary.len() as f64, 80.0, 50.0, 40.0);
        let max = self.summary.iter().map(|s| s.max).fold(0.001, f64::max);
        let scale = (w - left - 140.0) / max;
        let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{left}\" y=\"24\" font-size=\"15\">{}</text>\n\
             <text x=\"{left}\" y=\"42\" fill=\"#555\">time to ready (median, min-max){}</text>\n",
            esc(&self.image),
            esc(&self.link.as_ref().map(|l| format!(", link {l}")).unwrap_or_default())
        );
        for (i, m) in self.summary.iter().enumerate() {
            let y = top + 20.0 + 60.0 * i as f64;
            let color = match m.mode {
                "cold" => "#4a7fc1",
                "warm" => "#6bb36b",
                _ => "#d08a3c",
            };
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n\
                 <rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"30\" fill=\"{color}\"/>\n\
                 <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
                 <text x=\"{:.1}\" y=\"{}\">{:.3} s, {} fetched</text>\n",
                left - 8.0,
                y + 20.0,
                m.mode,
                (m.median * scale).max(1.0),
                left + m.min * scale,
                left + m.max * scale,
                y + 15.0,
                y + 15.0,
                left + m.max * scale + 8.0,
                y + 20.0,
                m.median,
                human(m.median_fetched_bytes)
            );
        }
        s += &format!(
            "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"black\"/>\n</svg>\n",
            h - bottom
        );
        s
    }
}
