"""Argument parsing and the commands of ``nnsim`` (thin: the work is in the public nnsim API)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import json
import os
import pkgutil
import re
import runpy
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as nd
from .. import outputs
from .._files import atomic_path, write_atomic
from ..errors import InputError, ModelError, ResultTooLargeError
from ..index import FeatureIndex
from ..similarity import Similarity
from .analysis import nonzero_gradients
from .loading import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    Data,
    _is_factory_spec,
    check_model_accepts,
    load_data,
    load_model,
)

_QUIET = False
#: The process group under ``torchrun`` (two processes or more), None in a plain run. Set by :func:`main`.
_COMM: nd.Comm | None = None


def _launched_rank() -> int:
    """torchrun's RANK, known before the process group is joined (0 in a plain run)."""
    if "WORLD_SIZE" not in os.environ:
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _main_process() -> bool:
    """Rank 0 under torchrun (also before and after the process group exists); True in a plain run."""
    return nd.is_main_process() and _launched_rank() == 0


def say(message: str) -> None:
    """Every line the command prints goes through here: on rank 0 only under torchrun."""
    if not _QUIET and _main_process():
        print(message, flush=True)


def error(message: str, every_rank: bool = False) -> None:
    """One error line on stderr: on rank 0 only under torchrun (the ranks agree on it first, see :func:`_run`),
    unless ``every_rank`` (a failure the ranks could not agree on), then prefixed with the rank."""
    if _main_process() or every_rank:
        where = f"rank {_launched_rank()}: " if every_rank and not _main_process() else ""
        print(f"nnsim: error: {where}{' '.join(message.split())}", file=sys.stderr, flush=True)


def write_text(path: Path, text: str) -> None:
    """Every file the command writes (besides the library's own writers) goes through here: rank 0 only,
    atomically (a temporary file renamed onto ``path``, so an interrupted run never leaves half a file)."""
    if not _main_process():
        return
    write_atomic(path, text)


def _together() -> nd.together:
    """Around each rank's local work before the next collective step (loading files, checking the model,
    writing the outputs): when it fails on one rank, every rank raises on leaving the block, instead of the
    others waiting forever for that rank in the next collective. A no-op in a plain run.

    Under torchrun every step of a command is either a collective nnsim call (density, neighbors, denoising,
    FeatureIndex.build, which fail on every rank together by themselves) or local work inside this block, so
    that all ranks always reach :func:`_run`'s exit-status exchange together.
    """
    return nd.together(_COMM)


# ---------------------------------------------------------------------------------------------------- options
def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and similarity (mirroring nnsim.Similarity)")
    g.add_argument("--model", required=True, metavar="M",
                   help="a torch.export program file (.pt2), or package.module:factory (with --weights)")
    g.add_argument("--weights", metavar="FILE", help="state-dict file (torch.save) for a model factory")
    g.add_argument("--random-init", action="store_true",
                   help="analyse a model factory's model at its random initialisation, on purpose (no --weights)")
    g.add_argument("--output", default="flatten", metavar="SPEC",
                   help="what is analysed: flatten (default: the model output), logits[:CLASS|:predicted], "
                        "posnegflat[:CLASS] (the authors' scalar log-softmax score; default class: predicted), "
                        "center_pixel, spatial_sum, spatial_mean")
    g.add_argument("--params", action="append", metavar="PATTERN",
                   help="parameter names or glob patterns to analyse (repeatable; default: all)")
    g.add_argument("--metric", default="euclidean", choices=["euclidean", "fisher"], help="output-space metric")
    g.add_argument("--backend", default="auto", choices=["auto", "structured", "functorch", "loop"])
    g.add_argument("--chunk-size", type=int, metavar="N", help="samples per chunk (default: automatic)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def _add_data_options(p: argparse.ArgumentParser, labels: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="D",
                   help=".npz (arrays x and optional y), .npy, an IDX file, or package.module:factory returning "
                        "a Dataset")
    if labels:
        g.add_argument("--labels", metavar="L", help="labels for .npy or IDX data (.npy or IDX label file)")
    g.add_argument("--limit", type=int, metavar="N", help="use only the first N samples")
    g.add_argument("--x-key", metavar="KEY", help="inputs array in the .npz (default: x, inputs, data, images or X)")
    g.add_argument("--y-key", metavar="KEY", help="labels array in the .npz (default: y, labels, targets or Y)")


def _add_common(p: argparse.ArgumentParser, threads: int | None = None) -> None:
    p.add_argument("--threads", type=int, default=threads, metavar="N",
                   help=f"torch CPU threads (default: {threads or 'torch default'})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars and no messages")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _parse_output(spec: str) -> Any:
    name, _, arg = spec.partition(":")
    target: int | str | None = None
    if arg:
        target = "predicted" if arg == "predicted" else (int(arg) if arg.isdigit() else None)
        if target is None:
            raise CLIError(f"--output {spec}: the class must be an integer or 'predicted'", EXIT_USAGE)
    if name == "flatten" and not arg:
        return None
    if name == "logits":
        return outputs.logits(target)
    if name == "posnegflat":
        return outputs.log_softmax_mask("predicted" if target is None else target)
    if name in ("center_pixel", "spatial_sum", "spatial_mean") and not arg:
        return getattr(outputs, name)
    raise CLIError(f"unknown --output {spec!r}; use flatten, logits[:CLASS|:predicted], posnegflat[:CLASS], "
                   "center_pixel, spatial_sum or spatial_mean", EXIT_USAGE)


def _model_and_sim(args: argparse.Namespace, data: Data) -> tuple[nn.Module, Similarity]:
    say(f"loading model {args.model}")
    model = load_model(args.model, args.weights, args.device, random_init=args.random_init)
    probe = check_model_accepts(model, data.x, args.device)
    args.model_outputs = int(probe[0].numel())  # values per sample of the model's output (classes of a classifier)
    output = _parse_output(args.output)
    _, _, target = args.output.partition(":")
    if target.isdigit() and int(target) >= args.model_outputs:
        raise CLIError(f"--output {args.output}: the model has {args.model_outputs} outputs per sample (classes 0.."
                       f"{args.model_outputs - 1})", EXIT_USAGE)
    sim = Similarity(model, output=output, params=args.params, metric=args.metric,
                     backend=args.backend, chunk_size=args.chunk_size, progress=not _QUIET and _main_process())
    return model, sim


def _check_labels(args: argparse.Namespace, data: Data) -> None:
    """Labels must be class indices of the model's output: refused, not silently analysed otherwise."""
    c = args.model_outputs
    if data.y is not None and c > 1 and int(data.y.max()) >= c:
        top = int(data.y.max())
        bad = torch.nonzero(data.y >= c).flatten().tolist()
        raise CLIError(f"{args.data}: labels go up to {top} but the model has {c} outputs (classes 0..{c - 1}); "
                       f"{len(bad)} samples (e.g. {bad[:5]}) have a label outside them. Pass the model's class "
                       "indices as labels (check --labels / --y-key, and that an IDX label file is the one of these "
                       "images)")


def _check_args(args: argparse.Namespace) -> None:
    """The options on their own, before any file is read: one line and exit 2 for each nonsense value, and the
    output path checked for writing (before the work, not after it)."""
    positive = {"k": "-k", "dim": "--dim", "chunk_size": "--chunk-size"}
    for key, flag in positive.items():
        v = getattr(args, key, None)
        if v is not None and v < 1:
            raise CLIError(f"{flag} must be a positive integer, got {v}", EXIT_USAGE)
    numbers = (("threshold", "--threshold", "a finite number", lambda v: True),
               ("power", "--power", "a positive number", lambda v: v > 0),
               ("noise_std", "--noise-std", "a number >= 0", lambda v: v >= 0))
    for key, flag, need, ok in numbers:
        v = getattr(args, key, None)
        if v is not None and not (np.isfinite(v) and ok(v)):
            raise CLIError(f"{flag} must be {need}, got {v}", EXIT_USAGE)
    if getattr(args, "metric", None) == "fisher" and args.command in ("analyze", "denoise"):
        raise CLIError(f"nnsim {args.command} computes the denoising statistics, which are derived for a squared "
                       "loss on the outputs: use --metric euclidean (density, neighbors and index take --metric "
                       "fisher)", EXIT_USAGE)
    if getattr(args, "model", None) is not None:
        factory = _is_factory_spec(args.model)
        if args.random_init and (args.weights is not None or not factory):
            raise CLIError("--random-init goes with a model factory 'package.module:factory' and no --weights",
                           EXIT_USAGE)
    out = getattr(args, "out", None)
    if out is not None and args.command in ("analyze", "demo"):
        check_writable(Path(out), folder=True)
    elif out is not None:
        check_writable(Path(out), folder=False)


def check_writable(path: Path, folder: bool) -> None:
    """``--out`` can be written: a folder (``analyze``, ``demo``) or a file, its nearest existing parent a
    writable folder (tried by creating a temporary file in it). Raises :class:`CLIError` (exit 2)."""
    if folder and path.exists() and not path.is_dir():
        raise CLIError(f"--out {path} is a file; this command writes a folder of results: name a new or existing "
                       "folder", EXIT_USAGE)
    if not folder and path.is_dir():
        raise CLIError(f"--out {path} is a folder; name the file to write, e.g. {path / 'out.csv'}", EXIT_USAGE)
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"--out {path}: {parent} is a file, not a folder", EXIT_USAGE)
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise CLIError(f"--out {path}: cannot write in {parent} ({e.strerror or type(e).__name__}); choose a "
                       "writable place", EXIT_USAGE) from e


def _data(args: argparse.Namespace) -> Data:
    data = load_data(args.data, getattr(args, "labels", None), args.limit, args.x_key, args.y_key)
    say(f"loaded {len(data)} samples of shape {list(data.x.shape[1:])} from {args.data}"
        + ("" if data.y is None else f" with labels ({int(data.y.max()) + 1} classes)"))
    return data


def _queries(spec: str, data: Data, args: argparse.Namespace) -> tuple[torch.Tensor, np.ndarray | None]:
    """Query samples: a data file / factory, or indices into --data ("0,5,9" or "0:10")."""
    text = spec.replace(" ", "")
    if text and all(part.replace(":", "").isdigit() for part in text.split(",")):
        idx: list[int] = []
        for part in text.split(","):
            if ":" in part:
                a, _, b = part.partition(":")
                idx += list(range(int(a), int(b)))
            else:
                idx.append(int(part))
        bad = [i for i in idx if i >= len(data)]
        if bad or not idx:
            raise CLIError(f"--query indices {bad[:5] or spec} are outside the data (0..{len(data) - 1})")
        return data.x[idx], np.asarray(idx)
    q = load_data(spec, None, None, args.x_key, None)
    if q.x.shape[1:] != data.x.shape[1:]:
        raise CLIError(f"query samples have shape {list(q.x.shape[1:])} but data samples {list(data.x.shape[1:])}")
    return q.x, None


def _csv(path: Path, header: Sequence[str], rows: Any) -> None:
    if not _main_process():
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _cell(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return int(v) if isinstance(v, np.integer) else v


# ---------------------------------------------------------------------------------------------------- commands
def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import run_analysis

    with _together():
        data = _data(args)
        if len(data) < 2:
            raise CLIError(f"{args.data}: analyze needs at least 2 samples (neighbours of each sample among the "
                           f"others), the data has {len(data)}")
        if args.k > len(data) - 1:
            raise CLIError(f"-k {args.k} is more than the {len(data) - 1} other samples of the {len(data)}; use -k "
                           f"{len(data) - 1} or fewer", EXIT_USAGE)
        model, sim = _model_and_sim(args, data)
        _check_labels(args, data)
        _check_class_names(args, data)
    t0 = time.perf_counter()
    with _together():
        noisy = _noisy_targets(args, len(data))
    result = run_analysis(sim, model, data.x, data.y, k=args.k, exact_denoising=args.exact_denoising,
                          dim=args.dim, device=args.device, log=say, noisy_targets=noisy)
    with _together():
        result.summary["data"] = str(args.data)
        result.summary["model"] = str(args.model)
        _write_outputs(Path(args.out), data, result, args,
                       title=args.title or f"nnsim report: {Path(args.data).name}",
                       subtitle=f"model {args.model}, data {args.data} ({len(data)} samples)")
    say(f"analysis done in {time.perf_counter() - t0:.1f} s; wrote {args.out}/report.html, samples.csv, "
        "summary.json, figures/")
    return EXIT_OK


def _check_class_names(args: argparse.Namespace, data: Data) -> None:
    if not getattr(args, "class_names", None):
        return
    names = args.class_names.split(",")
    classes = args.model_outputs if args.model_outputs > 1 else (None if data.y is None else int(data.y.max()) + 1)
    if classes is not None and len(names) != classes:
        raise CLIError(f"--class-names has {len(names)} names but there are {classes} classes; give one name per "
                       "class, in class order, separated by commas", EXIT_USAGE)


def _write_outputs(out: Path, data: Data, result: Any, args: argparse.Namespace, title: str, subtitle: str) -> None:
    """The files of ``analyze`` / ``demo`` (on rank 0 only under torchrun; call it inside :func:`_together`)."""
    from ..report import write_report

    if not _main_process():
        return
    out.mkdir(parents=True, exist_ok=True)
    # summary.json is the completion marker: removed first, written last with "complete": true, so a folder
    # with an old summary.json next to half-rewritten files cannot pass for a finished analysis.
    (out / "summary.json").unlink(missing_ok=True)
    cols = result.columns
    names = list(cols)
    k = result.neighbor_index.shape[1]
    _csv(out / "samples.csv", names + [f"neighbor_{r + 1}" for r in range(k)],
         ([_cell(cols[c][i]) for c in names] + [int(j) for j in result.neighbor_index[i]]
          for i in range(len(data))))
    _csv(out / "neighbors.csv", ["index", "rank", "neighbor", "similarity"],
         ([i, r + 1, int(result.neighbor_index[i, r]), repr(float(result.neighbor_similarity[i, r]))]
          for i in range(len(data)) for r in range(k)))
    summary = {**result.summary, "timings_s": result.timings}
    class_names = args.class_names.split(",") if getattr(args, "class_names", None) else None
    say("writing the report")
    write_report(out / "report.html", x=data.x.numpy(), columns=cols, neighbor_index=result.neighbor_index,
                 neighbor_similarity=result.neighbor_similarity, summary=summary, title=title, subtitle=subtitle,
                 class_names=class_names, figures_dir=out / "figures")
    write_text(out / "summary.json", json.dumps({**summary, "complete": True}, indent=2) + "\n")


def cmd_density(args: argparse.Namespace) -> int:
    with _together():
        data = _data(args)
        _, sim = _model_and_sim(args, data)
        ref = None if args.reference is None else load_data(args.reference, None, None, args.x_key, None).x
    dens = nonzero_gradients(lambda: sim.density(data.x, ref, method=args.method, normalized=not args.unnormalized,
                                                 threshold=args.threshold, power=args.power,
                                                 include_self=not args.exclude_self))
    with _together():
        _csv(Path(args.out), ["index", "density"], ([i, repr(float(v))] for i, v in enumerate(dens)))
    say(f"density: min {dens.min():.3f}, median {dens.median():.3f}, max {dens.max():.3f}; wrote {args.out}")
    return EXIT_OK


def cmd_neighbors(args: argparse.Namespace) -> int:
    with _together():
        data = _data(args)
        _, sim = _model_and_sim(args, data)
        q, qidx = _queries(args.query, data, args)
        k = args.k + (1 if args.exclude_self and qidx is not None else 0)
        if k > len(data):
            raise CLIError(f"-k {args.k} is more than the {len(data)} samples")
    found: dict[str, torch.Tensor] = {}

    def search() -> torch.Tensor:
        found["vals"], found["idx"] = sim.neighbors(q, data.x, k=k)
        return found["vals"].flatten()  # all NaN: every gradient (queries or data) is zero

    nonzero_gradients(search)
    vals, idx = found["vals"], found["idx"]
    with _together():
        rows = []
        for r in range(len(q)):
            pairs = [(int(j), float(s)) for j, s in zip(idx[r], vals[r])]
            if args.exclude_self and qidx is not None:
                pairs = [p for p in pairs if p[0] != int(qidx[r])][: args.k]
            name = int(qidx[r]) if qidx is not None else r
            rows += [[name, rank + 1, j, repr(s)] for rank, (j, s) in enumerate(pairs)]
            say(f"query {name}: " + ", ".join(f"{j} ({s:.3f})" for j, s in pairs))
        _csv(Path(args.out), ["query", "rank", "neighbor", "similarity"], rows)
    say(f"wrote {args.out}")
    return EXIT_OK


VALIDATION_NOTE = ("validated on 1-D/2-D tanh-MLP regressions against a clean-label twin and 6 noise draws: "
                   "predicted/actual RMS error 0.83-1.00 in 1-D, 0.65-0.69 in 2-D; see docs/experiments/denoising.md")


def _noisy_targets(args: argparse.Namespace, n: int) -> torch.Tensor | None:
    """``--noisy-targets FILE``: the float regression targets [N] or [N, d] the network was trained on."""
    spec = getattr(args, "noisy_targets", None)
    if spec is None:
        return None
    path = Path(spec)
    if not path.is_file():
        raise CLIError(f"--noisy-targets {spec}: no such file", EXIT_USAGE)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                key = next((k for k in ("targets", "y", "labels", "target", "Y") if k in f), None)
                if key is None:
                    raise CLIError(f"--noisy-targets {spec}: no targets/y array; the file holds {list(f.keys())}")
                arr = f[key]
        else:
            arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CLIError(f"--noisy-targets {spec}: not a readable .npy/.npz file ({type(e).__name__})") from e
    if args.limit is not None:
        arr = arr[: args.limit]
    if not np.issubdtype(arr.dtype, np.number) or arr.ndim not in (1, 2) or len(arr) != n:
        raise CLIError(f"--noisy-targets {spec}: expected a numeric [N] or [N, d] array with N = {n} rows, got "
                       f"dtype {arr.dtype} and shape {list(arr.shape)}", EXIT_USAGE)
    if not np.all(np.isfinite(arr)):
        raise CLIError(f"--noisy-targets {spec}: the targets contain NaN or Inf", EXIT_USAGE)
    return torch.from_numpy(np.asarray(arr, dtype=np.float64).reshape(n, -1))


def cmd_denoise(args: argparse.Namespace) -> int:
    with _together():
        data = _data(args)
        _, sim = _model_and_sim(args, data)
        noisy = _noisy_targets(args, len(data))
        method = args.method or ("linearized" if noisy is not None else "paper")
        if method == "linearized" and noisy is None:
            raise CLIError("--method linearized needs --noisy-targets FILE (the regression targets the network was "
                           "trained on)", EXIT_USAGE)
    if method == "linearized":
        assert noisy is not None
        report = sim.denoising(data.x, targets=noisy.to(data.x.dtype), method="linearized", noise_std=args.noise_std,
                               approximate=args.approximate, landmarks=args.landmarks)
        with _together():
            if _main_process():
                with atomic_path(Path(args.out)) as tmp:
                    report.to_csv(tmp)
        assert report.predicted_error is not None
        pe, flag = report.predicted_error, report.ill_conditioned
        source = "given" if args.noise_std is not None else "estimated from the training residuals"
        say(f"label noise sigma: {report.noise_std:.4g} ({source}; estimate {report.noise_std_estimated:.4g}); "
            f"predicted noise-induced error: median {pe.median():.4g}, RMS {pe.square().mean().sqrt():.4g} "
            f"(= {float(pe.square().mean().sqrt()) / report.noise_std:.2f} sigma); {int(flag.sum())} of {len(pe)} "
            f"samples flagged untrusted; smoother fit error {report.fit_error:.3f}; method linearized, "
            f"{VALIDATION_NOTE}; wrote {args.out}")
        return EXIT_OK
    with _together():
        targets = None
        if args.targets == "labels":
            if data.y is None:
                raise CLIError("--targets labels needs labels (an .npz with y, or --labels)", EXIT_USAGE)
            _check_labels(args, data)
            targets = torch.nn.functional.one_hot(data.y).float()
    # The library's per-sample warnings are held until it is known that not every gradient is zero.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = sim.denoising(data.x, predictions=targets, noise_std=args.noise_std,
                                   approximate=args.approximate, dim=args.dim)
        except InputError as e:
            if targets is not None and "columns" in str(e):
                raise CLIError(f"--targets labels: {e} (one-hot labels need an output with one value per "
                               "class)") from e
            raise
    if bool(report.ill_conditioned.all()) and not bool(report.factor.abs().gt(0).any()):
        # R_i = sum_j K_ij is zero for every sample: all gradients are zero (the factors would be written as inf)
        nonzero_gradients(lambda: torch.full((len(report.factor),), float("nan")))
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    with _together():
        if _main_process():
            with atomic_path(Path(args.out)) as tmp:
                report.to_csv(tmp)
    eff = report.effective_neighbors
    flagged = int(report.ill_conditioned.sum())
    extra = ""
    if report.predicted_error is not None:
        extra = (f"; predicted error sigma sqrt(tr D / d): median {report.predicted_error.median():.4g} "
                 "(paper factor, sigma given; not validated: in docs/experiments/denoising.md it was 1.7-8x too "
                 "optimistic; pass --noisy-targets for the validated estimate)")
    say(f"effective neighbours: median {eff.median():.2f} (min {eff.min():.2f}, max {eff.max():.2f}); {flagged} of "
        f"{len(eff)} samples flagged untrusted{extra}; wrote {args.out}")
    return EXIT_OK


def cmd_index_build(args: argparse.Namespace) -> int:
    with _together():
        data = _data(args)
        _, sim = _model_and_sim(args, data)
    index = FeatureIndex.build(sim, data.x, args.index, dim=args.dim, seed=args.seed, overwrite=args.overwrite)
    say(f"built {index!r}")
    return EXIT_OK


def cmd_index_query(args: argparse.Namespace) -> int:
    # FeatureIndex.search is local (no collective call): under torchrun every rank runs the query in full (a
    # rank-0-only search would leave the others waiting in a collective, past NCCL's timeout on long searches).
    with _together():
        data = _data(args)
        _, sim = _model_and_sim(args, data)
        index = FeatureIndex.open(args.index, sim)
        if len(index) != len(data):
            raise CLIError(f"{args.index} indexes {len(index)} samples but --data has {len(data)}; pass the data the "
                           "index was built from (same --limit)")
        index.check_data(data.x)  # the data digests, also with --no-rerank
        q, qidx = _queries(args.query, data, args)
        vals, idx = index.search(q, k=args.k, data=None if args.no_rerank else data.x)
        rows = []
        for r in range(len(q)):
            name = int(qidx[r]) if qidx is not None else r
            rows += [[name, rank + 1, int(j), repr(float(s))] for rank, (j, s) in enumerate(zip(idx[r], vals[r]))]
            say(f"query {name}: " + ", ".join(f"{int(j)} ({float(s):.3f})" for j, s in zip(idx[r], vals[r])))
        _csv(Path(args.out), ["query", "rank", "neighbor", "similarity"], rows)
    say(f"wrote {args.out}")
    return EXIT_OK


def available_experiments() -> list[str]:
    """Names of the ``nnsim.experiments`` modules installed (empty when the package does not exist yet)."""
    try:
        pkg = importlib.import_module("nnsim.experiments")
    except ImportError:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(getattr(pkg, "__path__", [])) if not m.name.startswith("_"))


def cmd_reproduce(args: argparse.Namespace) -> int:
    if _COMM is not None:
        # An experiment is a script of its own (its own files and prints); it is not run once per rank here.
        raise CLIError("nnsim reproduce runs in one process; launch it without torchrun (or run the experiment's "
                       "module under torchrun if it supports several processes)", EXIT_USAGE)
    names = available_experiments()
    if args.name not in names:
        listing = ", ".join(names) if names else "none installed in this version"
        raise CLIError(f"unknown experiment {args.name!r}; available: {listing}", EXIT_USAGE)
    argv = sys.argv
    sys.argv = [f"nnsim reproduce {args.name}", *args.rest]
    try:
        runpy.run_module(f"nnsim.experiments.{args.name}", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_INTERNAL)
    finally:
        sys.argv = argv
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), log=say, progress=not _QUIET, write_outputs=_write_outputs, args=args)
    say(f"open {Path(args.out) / 'report.html'} in a browser; rerun any command on {args.out}/model.pt2 and "
        f"{args.out}/data.npz, e.g. nnsim analyze --model {args.out}/model.pt2 --data {args.out}/data.npz --out "
        "my-report")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nnsim", description="Input similarity from the neural network's perspective (Charpiat et al., 2019): "
        "which samples does your trained model treat alike? See docs/cli.md.")
    from .. import __version__

    ap.add_argument("--version", action="version", version=f"nnsim {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="train a small CNN on digits with 10%% flipped labels and write its report")
    p.add_argument("--out", default="nnsim-demo", metavar="DIR", help="output folder (default: nnsim-demo)")
    # One thread: the same numbers on every machine (summation order), and no OpenMP threads waiting on each
    # other on a busy machine (training took 9 s with one thread, 330 s with two on our loaded 2-core machine).
    _add_common(p, threads=1)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("analyze", help="the full analysis: samples.csv, summary.json, figures, report.html")
    _add_model_options(p)
    _add_data_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("-k", type=int, default=10, help="neighbours per sample (default 10)")
    p.add_argument("--exact-denoising", action="store_true",
                   help="exact denoising factors by O(N^2) tiles (default: linear-time approximation; the label "
                        "consistency is exact either way)")
    p.add_argument("--dim", type=int, default=256, help="projection size of the approximate denoising (default 256)")
    p.add_argument("--noisy-targets", metavar="FILE", help="the float regression targets [N] or [N, d] the network was "
                   "trained on (.npy, or .npz with targets/y): adds the label-free sigma estimate and predicted "
                   "error (Similarity.denoising method linearized)")
    p.add_argument("--class-names", metavar="A,B,...", help="comma-separated class names for the report")
    p.add_argument("--title", help="report title")
    _add_common(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("density", help="neighbour count of every sample (Similarity.density)")
    _add_model_options(p)
    _add_data_options(p)
    p.add_argument("--reference", metavar="R", help="count neighbours among these samples instead")
    p.add_argument("--method", default="soft", choices=["soft", "hard", "less_soft"])
    p.add_argument("--threshold", type=float, help="similarity threshold of method hard")
    p.add_argument("--power", type=float, help="exponent of method less_soft")
    p.add_argument("--unnormalized", action="store_true", help="sum the unnormalised kernel trace instead")
    p.add_argument("--exclude-self", action="store_true", help="do not count each sample as its own neighbour")
    p.add_argument("--out", default="density.csv", metavar="FILE", help="CSV output (default density.csv)")
    _add_common(p)
    p.set_defaults(func=cmd_density)

    p = sub.add_parser("neighbors", help="the k most similar samples of --data for each query")
    _add_model_options(p)
    _add_data_options(p)
    p.add_argument("--query", required=True, metavar="Q",
                   help="indices into --data (0,5,9 or 0:10) or a file of query samples")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--exclude-self", action="store_true", help="with index queries: skip the query itself")
    p.add_argument("--out", default="neighbors.csv", metavar="FILE", help="CSV output (default neighbors.csv)")
    _add_common(p)
    p.set_defaults(func=cmd_neighbors)

    p = sub.add_parser("denoise", help="self-denoising statistics (Similarity.denoising)")
    _add_model_options(p)
    _add_data_options(p)
    p.add_argument("--targets", default="predictions", choices=["predictions", "labels"],
                   help="what the consistency compares: the model's outputs or one-hot labels")
    p.add_argument("--noise-std", type=float, help="label-noise level sigma: adds predicted_error (with "
                   "--noisy-targets: used instead of the estimate)")
    p.add_argument("--noisy-targets", metavar="FILE", help="the float regression targets [N] or [N, d] (.npy, or "
                   ".npz with targets/y) the network was trained on: estimates sigma and the predicted error "
                   "label-free (method linearized)")
    p.add_argument("--method", choices=["paper", "linearized"],
                   help="denoising factor: the paper's (default without --noisy-targets) or the linearized smoother "
                        "(default with --noisy-targets)")
    p.add_argument("--landmarks", type=int, default=1024,
                   help="Nystroem landmark samples of --method linearized --approximate (default 1024)")
    p.add_argument("--approximate", action="store_true", help="linear-time projected approximation (linearized: "
                   "Nystroem; needed above N d = 6000)")
    p.add_argument("--dim", type=int, default=1024, help="projection size with --approximate (default 1024)")
    p.add_argument("--out", default="denoising.csv", metavar="FILE", help="CSV output (default denoising.csv)")
    _add_common(p)
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser("index", help="an on-disk feature index for fast neighbour search (FeatureIndex)")
    isub = p.add_subparsers(dest="index_command", metavar="build|query", required=True)
    b = isub.add_parser("build", help="project the data's similarity features into an index folder")
    _add_model_options(b)
    _add_data_options(b, labels=False)
    b.add_argument("--index", required=True, metavar="DIR", help="index folder")
    b.add_argument("--dim", type=int, help="numbers per stored row: the sketch width (default 1024)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true", help="replace an index of another configuration")
    _add_common(b)
    b.set_defaults(func=cmd_index_build)
    q = isub.add_parser("query", help="search an index (re-ranked exactly with --data)")
    _add_model_options(q)
    _add_data_options(q, labels=False)
    q.add_argument("--index", required=True, metavar="DIR", help="index folder")
    q.add_argument("--query", required=True, metavar="Q", help="indices into --data or a file of query samples")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--no-rerank", action="store_true", help="return the projected estimates without re-ranking")
    q.add_argument("--out", default="neighbors.csv", metavar="FILE")
    _add_common(q)
    q.set_defaults(func=cmd_index_query)

    p = sub.add_parser("reproduce", help="run one of the paper's experiments (nnsim.experiments.NAME)")
    p.add_argument("name", metavar="NAME", help="experiment name")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the experiment")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_reproduce)
    return ap


def _showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    # nnsim's warnings name the same samples on every rank: one copy, from rank 0.
    if _main_process():
        print(f"nnsim: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring).

    Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` in the environment) it first joins the default process group
    (:func:`nnsim.distributed.setup_from_env`: gloo on CPU, NCCL on GPUs) and leaves it at the end; every rank
    runs the command, only rank 0 prints and writes, and every rank returns the same exit code.
    """
    global _QUIET, _COMM
    parser = build_parser()
    if _main_process():
        args = parser.parse_args(argv)
    else:  # usage errors and --help are printed by rank 0 only; every rank exits with argparse's code
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
    _QUIET = bool(getattr(args, "quiet", False))
    debug = bool(getattr(args, "debug", False))
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            error(f"--threads must be a positive integer, got {args.threads}")
            return EXIT_USAGE
        torch.set_num_threads(args.threads)
    joined = nd.dist is not None and nd.dist.is_available() and not nd.dist.is_initialized()
    try:
        _COMM = nd.setup_from_env()
    except Exception as e:  # rendezvous or backend failure, before any nnsim work
        error(f"cannot join the torch.distributed process group of this torchrun job: {type(e).__name__}: {e}",
              every_rank=True)
        return EXIT_INTERNAL
    joined = joined and nd.dist.is_initialized()
    shown = warnings.showwarning
    if not debug:
        warnings.showwarning = _showwarning  # one line per warning, like the errors
    try:
        return _run(args, debug)
    finally:
        warnings.showwarning = shown
        _COMM = None
        if joined:  # only a group this call created; a script that set one up keeps it
            with contextlib.suppress(Exception):
                nd.dist.destroy_process_group()


def _exit_code(e: Exception) -> tuple[int, str]:
    """The exit code of an exception, and its one-line message."""
    if isinstance(e, CLIError):
        return e.code, str(e)
    if isinstance(e, (InputError, ResultTooLargeError, FileNotFoundError)):
        return EXIT_INPUT, str(e)
    if isinstance(e, ModelError):
        return EXIT_MODEL, str(e)
    # Anything else is a bug or an input nobody foresaw: still one line, the details with --debug.
    return EXIT_INTERNAL, f"{type(e).__name__}: {e}"


def _in_cli_terms(message: str) -> str:
    """The index's Python-API advice ("overwrite=True", "nnsim.FeatureIndex.build(...)") in command-line terms."""
    message = re.sub(r"(nnsim\.)?FeatureIndex\.build\([^)]*\)",
                     "nnsim index build (with the same --model, --data, --index, --dim and --seed)", message)
    message = re.sub(r"(nnsim\.)?FeatureIndex\.open\([^)]*\)", "nnsim index query", message)
    message = re.sub(r"\boverwrite=True\b", "--overwrite", message)
    for python, cli in _API_TO_CLI:
        message = message.replace(python, cli)
    return message


#: Library advice (Python arguments) -> the command line's flags, for errors shown by the CLI.
_API_TO_CLI = [("use metric='euclidean'", "use --metric euclidean"), ("pass params=...", "pass --params PATTERN"),
               ("use normalized=True", "drop --unnormalized"), ("include_self=False needs reference=None",
                                                                 "--exclude-self needs no --reference"),
               ("check --params / params=", "check --params")]


#: nnsim.distributed.together's message on the ranks that did not fail themselves.
_OTHER_RANK_FAILED = re.compile(r"rank \d+ failed: ")


def _run(args: argparse.Namespace, debug: bool) -> int:
    own = True
    try:
        if args.command != "reproduce":
            with _together():  # under torchrun: a failure on one rank fails every rank, before any collective
                _check_args(args)
        code, message = int(args.func(args)), ""
    except KeyboardInterrupt:
        # Not negotiated: the launcher stops every rank (torchrun forwards the signal).
        error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            if _COMM is not None:
                print(f"nnsim: rank {_COMM.rank}:", file=sys.stderr, flush=True)
            traceback.print_exc()
        code, message = _exit_code(e)
        message = _in_cli_terms(message)
        if not debug and code == EXIT_INTERNAL:
            message += " (rerun with --debug for the traceback)"
        # A rank that only learnt that another rank failed defers to that rank's own error and exit code.
        own = not (isinstance(e, nd.DistributedError) and _OTHER_RANK_FAILED.match(str(e)))
    if _COMM is None:
        if code != EXIT_OK:
            error(message)
        return code
    return _agree_on_exit(code, message, own)


def _agree_on_exit(code: int, message: str, own: bool) -> int:
    """Under torchrun: every rank gets here together (each step of a command either fails on every rank or on
    none), exchanges its outcome, and returns the same exit code: that of the first rank that failed on its own.
    Rank 0 prints the error once (with the failing ranks when they are not all of them, or differ)."""
    assert _COMM is not None
    try:
        outcomes = nd.all_gather_object(_COMM, (code, message, own))
    except Exception as e:  # the group broke (a rank died): report what this rank knows
        if code != EXIT_OK:
            error(message, every_rank=True)
        error(f"could not exchange the exit status with the other ranks: {type(e).__name__}: {e}", every_rank=True)
        return code if code != EXIT_OK else EXIT_INTERNAL
    failed = [(r, c, m, o) for r, (c, m, o) in enumerate(outcomes) if c != EXIT_OK]
    if not failed:
        return EXIT_OK
    causes = [f for f in failed if f[3]] or failed
    if len(causes) == _COMM.world and len({m for _, _, m, _ in causes}) == 1:
        error(causes[0][2])  # every rank failed alike (a missing file, a bad option): say it once
    else:
        for r, _, m, _ in causes:
            error(f"rank {r}: {m}")
    return causes[0][1]
