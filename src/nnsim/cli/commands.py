"""The commands of ``nnsim``: thin shells around the public nnsim API (Similarity, FeatureIndex, the report).

Each ``cmd_NAME(args, rt)`` takes the parsed options and the run's :class:`~nnsim.cli.runtime.Runtime` and
returns the exit code; errors are exceptions, turned into one line and an exit code by :mod:`nnsim.cli.main`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import pkgutil
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import FeatureIndex, Similarity, outputs
from ..errors import InputError
from .analysis import nonzero_gradients
from .loading import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, CLIError, Data, check_model_accepts, load_data, load_model
from .runtime import Runtime, main_process, write_csv, write_file


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


def _model_and_sim(args: argparse.Namespace, data: Data, rt: Runtime) -> tuple[nn.Module, Similarity]:
    rt.say(f"loading model {args.model}")
    model = load_model(args.model, args.weights, args.device, random_init=args.random_init)
    probe = check_model_accepts(model, data.x, args.device)
    args.model_outputs = int(probe[0].numel())  # values per sample of the model's output (classes of a classifier)
    output = _parse_output(args.output)
    _, _, target = args.output.partition(":")
    if target.isdigit() and int(target) >= args.model_outputs:
        raise CLIError(f"--output {args.output}: the model has {args.model_outputs} outputs per sample (classes 0.."
                       f"{args.model_outputs - 1})", EXIT_USAGE)
    sim = Similarity(model, output=output, params=args.params, metric=args.metric,
                     backend=args.backend, chunk_size=args.chunk_size, progress=rt.progress)
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


def _data(args: argparse.Namespace, rt: Runtime) -> Data:
    data = load_data(args.data, getattr(args, "labels", None), args.limit, args.x_key, args.y_key)
    rt.say(f"loaded {len(data)} samples of shape {list(data.x.shape[1:])} from {args.data}"
           + ("" if data.y is None else f" with labels ({int(data.y.max()) + 1} classes)"))
    return data


def _data_and_sim(args: argparse.Namespace, rt: Runtime) -> tuple[Data, Similarity]:
    """--data, then the model and its Similarity (call it inside ``rt.together()``)."""
    data = _data(args, rt)
    return data, _model_and_sim(args, data, rt)[1]


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


def _cell(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return int(v) if isinstance(v, np.integer) else v


def cmd_analyze(args: argparse.Namespace, rt: Runtime) -> int:
    from .analysis import run_analysis

    with rt.together():
        data = _data(args, rt)
        if len(data) < 2:
            raise CLIError(f"{args.data}: analyze needs at least 2 samples (neighbours of each sample among the "
                           f"others), the data has {len(data)}")
        if args.k > len(data) - 1:
            raise CLIError(f"-k {args.k} is more than the {len(data) - 1} other samples of the {len(data)}; use -k "
                           f"{len(data) - 1} or fewer", EXIT_USAGE)
        model, sim = _model_and_sim(args, data, rt)
        _check_labels(args, data)
        _check_class_names(args, data)
    t0 = time.perf_counter()
    with rt.together():
        noisy = _noisy_targets(args, len(data))
    result = run_analysis(sim, model, data.x, data.y, k=args.k, exact_denoising=args.exact_denoising,
                          dim=args.dim, device=args.device, log=rt.say, noisy_targets=noisy)
    with rt.together():
        result.summary.update(data=str(args.data), model=str(args.model))
        _write_outputs(Path(args.out), data, result, args,
                       title=args.title or f"nnsim report: {Path(args.data).name}",
                       subtitle=f"model {args.model}, data {args.data} ({len(data)} samples)", rt=rt)
    rt.say(f"analysis done in {time.perf_counter() - t0:.1f} s; wrote {args.out}/report.html, samples.csv, "
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


def _write_outputs(out: Path, data: Data, result: Any, args: argparse.Namespace, title: str, subtitle: str,
                   rt: Runtime) -> None:
    """The files of ``analyze`` / ``demo`` (on rank 0 only under torchrun; call it inside ``rt.together()``)."""
    from ..report import write_report

    if not main_process():
        return
    out.mkdir(parents=True, exist_ok=True)
    # summary.json is the completion marker: removed first, written last with "complete": true, so a folder
    # with an old summary.json next to half-rewritten files cannot pass for a finished analysis.
    (out / "summary.json").unlink(missing_ok=True)
    cols = result.columns
    names = list(cols)
    k = result.neighbor_index.shape[1]
    write_csv(out / "samples.csv", names + [f"neighbor_{r + 1}" for r in range(k)],
              ([_cell(cols[c][i]) for c in names] + [int(j) for j in result.neighbor_index[i]]
               for i in range(len(data))))
    write_csv(out / "neighbors.csv", ["index", "rank", "neighbor", "similarity"],
              ([i, r + 1, int(result.neighbor_index[i, r]), repr(float(result.neighbor_similarity[i, r]))]
               for i in range(len(data)) for r in range(k)))
    summary = {**result.summary, "timings_s": result.timings}
    class_names = args.class_names.split(",") if getattr(args, "class_names", None) else None
    rt.say("writing the report")
    write_report(out / "report.html", x=data.x.numpy(), columns=cols, neighbor_index=result.neighbor_index,
                 neighbor_similarity=result.neighbor_similarity, summary=summary, title=title, subtitle=subtitle,
                 class_names=class_names, figures_dir=out / "figures")
    text = json.dumps({**summary, "complete": True}, indent=2) + "\n"
    write_file(out / "summary.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def cmd_density(args: argparse.Namespace, rt: Runtime) -> int:
    with rt.together():
        data, sim = _data_and_sim(args, rt)
        ref = None if args.reference is None else load_data(args.reference, None, None, args.x_key, None).x
    dens = nonzero_gradients(lambda: sim.density(data.x, ref, method=args.method, normalized=not args.unnormalized,
                                                 threshold=args.threshold, power=args.power,
                                                 include_self=not args.exclude_self))
    with rt.together():
        write_csv(Path(args.out), ["index", "density"], ([i, repr(float(v))] for i, v in enumerate(dens)))
    rt.say(f"density: min {dens.min():.3f}, median {dens.median():.3f}, max {dens.max():.3f}; wrote {args.out}")
    return EXIT_OK


def cmd_neighbors(args: argparse.Namespace, rt: Runtime) -> int:
    with rt.together():
        data, sim = _data_and_sim(args, rt)
        q, qidx = _queries(args.query, data, args)
        k = args.k + (1 if args.exclude_self and qidx is not None else 0)
        if k > len(data):
            raise CLIError(f"-k {args.k} is more than the {len(data)} samples")
    # all NaN: every gradient (queries or data) is zero
    vals, idx = nonzero_gradients(lambda: sim.neighbors(q, data.x, k=k), values=lambda r: r[0].flatten())
    with rt.together():
        _write_neighbors(Path(args.out), vals, idx, qidx, rt, drop_self=args.exclude_self, k=args.k)
    rt.say(f"wrote {args.out}")
    return EXIT_OK


def _write_neighbors(path: Path, vals: Any, idx: Any, qidx: np.ndarray | None, rt: Runtime,
                     drop_self: bool = False, k: int | None = None) -> None:
    """The neighbours [Q, k] of each query: one CSV row per (query, rank), one printed line per query. A query
    given as an index into --data is named by it (and, with ``drop_self``, is not its own neighbour)."""
    rows = []
    for r in range(len(vals)):
        pairs = [(int(j), float(s)) for j, s in zip(idx[r], vals[r])]
        name = int(qidx[r]) if qidx is not None else r
        if drop_self and qidx is not None:
            pairs = [p for p in pairs if p[0] != name][:k]
        rows += [[name, rank + 1, j, repr(s)] for rank, (j, s) in enumerate(pairs)]
        rt.say(f"query {name}: " + ", ".join(f"{j} ({s:.3f})" for j, s in pairs))
    write_csv(path, ["query", "rank", "neighbor", "similarity"], rows)


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


def cmd_denoise(args: argparse.Namespace, rt: Runtime) -> int:
    with rt.together():
        data, sim = _data_and_sim(args, rt)
        noisy = _noisy_targets(args, len(data))
        method = args.method or ("linearized" if noisy is not None else "paper")
        if method == "linearized" and noisy is None:
            raise CLIError("--method linearized needs --noisy-targets FILE (the regression targets the network was "
                           "trained on)", EXIT_USAGE)
    if method == "linearized":
        assert noisy is not None
        _denoise_linearized(args, rt, sim, data, noisy)
    else:
        _denoise_paper(args, rt, sim, data)
    return EXIT_OK


def _denoise_linearized(args: argparse.Namespace, rt: Runtime, sim: Similarity, data: Data,
                        noisy: torch.Tensor) -> None:
    report = sim.denoising(data.x, targets=noisy.to(data.x.dtype), method="linearized", noise_std=args.noise_std,
                           approximate=args.approximate, landmarks=args.landmarks)
    with rt.together():
        write_file(Path(args.out), report.to_csv)
    assert report.predicted_error is not None
    pe, flag = report.predicted_error, report.ill_conditioned
    source = "given" if args.noise_std is not None else "estimated from the training residuals"
    rt.say(f"label noise sigma: {report.noise_std:.4g} ({source}; estimate {report.noise_std_estimated:.4g}); "
           f"predicted noise-induced error: median {pe.median():.4g}, RMS {pe.square().mean().sqrt():.4g} "
           f"(= {float(pe.square().mean().sqrt()) / report.noise_std:.2f} sigma); {int(flag.sum())} of {len(pe)} "
           f"samples flagged untrusted; smoother fit error {report.fit_error:.3f}; method linearized, "
           f"{VALIDATION_NOTE}; wrote {args.out}")


def _denoise_paper(args: argparse.Namespace, rt: Runtime, sim: Similarity, data: Data) -> None:
    with rt.together():
        targets = None
        if args.targets == "labels":
            if data.y is None:
                raise CLIError("--targets labels needs labels (an .npz with y, or --labels)", EXIT_USAGE)
            _check_labels(args, data)
            targets = torch.nn.functional.one_hot(data.y).float()
    def all_zero(r: Any) -> torch.Tensor:
        # R_i = sum_j K_ij is zero for every sample: all gradients are zero (the factors would be written as inf)
        zero = bool(r.ill_conditioned.all()) and not bool(r.factor.abs().gt(0).any())
        return torch.full((len(r.factor) if zero else 0,), float("nan"))

    try:
        report = nonzero_gradients(lambda: sim.denoising(data.x, predictions=targets, noise_std=args.noise_std,
                                                         approximate=args.approximate, dim=args.dim), all_zero)
    except InputError as e:
        if targets is not None and "columns" in str(e):
            raise CLIError(f"--targets labels: {e} (one-hot labels need an output with one value per class)") from e
        raise
    with rt.together():
        write_file(Path(args.out), report.to_csv)
    eff = report.effective_neighbors
    flagged = int(report.ill_conditioned.sum())
    extra = ""
    if report.predicted_error is not None:
        extra = (f"; predicted error sigma sqrt(tr D / d): median {report.predicted_error.median():.4g} "
                 "(paper factor, sigma given; not validated: in docs/experiments/denoising.md it was 1.7-8x too "
                 "optimistic; pass --noisy-targets for the validated estimate)")
    rt.say(f"effective neighbours: median {eff.median():.2f} (min {eff.min():.2f}, max {eff.max():.2f}); {flagged} "
           f"of {len(eff)} samples flagged untrusted{extra}; wrote {args.out}")


def cmd_index_build(args: argparse.Namespace, rt: Runtime) -> int:
    with rt.together():
        data, sim = _data_and_sim(args, rt)
    index = FeatureIndex.build(sim, data.x, args.index, dim=args.dim, seed=args.seed, overwrite=args.overwrite)
    rt.say(f"built {index!r}")
    return EXIT_OK


def cmd_index_query(args: argparse.Namespace, rt: Runtime) -> int:
    # FeatureIndex.search is local (no collective call): under torchrun every rank runs the query in full (a
    # rank-0-only search would leave the others waiting in a collective, past NCCL's timeout on long searches).
    with rt.together():
        data, sim = _data_and_sim(args, rt)
        index = FeatureIndex.open(args.index, sim)
        if len(index) != len(data):
            raise CLIError(f"{args.index} indexes {len(index)} samples but --data has {len(data)}; pass the data the "
                           "index was built from (same --limit)")
        index.check_data(data.x)  # the data digests, also with --no-rerank
        q, qidx = _queries(args.query, data, args)
        vals, idx = index.search(q, k=args.k, data=None if args.no_rerank else data.x)
        _write_neighbors(Path(args.out), vals, idx, qidx, rt)
    rt.say(f"wrote {args.out}")
    return EXIT_OK


def available_experiments() -> list[str]:
    """Names of the ``nnsim.experiments`` modules installed (empty when the package does not exist yet)."""
    try:
        pkg = importlib.import_module("nnsim.experiments")
    except ImportError:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(getattr(pkg, "__path__", [])) if not m.name.startswith("_"))


def cmd_reproduce(args: argparse.Namespace, rt: Runtime) -> int:
    if rt.comm is not None:
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


def cmd_demo(args: argparse.Namespace, rt: Runtime) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), log=rt.say, progress=not rt.quiet, write_outputs=functools.partial(_write_outputs, rt=rt),
             args=args)
    rt.say(f"open {Path(args.out) / 'report.html'} in a browser; rerun any command on {args.out}/model.pt2 and "
           f"{args.out}/data.npz, e.g. nnsim analyze --model {args.out}/model.pt2 --data {args.out}/data.npz --out "
           "my-report")
    return EXIT_OK


