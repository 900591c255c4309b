"""A single self-contained HTML report of an analysis: figures and sample images embedded, no network needed.

:func:`write_report` takes plain arrays (the per-sample results of ``Similarity.density`` / ``neighbors`` /
``denoising``), draws the figures with matplotlib (Agg) and fills ``template.html``. Images are embedded as
``data:`` URIs and the neighbour lists as JSON, so the page works from ``file://`` with no sibling files.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..io import write_atomic

__all__ = ["write_report", "is_image_data"]

GALLERY = 16  # samples per gallery
SELECTED = 3  # neighbour rows per group (isolated, crowded, mislabelled)
BINS = 8  # density bins with examples
PER_BIN = 6  # examples shown per density bin
MAX_EMBEDDED = 5000  # embed every sample (clickable everywhere) up to this many

#: Per-sample scores side by side in the report: (column, what it is, sign: +1 when higher = more likely
#: mislabelled, -1 when lower = more likely). nnsim's own first, then the baselines that need no eNTK.
SCORES = [
    ("mislabel_score", "nnsim: (1 − neighbour label agreement) + label consistency / √2", 1),
    ("neighbor_label_agreement", "nnsim: share of the k nearest neighbours (network's similarity) with the same "
                                 "label", -1),
    ("label_consistency", "nnsim: distance of the label to the kernel-weighted average of all labels", 1),
    ("loss", "baseline: the model's cross-entropy loss on the given label", 1),
    ("input_knn_disagreement", "baseline: share of the k nearest neighbours in input space (Euclidean) with "
                               "another label", 1),
    ("self_confidence", "baseline: cleanlab's self-confidence, the predicted probability of the given label", -1),
]
TABLE_COLUMNS = ["index", "label", "prediction", "density", "effective_neighbors", "label_consistency",
                 "prediction_consistency", "neighbor_label_agreement", "mislabel_score", "loss",
                 "input_knn_disagreement", "self_confidence"]


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the HTML report needs matplotlib: pip install 'nnsim[cli]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_image_data(x: np.ndarray) -> bool:
    """Samples shaped [H, W], [1, H, W] or [3, H, W] with H, W >= 4 are drawn as images, others as values."""
    shape = x.shape[1:]
    if len(shape) == 2:
        return min(shape) >= 4
    return len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 4


def _png(plt: Any, fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class _Tiles:
    """The clickable sample tiles of the page (image or values, label, caption), remembering which were drawn.
    Images are PNG data URIs scaled to [0, 1] with the data set's global range (per channel)."""

    def __init__(self, x: np.ndarray, columns: dict[str, np.ndarray], class_names: Sequence[str] | None) -> None:
        self.x = x
        self.image = is_image_data(x)
        if self.image:
            axes = (0,) + tuple(range(2, x.ndim)) if x.ndim == 4 else None
            self.lo = x.min(axis=axes, keepdims=True)[0] if axes else x.min()
            self.hi = x.max(axis=axes, keepdims=True)[0] if axes else x.max()
        self._uris: dict[int, str] = {}
        self.density = np.asarray(columns["density"], dtype=float)
        self.label, self.pred = columns.get("label"), columns.get("prediction")
        self.class_names = class_names
        self.drawn: set[int] = set()

    def uri(self, i: int) -> str | None:
        if not self.image:
            return None
        if i not in self._uris:
            import matplotlib.image as mpimg

            a = (self.x[i] - self.lo) / np.maximum(self.hi - self.lo, 1e-12)  # a constant image: no division by 0
            a = np.clip(a, 0, 1)
            buf = io.BytesIO()
            if a.ndim == 3 and a.shape[0] == 3:
                mpimg.imsave(buf, np.ascontiguousarray(a.transpose(1, 2, 0)), format="png")
            else:
                mpimg.imsave(buf, a.reshape(a.shape[-2:]), cmap="gray_r", vmin=0, vmax=1, format="png")
            self._uris[i] = _data_uri(buf.getvalue())
        return self._uris[i]

    def info(self, i: int) -> dict[str, Any]:
        """What the page's script knows of sample i (embedded as JSON; non-image samples: 12 values)."""
        return {"img": self.uri(i), "values": None if self.image else [float(v) for v in self.x[i].reshape(-1)[:12]],
                "label": None if self.label is None else int(self.label[i]),
                "pred": None if self.pred is None else int(self.pred[i]), "density": float(self.density[i])}

    def tile(self, i: int, caption: str = "") -> str:
        self.drawn.add(i)
        info = self.info(i)
        body = (f'<img src="{info["img"]}" alt="sample {i}">' if info["img"] else
                f'<div class="values">{" ".join(f"{v:.2f}" for v in info["values"] or [])}</div>')
        lab, bad = _label_text(info, self.class_names)
        cls = ' class="bad"' if bad else ""
        cap = f"<br>{html.escape(caption)}" if caption else ""
        text = f"#{i} <span{cls}>{html.escape(lab)}</span>{cap}"
        return f'<div class="sample" data-index="{i}">{body}<div>{text}</div></div>'


def write_report(path: str | Path, *, x: np.ndarray, columns: dict[str, np.ndarray], neighbor_index: np.ndarray,
                 neighbor_similarity: np.ndarray, summary: dict[str, Any], title: str = "nnsim report",
                 subtitle: str = "", class_names: Sequence[str] | None = None,
                 figures_dir: str | Path | None = None) -> Path:
    """Write the self-contained report to ``path``.

    Args:
        x: the samples [N, ...] (drawn as images when shaped [H, W], [1|3, H, W], else shown as values).
        columns: per-sample arrays [N]; uses ``density`` (required), and when present ``label``, ``prediction``,
            ``effective_neighbors``, ``label_consistency`` / ``prediction_consistency``,
            ``neighbor_label_agreement``, ``mislabel_score``, ``prediction_matches_label``.
        neighbor_index, neighbor_similarity: [N, k] nearest neighbours of every sample, best first (-1: none).
        summary: label -> value pairs shown in the summary table (nested dicts are flattened).
        figures_dir: also save the figures there as PNG files.
    """
    plt = _matplotlib()
    tiles = _Tiles(np.asarray(x), columns, class_names)
    density = tiles.density
    order = np.argsort(density, kind="stable")
    finite = order[np.isfinite(density[order])]
    isolated, crowded = finite[:GALLERY], finite[::-1][:GALLERY]
    mis = None
    if "mislabel_score" in columns:
        mis = np.argsort(-np.asarray(columns["mislabel_score"], dtype=float), kind="stable")[:GALLERY * 2]
    figs = {"density": _density_figure(plt, columns), "denoising": _denoising_figure(plt, columns, neighbor_index)}
    if figures_dir is not None:
        fdir = Path(figures_dir)
        fdir.mkdir(parents=True, exist_ok=True)
        for name, png in figs.items():
            write_atomic(fdir / f"{name}.png", png)
    groups = [("most isolated", isolated[:SELECTED]), ("most crowded", crowded[:SELECTED])]
    if mis is not None:
        groups.append(("most likely mislabelled", mis[:SELECTED]))
    fill = {
        "TITLE": html.escape(title), "SUBTITLE": html.escape(subtitle), "SUMMARY": _summary_table(summary),
        "DENSITY_FIG": _data_uri(figs["density"]), "DENSITY_BINS": _density_bins(tiles, finite),
        "ISOLATED": "".join(tiles.tile(int(i), f"N {density[i]:.1f}") for i in isolated),
        "CROWDED": "".join(tiles.tile(int(i), f"N {density[i]:.1f}") for i in crowded),
        "MISLABELLED": "".join(tiles.tile(int(i), f"score {columns['mislabel_score'][i]:.2f}") for i in mis)
        if mis is not None else "",
        "K": str(neighbor_index.shape[1]),
        "NEIGHBOR_ROWS": _neighbor_rows(tiles, groups, neighbor_index, neighbor_similarity),
        "DENOISING_NOTE": html.escape(_denoising_note(summary)), "DENOISING_FIG": _data_uri(figs["denoising"]),
        "MISLABEL_NOTE": html.escape(MISLABEL_NOTE if mis is not None else "No labels were given."),
    }
    fill["BASELINES"], fill["DIFFER"] = _baselines(columns, summary, tiles.tile)
    fill["CLASS_OPTIONS"] = _class_options(tiles.label if tiles.label is not None else tiles.pred, class_names)
    data = _page_data(tiles, columns, neighbor_index, neighbor_similarity)  # after every tile is drawn
    fill["DATA"] = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8")
    for key, value in fill.items():
        page = page.replace("{{" + key + "}}", value)
    return write_atomic(path, page)


MISLABEL_NOTE = ("Ranked by the mislabel score: (1 \u2212 share of the nearest neighbours with the same label) + "
                 "label consistency / \u221a2, where label consistency is |onehot(y\u1d62) \u2212 \u03a3\u2c7c "
                 "W\u1d62\u2c7c onehot(y\u2c7c)|, the distance between a sample's label and the kernel-weighted "
                 "average of all labels.")


def _density_figure(plt: Any, columns: dict[str, np.ndarray]) -> bytes:
    """Histogram of the soft density, split by whether the prediction matches the label when both are known."""
    density = np.asarray(columns["density"], dtype=float)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    edges = np.histogram_bin_edges(density[np.isfinite(density)], bins=40)
    if columns.get("label") is not None and "prediction_matches_label" in columns:
        ok = np.asarray(columns["prediction_matches_label"], dtype=bool)
        ax.hist([density[ok], density[~ok]], bins=edges, stacked=True, color=["tab:blue", "tab:red"],
                label=[f"prediction = label ({ok.sum()})", f"prediction \u2260 label ({(~ok).sum()})"])
        ax.legend(fontsize=8)
    else:
        ax.hist(density, bins=edges, color="tab:blue")
    ax.set_xlabel("soft density N(x) = \u03a3\u2c7c sim(x, x\u2c7c)")
    ax.set_ylabel("samples")
    return _png(plt, fig)


def _denoising_figure(plt: Any, columns: dict[str, np.ndarray], neighbor_index: np.ndarray) -> bytes:
    """Three panels: effective neighbours, consistency against neighbour agreement (or density), mislabel score."""
    density = np.asarray(columns["density"], dtype=float)
    n = len(density)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    eff = np.asarray(columns.get("effective_neighbors", np.full(n, np.nan)), dtype=float)
    axes[0].hist(eff[np.isfinite(eff)], bins=40, color="tab:green")
    axes[0].set_xlabel("effective number of neighbours 1 / (tr D / d)")
    axes[0].set_ylabel("samples")
    axes[0].set_title("Denoising: labels averaged per sample", fontsize=10)
    cons_key = "label_consistency" if "label_consistency" in columns else "prediction_consistency"
    cons = np.asarray(columns.get(cons_key, np.full(n, np.nan)), dtype=float)
    agree = columns.get("neighbor_label_agreement")
    if agree is not None:
        bad = ~np.asarray(columns.get("prediction_matches_label", np.ones(n, bool)), dtype=bool)
        axes[1].scatter(np.asarray(agree)[~bad], cons[~bad], s=6, alpha=0.4, color="tab:blue",
                        label="prediction = label")
        axes[1].scatter(np.asarray(agree)[bad], cons[bad], s=12, marker="x", color="tab:red",
                        label="prediction \u2260 label")
        axes[1].set_xlabel(f"share of the {neighbor_index.shape[1]} nearest neighbours with the same label")
        axes[1].legend(fontsize=8)
    else:
        axes[1].scatter(density, cons, s=6, alpha=0.4)
        axes[1].set_xlabel("density")
    axes[1].set_ylabel(cons_key.replace("_", " "))
    axes[1].set_title("Consistency with the network's neighbours", fontsize=10)
    if "mislabel_score" in columns:
        axes[2].hist(np.asarray(columns["mislabel_score"], dtype=float), bins=40, color="tab:purple")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("mislabel score (higher: more likely mislabelled)")
        axes[2].set_title("Mislabel score", fontsize=10)
    else:
        axes[2].axis("off")
    return _png(plt, fig)


def _density_bins(tiles: _Tiles, finite: np.ndarray) -> str:
    """BINS quantile bins of the density, each with PER_BIN examples evenly spaced through its samples."""
    density = tiles.density
    bin_edges = np.quantile(density[finite], np.linspace(0, 1, BINS + 1)) if len(finite) else np.zeros(BINS + 1)
    rows = []
    for b in range(BINS):
        lo, hi = bin_edges[b], bin_edges[b + 1]
        members = finite[(density[finite] >= lo) & ((density[finite] < hi) if b < BINS - 1 else True)]
        if len(members) == 0:
            continue
        pick = members[np.linspace(0, len(members) - 1, min(PER_BIN, len(members))).round().astype(int)]
        cells = "".join(tiles.tile(int(i), f"N {density[i]:.1f}") for i in pick)
        rows.append(f'<div class="bin"><div class="range">density {lo:.1f} \u2013 {hi:.1f}<br>({len(members)} '
                    f'samples)</div><div class="gallery">{cells}</div></div>')
    return "".join(rows)


def _neighbor_rows(tiles: _Tiles, groups: list[tuple[str, np.ndarray]], neighbor_index: np.ndarray,
                   neighbor_similarity: np.ndarray) -> str:
    """One row per selected sample: the sample, tagged with its group, then its nearest neighbours."""
    rows = []
    for name, idx in groups:
        for i in idx:
            i = int(i)
            cells = "".join(tiles.tile(int(j), f"sim {s:.3f}") for j, s in zip(neighbor_index[i],
                                                                                neighbor_similarity[i]) if j >= 0)
            rows.append(f'<div class="nnrow"><div class="query"><span class="tag">{name}</span>{tiles.tile(i)}</div>'
                        f'<div class="gallery">{cells}</div></div>')
    return "".join(rows)


def _page_data(tiles: _Tiles, columns: dict[str, np.ndarray], neighbor_index: np.ndarray,
               neighbor_similarity: np.ndarray) -> dict[str, Any]:
    """The JSON the page's script reads: every sample when the data set is small (MAX_EMBEDDED), else those
    drawn and their neighbours; their neighbour lists, the table's rows and the class-by-class matrix."""
    n = len(tiles.density)
    embed = set(range(n)) if n <= MAX_EMBEDDED else (
        set(tiles.drawn) | {int(j) for i in tiles.drawn for j in neighbor_index[i] if j >= 0})
    names, ids = tiles.class_names, sorted(embed)
    table = [c for c in TABLE_COLUMNS if c in columns]
    return {
        "n": n, "class_names": list(names) if names is not None else None,
        "samples": {str(i): tiles.info(i) for i in ids},
        "neighbors": {str(i): {"index": [int(j) for j in neighbor_index[i] if j >= 0],
                               "similarity": [float(s) for j, s in zip(neighbor_index[i], neighbor_similarity[i])
                                              if j >= 0]}
                      for i in ids},
        "table": {"columns": table, "rows": [[_num(columns[c][i]) for c in table] for i in ids]},
        "class_matrix": _class_matrix(tiles.label, neighbor_index),
    }


def _num(v: Any) -> float | int | bool | None:
    """A table cell: ints and bools as they are, floats to 4 significant digits, NaN as None (JSON null)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    v = float(v)
    return float(f"{v:.4g}") if np.isfinite(v) else None


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (ties count one half): Mann-Whitney U / (n+ n-)."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _baselines(columns: dict[str, np.ndarray], summary: dict[str, Any], tile: Any) -> tuple[str, str]:
    """The table of nnsim's scores next to the baselines (AUROC against known mislabels when the summary has
    them, overlap of each one's top list with nnsim's), and the gallery of samples the network flags while
    their input-space neighbours agree with their label."""
    if "mislabel_score" not in columns:
        return "<p class=\"note\">No labels were given: no mislabel scores to compare.</p>", ""
    n = len(columns["mislabel_score"])
    truth = columns.get("known_mislabelled")
    top = min(n, int(truth.sum()) if truth is not None and truth.any() else 32)

    def ranked(key: str, sign: int) -> np.ndarray:
        v = sign * np.asarray(columns[key], dtype=float)
        return np.argsort(-np.where(np.isfinite(v), v, -np.inf), kind="stable")

    ours = set(ranked("mislabel_score", 1)[:top].tolist())
    head = ("<tr><th>score</th><th>what it is</th>" + (f"<th>AUROC for the {int(truth.sum())} known mislabels</th>"
                                                         if truth is not None else "")
            + f"<th>top {top}: shared with nnsim's mislabel score</th></tr>")
    body = []
    for key, text, sign in SCORES:
        if key not in columns:
            continue
        cells = f"<td><code>{key}</code></td><td>{html.escape(text)}</td>"
        if truth is not None:
            v = sign * np.asarray(columns[key], dtype=float)
            cells += f"<td class=\"num\">{_auroc(np.nan_to_num(v, nan=-np.inf), truth.astype(bool)):.4f}</td>"
        cells += f"<td class=\"num\">{len(ours & set(ranked(key, sign)[:top].tolist()))} / {top}</td>"
        body.append(f'<tr data-score="{key}">{cells}</tr>')
    table = f'<table id="baseline-table">{head}{"".join(body)}</table>'
    differ = ""
    if "input_knn_disagreement" in columns:
        knn = np.asarray(columns["input_knn_disagreement"], dtype=float)
        picked = [i for i in ranked("mislabel_score", 1)[: max(2 * top, 64)] if knn[i] <= 0.5][:GALLERY]
        differ = "".join(tile(int(i), f"input kNN {knn[i]:.1f}") for i in picked)
    return table, differ


def _class_matrix(label: np.ndarray | None, neighbor_index: np.ndarray) -> dict[str, Any] | None:
    """[C, C] share of the network's k nearest neighbours of the samples labelled a (row) that are labelled b."""
    if label is None:
        return None
    lab = np.asarray(label, dtype=int)
    c = int(lab.max()) + 1
    counts = np.zeros((c, c))
    valid = neighbor_index >= 0
    rows = np.repeat(lab, neighbor_index.shape[1]).reshape(neighbor_index.shape)[valid]
    np.add.at(counts, (rows, lab[neighbor_index[valid]]), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return {"share": [[round(float(v), 4) for v in row] for row in share], "samples": np.bincount(lab, minlength=c)
            .tolist()}


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)


def _class_options(classes: np.ndarray | None, class_names: Sequence[str] | None) -> str:
    if classes is None:
        return ""
    present = sorted({int(c) for c in np.asarray(classes)})
    return "".join(f'<option value="{c}">{html.escape(_class_name(c, class_names))}</option>' for c in present)


def _label_text(info: dict[str, Any], class_names: Sequence[str] | None) -> tuple[str, bool]:
    name = functools.partial(_class_name, class_names=class_names)
    lab, pred = info["label"], info["pred"]
    if lab is None:
        return ("" if pred is None else f"pred {name(pred)}"), False
    if pred is None or pred == lab:
        return name(lab), False
    return f"{name(lab)} \u2192 {name(pred)}", True


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}".replace("_", " ")
        if isinstance(v, dict):
            out += _flatten(v, key + ": ")
        else:
            out.append((key, v))
    return out


def _summary_table(summary: dict[str, Any]) -> str:
    cells = "".join(f'<div class="kv"><span>{html.escape(k)}</span> '
                    f'<b>{html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))}</b></div>'
                    for k, v in _flatten(summary))
    return f'<div class="summary">{cells}</div>'


def _denoising_note(summary: dict[str, Any]) -> str:
    mode = summary.get("denoising", "")
    note = ("Left: effective number of neighbours 1 / (tr D / d), the number of labels the trained network "
            "averages at each sample (D = \u03a3\u2c7c W\u1d62\u2c7c W\u1d62\u2c7c\u1d40 with "
            "W\u1d62\u2c7c = (\u03a3\u2097 K\u1d62\u2097)\u207b\u00b9 K\u1d62\u2c7c). Middle: how far each "
            f"sample's label is from its neighbours'. Denoising: {mode}.")
    noise = summary.get("label_noise")
    if noise:
        pe = noise.get("predicted_error", {})
        note += (f" Label noise, estimated without true labels (linearized smoother of the network's kernel): "
                 f"\u03c3\u0302 = {noise['sigma_hat']:.4g}; predicted noise-induced error median "
                 f"{pe.get('median', float('nan')):.4g} (max {pe.get('max', float('nan')):.4g}); "
                 f"{noise['untrusted_samples']} sample(s) flagged untrusted (the smoother misses the network's "
                 "prediction there by more than 2\u03c3\u0302; column predicted_error_untrusted). How well this "
                 "was validated: on 1-D/2-D tanh-MLP regressions, against a clean-label twin and 6 noise draws, "
                 "the predicted RMS error was 0.83-1.00 of the actual one and \u03c3\u0302 within 6 % of \u03c3 "
                 "in 1-D, but only 0.65-0.69 of it in 2-D (\u03c3\u0302 4-18 % low); "
                 "one network's per-sample ranking is weak to moderate (Spearman 0.2-0.6 against a 47-draw "
                 "actual error; 0.4-0.8 for a prediction averaged over 24 networks against 24 others); see "
                 "docs/experiments/denoising.md in the "
                 "nnsim repository. Not validated on classifiers or other architectures.")
    return note
