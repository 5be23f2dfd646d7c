"""A study's report: tables and plots from its results.jsonl, as report.md and report.html beside PNG files.

    python -m launch report runs/studies/tiny/results.jsonl [--out DIR]

Plots (each only when the results have what it needs):
- scaling.png: tokens/s per GPU against the number of GPUs for every series (the same point but for its GPU
  count), with the ideal (flat: the series' smallest-GPU value) as a dashed line; efficiency in the table.
- mfu.png: MFU (TFLOP/s per GPU where the device has no known peak, e.g. CPUs) by architecture and sequence
  length, the best layout of each.
- memory.png: peak memory against sequence length per architecture and recompute mode (MsT chunks noted).
- breakdown.png: measured step time next to the performance model's split into compute, tensor-, data- and
  pipeline-parallel communication and pipeline bubble. That split is modelled, not measured, and labelled so.
- inference.png (inference studies): decode tokens/s and the inference cache's size against the context length
  per architecture: where keys and values grow with the context and recurrent states do not.
Rows with status invalid / oom / failed are listed with their reasons.
"""

from __future__ import annotations

import html
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load_rows(path: Path) -> list[dict]:
    """The newest row per point (a re-run point appears again further down the file)."""
    rows: dict[str, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON line ({e}); delete or fix that line") from None
            rows[row["point"]] = row
    return list(rows.values())


def _cfg(row: dict, section: str, key: str, default=None):
    return ((row.get("config") or {}).get(section) or {}).get(key, default)


def series_key(row: dict) -> str:
    """What a row measures apart from how many GPUs ran it: its label without gpus."""
    return " ".join(t for t in row["label"].split() if not t.startswith("gpus=")) or "(all)"


def size(row: dict) -> str:
    return f"d{_cfg(row, 'model', 'd_model')}-L{_cfg(row, 'model', 'n_layers')}"


def layout(row: dict) -> str:
    p = row.get("config", {}).get("parallel", {}) if row.get("config") else {}
    dp = row["world_size"] // max(1, p.get("tp", 1) * p.get("pp", 1) * p.get("cp", 1))
    text = f"dp{dp}·tp{p.get('tp', 1)}·pp{p.get('pp', 1)}" + (f"·cp{p['cp']}" if p.get("cp", 1) > 1 else "")
    if p.get("tp", 1) > 1 and p.get("sequence_parallel"):
        text += "+sp"
    if p.get("recompute", "none") != "none":
        text += f" rc={p['recompute']}"
    if p.get("minisequence_chunks", 1) > 1:
        text += f" mst={p['minisequence_chunks']}"
    return text


def efficiency(rows: list[dict]) -> dict[str, dict[int, float]]:
    """Per series: tokens/s per GPU at each GPU count over that at the series' smallest count."""
    out = {}
    for key, group in _by_series(rows).items():
        base = group[min(group)]
        out[key] = {g: r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] for g, r in sorted(group.items())}
    return out


def _training(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("measure", "train") == "train"]


def _inference(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("measure") == "inference" and r["status"] == "ok"]


def _by_series(rows: list[dict]) -> dict[str, dict[int, dict]]:
    series: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in _training(rows):
        if r["status"] == "ok":
            series[series_key(r)][r["world_size"]] = r
    return series


# ------------------------------------------------------------------------------------------------ plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def _save(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str) -> bool:
    """Label, lay out, write and close a figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return True


def plot_scaling(rows: list[dict], path: Path) -> bool:
    series = {k: v for k, v in _by_series(rows).items() if len(v) > 1}
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, group in sorted(series.items()):
        gpus = sorted(group)
        line, = ax.plot(gpus, [group[g]["tokens_per_s_per_gpu"] for g in gpus], "o-", label=key)
        ax.plot(gpus, [group[gpus[0]]["tokens_per_s_per_gpu"]] * len(gpus), "--", color=line.get_color(),
                alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({g for group in series.values() for g in group}))
    ax.get_xaxis().set_major_formatter("{x:.0f}")
    return _save(fig, ax, path, xlabel="GPUs (processes)", ylabel="tokens/s per GPU",
                 title="Scaling (dashed: ideal, flat per GPU)")


def plot_mfu(rows: list[dict], path: Path) -> bool:
    ok = [r for r in _training(rows) if r["status"] == "ok"]
    if not ok:
        return False
    use_mfu = all(r.get("mfu") is not None for r in ok)
    metric = "mfu" if use_mfu else "tflops_per_gpu"
    best: dict[tuple[str, int], float] = {}
    for r in ok:
        key = (f"{_cfg(r, 'model', 'arch')} {size(r)}", _cfg(r, "model", "seq_len"))
        best[key] = max(best.get(key, 0.0), r[metric] * (100 if use_mfu else 1))
    archs = sorted({a for a, _ in best})
    seqs = sorted({s for _, s in best})
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(archs)
    for i, arch in enumerate(archs):
        xs = [j + i * width for j in range(len(seqs))]
        ax.bar(xs, [best.get((arch, s), 0.0) for s in seqs], width, label=arch)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(seqs))], [str(s) for s in seqs])
    return _save(fig, ax, path, xlabel="sequence length",
                 ylabel="MFU (%)" if use_mfu else "TFLOP/s per GPU (no known peak for this device)",
                 title="Model FLOPs utilisation, best layout per bar" if use_mfu else "Achieved TFLOP/s, best layout")


def plot_memory(rows: list[dict], path: Path) -> bool:
    lines: dict[str, dict[int, float]] = defaultdict(dict)
    for r in _training(rows):
        if r["status"] == "ok" and r.get("peak_memory_gb") is not None:
            key = f"{_cfg(r, 'model', 'arch')} {size(r)} {layout(r)}"
            seq = _cfg(r, "model", "seq_len")
            lines[key][seq] = max(lines[key].get(seq, 0.0), r["peak_memory_gb"])
    lines = {k: v for k, v in lines.items() if len(v) > 1}
    if not lines:
        return False
    kinds = {r.get("memory_kind") for r in rows if r.get("peak_memory_gb") is not None}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, points in sorted(lines.items()):
        seqs = sorted(points)
        ax.plot(seqs, [points[s] for s in seqs], "o-", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({s for points in lines.values() for s in points}))
    ax.get_xaxis().set_major_formatter("{x:.0f}")
    ylabel = ("peak GPU memory allocated (GiB)" if kinds == {"gpu_allocated"}
              else "peak memory (GiB; CPU: resident set of rank 0)")
    return _save(fig, ax, path, xlabel="sequence length", ylabel=ylabel, title="Peak memory per layout and recompute mode")


def _inference_lines(rows: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """Per point label less its sequence length (architecture, pattern, size, ...): `metric` at each context."""
    lines: dict[str, dict[int, float]] = defaultdict(dict)
    for r in _inference(rows):
        key = " ".join(t for t in series_key(r).split() if not t.startswith("seq_len=")) or "(all)"
        lines[key][r["context"]] = r[metric]
    return lines


def plot_inference(rows: list[dict], path: Path) -> bool:
    decode, cache = _inference_lines(rows, "decode_tokens_per_s"), _inference_lines(rows, "cache_bytes")
    if not any(len(points) > 1 for points in decode.values()):
        return False
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, lines, scale in ((left, decode, 1.0), (right, cache, 2**-20)):
        for key, points in sorted(lines.items()):
            contexts = sorted(points)
            ax.plot(contexts, [points[c] * scale for c in contexts], "o-", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c for points in lines.values() for c in points}))
        ax.get_xaxis().set_major_formatter("{x:.0f}")
    right.set_yscale("log")
    right.set_xlabel("context (prompt + decoded tokens)")
    right.set_ylabel("inference cache (MiB)")
    right.set_title("Cache size: keys/values grow, states do not")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    return _save(fig, left, path, xlabel="context (prompt + decoded tokens)", ylabel="decode tokens/s",
                 title="Decode speed against context")


def model_check(pairs: list[tuple[dict, object]], cluster_name: str) -> list[str]:
    """Markdown: the performance model's predictions next to the measurements they can be checked against."""
    if not pairs:
        return []
    out = ["", f"## Performance model check ({cluster_name})", "",
           "PREDICTED by launch/perfmodel.py from the single-process points, against what was measured.", "",
           "| point | GPUs | measured tokens/s | predicted tokens/s | predicted / measured |",
           "|---|---:|---:|---:|---:|"]
    for row, pred in sorted(pairs, key=lambda p: (series_key(p[0]), p[0]["world_size"])):
        out.append(f"| {series_key(row)} | {row['world_size']} | {row['tokens_per_s']:,.0f} | "
                   f"{pred.tokens_per_s:,.0f} | {pred.tokens_per_s / row['tokens_per_s']:.2f} |")
    return out


def plot_breakdown(pairs: list[tuple[dict, object]], path: Path) -> bool:
    items = [(r["label"], r["step_time_s"], pred.breakdown_s) for r, pred in pairs]
    if not items:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(items) + 1.8))
    parts = sorted({k for _, _, split in items for k in split})
    left = [0.0] * len(items)
    for part in parts:
        widths = [split.get(part, 0.0) * 1e3 for _, _, split in items]
        ax.barh(range(len(items)), widths, left=left, label=f"{part} (modelled)")
        left = [a + b for a, b in zip(left, widths)]
    ax.plot([t * 1e3 for _, t, _ in items], range(len(items)), "k|", markersize=18, label="measured step")
    ax.set_yticks(range(len(items)), [label for label, _, _ in items], fontsize=7)
    return _save(fig, ax, path, xlabel="ms per step", ylabel="", title="Measured step time | modelled split")


# ------------------------------------------------------------------------------------------------ text

def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def tables(rows: list[dict]) -> list[str]:
    """Markdown lines: the training points, the inference points, scaling efficiency, the points that did not
    run."""
    ok = sorted((r for r in _training(rows) if r["status"] == "ok"),
                key=lambda r: (series_key(r), r["world_size"]))
    out = [] if not ok else [
        "## Points", "", "| point | layout | GPUs | tokens/s | tokens/s/GPU | step ms (± sd) | TFLOP/s/GPU | MFU | "
        "peak mem GiB | rank CPU spread |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        out.append(f"| {series_key(r)} | {layout(r)} | {r['world_size']} | {r['tokens_per_s']:,.0f} | "
                   f"{r['tokens_per_s_per_gpu']:,.0f} | {r['step_time_s'] * 1e3:.1f} ± "
                   f"{r['step_time_std_s'] * 1e3:.1f} | {r['tflops_per_gpu']:.3g} | {_fmt(r.get('mfu'), '.1%')} | "
                   f"{_fmt(r.get('peak_memory_gb'), '.2f')} | {_fmt(r.get('rank_cpu_spread'), '.1%')} |")
    inference = sorted(_inference(rows), key=lambda r: (series_key(r), r["context"]))
    if inference:
        out += ["## Inference points", "", "Prefill of the prompt in one call, then one token per step through the "
                "inference cache.", "", "| point | context | batch | prefill tokens/s | decode tokens/s | "
                "decode ms/step | cache MiB | peak mem GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in inference:
            out.append(f"| {series_key(r)} | {r['context']} | {r['batch']} | {r['prefill_tokens_per_s']:,.0f} | "
                       f"{r['decode_tokens_per_s']:,.0f} | {r['decode_ms_per_step']:.2f} | "
                       f"{r['cache_bytes'] / 2**20:.3g} | {_fmt(r.get('peak_memory_gb'), '.2f')} |")
    eff = {k: v for k, v in efficiency(rows).items() if len(v) > 1}
    if eff:
        counts = sorted({g for v in eff.values() for g in v})
        out += ["", "## Scaling efficiency", "", "tokens/s per GPU relative to the series' smallest GPU count.", "",
                "| series | " + " | ".join(f"{g} GPU" for g in counts) + " |",
                "|---|" + "---:|" * len(counts)]
        for key, values in sorted(eff.items()):
            out.append(f"| {key} | " + " | ".join(_fmt(values.get(g), ".0%") for g in counts) + " |")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        out += ["", "## Points that did not run", "", "| point | GPUs | status | reason |", "|---|---:|---|---|"]
        for r in sorted(bad, key=lambda r: (r["status"], r["label"])):
            reason = (r.get("reason") or "").replace("|", "/").replace("\n", " ")
            out.append(f"| {r['label']} | {r['world_size']} | {r['status']} | {reason} |")
    return out


def header(rows: list[dict], source: Path) -> list[str]:
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    studies = sorted({r.get("study", "?") for r in rows})
    devices = sorted({r["device"] for r in rows if r.get("device")})
    versions = [r["versions"] for r in rows if r.get("versions")]
    kind = "Inference" if all(r.get("measure") == "inference" for r in rows) else "Throughput"
    out = [f"# {kind} study: {', '.join(studies)}", "",
           f"From `{source}`: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + " point(s).", "",
           f"- device: {', '.join(devices) or 'unknown'}"]
    if versions:
        out.append("- software: " + ", ".join(f"{k} {v}" for k, v in versions[-1].items()))
    ok, inference = [r for r in _training(rows) if r["status"] == "ok"], _inference(rows)
    if inference:
        repeats, warmup = (statistics.mode(r[k] for r in inference) for k in ("repeats", "warmup"))
        out.append(f"- timing (inference): mean of {repeats} prefill+decode runs per point after {warmup} "
                   f"untimed one(s)")
    if ok:
        steps = statistics.mode(r["timed_steps"] for r in ok)
        warm = statistics.mode(r["warmup_steps"] for r in ok)
        out.append(f"- timing: mean of {steps} optimizer steps per point after {warm} untimed warm-up steps")
    if any(r.get("memory_kind") in ("cpu_rss_rank0", "cpu_rss") for r in rows if r["status"] == "ok"):
        out.append("- memory on CPU is the peak resident set (of rank 0 in training; interpreter and libraries "
                   "included)")
    return out


def markdown_to_html(lines: list[str], title: str) -> str:
    """The small Markdown subset this report writes (headings, lists, tables, images, paragraphs) as HTML."""
    body, table = [], []

    def flush_table():
        if table:
            cells = [[c.strip() for c in row.strip("|").split("|")] for row in table]
            head, rest = cells[0], [r for r in cells[2:]]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</table>")
            table.clear()
    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
        elif line.startswith("- "):
            body.append(f"<ul><li>{html.escape(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}td{text-align:right}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(results: Path, out_dir: Path | None = None, *, cluster_path: Path | None = None) -> Path:
    """Write report.md, report.html and the plots next to `results` (or into `out_dir`); the Markdown path."""
    rows = load_rows(results)
    if not rows:
        raise ValueError(f"{results} has no results yet; run `python -m launch sweep STUDY` first")
    out_dir = out_dir or results.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = header(rows, results) + [""] + tables(rows)
    figures = [("scaling.png", "Scaling", plot_scaling(rows, out_dir / "scaling.png")),
               ("mfu.png", "MFU", plot_mfu(rows, out_dir / "mfu.png")),
               ("memory.png", "Peak memory", plot_memory(rows, out_dir / "memory.png")),
               ("inference.png", "Inference", plot_inference(rows, out_dir / "inference.png"))]
    if cluster_path is not None:
        from launch.perfmodel import Cluster, predict_measured

        cluster = Cluster.load(cluster_path)
        pairs = predict_measured(rows, cluster)
        lines += model_check(pairs, cluster.name)
        figures.append(("breakdown.png", "Step-time breakdown (modelled)",
                        plot_breakdown(pairs, out_dir / "breakdown.png")))
    shown = [(name, title) for name, title, made in figures if made]
    if shown:
        lines += ["", "## Plots", ""]
        for name, title in shown:
            lines += [f"![{title}]({name})", ""]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    (out_dir / "report.html").write_text(markdown_to_html(lines, lines[0].lstrip("# ")))
    return md
