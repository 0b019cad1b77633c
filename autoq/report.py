"""Reports from a sweep: accuracy/size plots, format maps, sensitivity heatmap, report.md/html.

Everything is read from the sweep directory (results table, score table, plans), so a report can
be regenerated at any time without touching a model.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap

from autoq.errors import AutoqError, atomic_output_dir
from autoq.plan import load_plan
from autoq.sensitivity import HEAD_BLOCK

FORMAT_COLORS = {  # one colour per registry format (a test holds this to autoq.formats.FORMATS), bits high to low
    "BF16": "#d9d9d9", "INT8_SQ": "#937860", "MXFP8": "#64b5cd", "FP8": "#4c72b0", "W4A16_NVFP4": "#8172b2",
    "W4A8": "#dd8452", "INT4_AWQ": "#c44e52", "NVFP4": "#55a868",
}
UNLISTED_FORMAT_COLOR = "#000000"  # a format from a newer plan than this report knows: shown, never dropped
METRICS = {  # metric column -> (axis label, lower is better, log scale)
    "ppl": ("perplexity on held-out text", True, True),
    "kl": ("mean token KL to BF16 (nats)", True, True),
    "wikitext2_word_perplexity": ("WikiText-2 word perplexity (lm-eval)", True, True),
}
SERIES_STYLE = {
    "autoq": dict(color="#c44e52", marker="o"),
    "autoq refine": dict(color="#8172b2", marker="D"),
    "ModelOpt auto_quantize": dict(color="#4c72b0", marker="s"),
}
UNSEEN_COLUMNS = ["kl_unseen_ilp", "kl_unseen_refined"]  # refined rows: KL on the slice refine never searched


def metric_columns(results: pd.DataFrame) -> list[str]:
    extra = [c for c in results.columns if c.endswith("_acc") or c.endswith("_acc_norm")]
    return [c for c in METRICS if c in results.columns] + extra


def _describe(metric: str) -> tuple[str, bool, bool]:
    if metric in METRICS:
        return METRICS[metric]
    return f"{metric.replace('_', ' ')} (higher is better)", False, False


def pareto_front(bits: np.ndarray, values: np.ndarray, lower_is_better: bool) -> np.ndarray:
    """Indices of points no other point beats on both bits (fewer) and metric."""
    order = np.lexsort((values if lower_is_better else -values, bits))
    front, best = [], np.inf
    for i in order:
        score = values[i] if lower_is_better else -values[i]
        if score < best:
            front.append(i)
            best = score
    return np.array(front, dtype=int)


def plot_metric(results: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    label, lower, log = _describe(metric)
    data = results.dropna(subset=[metric])
    if log:
        data = data[data[metric] > 0]  # BF16's KL is exactly 0; it is the reference, noted in the title
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, style in SERIES_STYLE.items():
        part = data[data.method == method].sort_values("searched_bits")
        if len(part):
            ax.plot(part.searched_bits, part[metric], label=method, linewidth=1.8, markersize=7, **style)
    baselines = data[~data.method.isin(list(SERIES_STYLE))]
    for (_, row), marker in zip(baselines.iterrows(), "^vDPX*"):
        ax.scatter(row.searched_bits, row[metric], marker=marker, s=80, color="black", zorder=3, label=row.method)
    if len(data) > 1:
        front = data.iloc[pareto_front(data.searched_bits.to_numpy(), data[metric].to_numpy(), lower)]
        ax.step(front.searched_bits, front[metric], where="post", linestyle="--", color="gray", linewidth=1, label="Pareto frontier", zorder=1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight, searched layers (scales included)")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layer_kind(name: str, block: int) -> str:
    marker = f".{block}."
    return name.split(marker, 1)[1] if block != HEAD_BLOCK and marker in name else name


def plot_format_maps(plans: dict[str, dict[str, str]], scores: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per plan: blocks across, layer kinds down, cell colour = format."""
    layers = scores.drop_duplicates("layer")[["layer", "block"]]
    layers = layers.assign(kind=[_layer_kind(n, b) for n, b in zip(layers.layer, layers.block)])
    kinds = list(dict.fromkeys(layers.kind))
    blocks = sorted(layers.block.unique())
    names = _ordered_formats({f for formats in plans.values() for f in formats.values()})
    colors = [FORMAT_COLORS.get(name, UNLISTED_FORMAT_COLOR) for name in names]
    fig, axes = plt.subplots(len(plans), 1, figsize=(max(6, 0.35 * len(blocks) + 3), 0.9 + (0.28 * len(kinds) + 0.6) * len(plans)), squeeze=False)
    for ax, (label, formats) in zip(axes[:, 0], plans.items()):
        grid = np.full((len(kinds), len(blocks)), np.nan)
        for name, block, kind in zip(layers.layer, layers.block, layers.kind):
            grid[kinds.index(kind), blocks.index(block)] = names.index(formats.get(name, "BF16"))
        ax.imshow(grid, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_xticks(range(len(blocks)), ["head" if b == HEAD_BLOCK else str(b) for b in blocks], fontsize=7)
        ax.set_title(label, fontsize=9)
    axes[-1, 0].set_xlabel("decoder block")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
    top = 1 - 0.9 / fig.get_figheight()  # keep about 0.9 inch above the panels for title and legend
    fig.suptitle(title, fontsize=10, y=0.995)
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.35 / fig.get_figheight()), ncol=len(names), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ordered_formats(present: set[str]) -> list[str]:
    """Every format present, the known ones in FORMAT_COLORS order, any other after them (BF16 always, as unplanned layers show BF16)."""
    return [f for f in FORMAT_COLORS if f in present | {"BF16"}] + sorted(present - set(FORMAT_COLORS))


def sensitivity_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Layers down, every scored format but BF16 (which scores 0) across."""
    quantized = scores[scores.format != "BF16"]
    table = quantized.pivot_table(index="layer", columns="format", values="score", sort=False)
    return table[[f for f in _ordered_formats(set(table.columns)) if f != "BF16"]]


def plot_sensitivity(scores: pd.DataFrame, path: Path, title: str) -> None:
    """Layers down, formats across, colour = log10 of the score (BF16 scores 0 and is left out)."""
    table = sensitivity_table(scores)
    values = np.log10(table.to_numpy().clip(min=1e-30))
    fig, ax = plt.subplots(figsize=(6.5 + 1.0 * table.shape[1], min(40, 1.6 + 0.16 * len(table))), layout="constrained")
    image = ax.imshow(values, aspect="auto", cmap="magma")
    ax.set_xticks(range(table.shape[1]), table.columns)
    step = max(1, len(table) // 60)
    ax.set_yticks(range(0, len(table), step), table.index[::step], fontsize=6)
    ax.set_xlabel("format")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="log10 score (estimated loss increase)", shrink=min(1.0, 12 / fig.get_figheight()))
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown_table(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.6g}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


REPORT_COLUMNS = ["method", "budget_bits", "searched_bits", "stored_bits", "size_bytes"]


def write_report(sweep_dir: Path, out: Path, overwrite: bool = False) -> Path:
    """Write plots, report.md and a self-contained report.html for a sweep into ``out``."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "results.csv").is_file():
        raise AutoqError(f"{sweep_dir} has no results.csv (run `autoq sweep` first)")
    results = pd.read_csv(sweep_dir / "results.csv")
    scores = pd.read_parquet(sweep_dir / "scores.parquet")
    info = json.loads((sweep_dir / "sweep.json").read_text())
    model = info["model"]
    name = model["id"] + (" (SYNTHETIC random weights)" if model.get("synthetic") else "")
    plans = {
        f"autoq @ {load_plan(p).budget['effective_bits']:g} bits": load_plan(p).formats()
        for p in sorted(sweep_dir.glob("plans/autoq-*.json"), key=lambda p: float(p.stem.split("-", 1)[1]))
    }
    for path in sorted(sweep_dir.glob("plan-refined-*bits.json")):
        refined = load_plan(path)
        plans[f"autoq refine @ {refined.budget['effective_bits']:g} bits"] = refined.formats()
    metrics = metric_columns(results)
    failures = ["status", "error"] if "error" in results and results.error.notna().any() else []  # failed rows say why
    unseen = [c for c in UNSEEN_COLUMNS if c in results]
    table = results[REPORT_COLUMNS + metrics + unseen + ["wall_seconds", "device"] + failures]
    with atomic_output_dir(out, overwrite) as tmp:
        figures = []
        for metric in metrics:
            figures.append((f"{metric}_vs_bits.png", f"{_describe(metric)[0]} vs effective bits"))
            plot_metric(results, metric, tmp / figures[-1][0], f"{name}: {metric} vs bits")
        if plans:
            figures.append(("format_map.png", "format chosen per layer"))
            plot_format_maps(plans, scores, tmp / "format_map.png", f"{name}: autoq formats per layer")
        figures.append(("sensitivity.png", "per-layer sensitivity"))
        plot_sensitivity(scores, tmp / "sensitivity.png", f"{name}:\nsensitivity per layer and format")
        table.to_csv(tmp / "results.csv", index=False)
        header = (
            f"# autoq report: {name}\n\n"
            f"Search space `{info['search_space']}`, objective `{info['objective']}`; calibration "
            f"{info['calibration']['samples']} x {info['calibration']['seq_len']} tokens from `{info['calibration']['source']}`, "
            f"evaluation on the next {info['heldout']['samples']} x {info['heldout']['seq_len']} held-out tokens.\n"
            "Bits are honest storage bits per weight of the searched layers (block and tensor scales included); "
            "`size_bytes` is the exported checkpoint's safetensors size.\n"
        )
        if model.get("weights_from"):  # e.g. a model dequantized from a quantized GGUF
            header += f"\nModel weights {model['weights_from']}." + (f" **Caveat:** {model['caveat']}.\n" if model.get("caveat") else "\n")
        if (results.method == "autoq refine").any():
            header += ("`autoq refine` rows: plans refined by a measured metric on the same held-out tokens this table uses; "
                       "`kl_unseen_*` is the ILP and the refined plan on a second slice the refinement never saw.\n")  # fmt: skip
        body = "\n".join(f"## {caption}\n\n![{caption}]({file})\n" for file, caption in figures)
        (tmp / "report.md").write_text(f"{header}\n{_markdown_table(table)}\n\n{body}")
        images = "".join(
            f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='data:image/png;base64,"
            f"{base64.b64encode((tmp / file).read_bytes()).decode()}'>"
            for file, caption in figures
        )
        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>autoq report: {html.escape(name)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>"
            f"<h1>autoq report: {html.escape(name)}</h1><p>{html.escape(header.split(chr(10), 2)[2])}</p>"
            f"{table.to_html(index=False, float_format=lambda v: f'{v:.6g}', na_rep='')}{images}</body></html>"
        )
        (tmp / "report.html").write_text(page)
    return out
