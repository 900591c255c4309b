"""The ``nnsim`` command line: the parser (one function per subcommand), the entry point :func:`main`, and how
exceptions become one error line and an exit code (agreed between the ranks under torchrun). The commands
themselves are in :mod:`nnsim.cli.commands`."""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.std import tqdm

from .. import distributed
from ..errors import InputError, ModelError, ResultTooLargeError
from . import commands
from .loading import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    _is_factory_spec,
)
from .runtime import Runtime, error, main_process


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
    if getattr(args, "random_init", False) and (args.weights is not None or not _is_factory_spec(args.model)):
        raise CLIError("--random-init goes with a model factory 'package.module:factory' and no --weights", EXIT_USAGE)
    if getattr(args, "out", None) is not None:
        check_writable(Path(args.out), folder=args.command in ("analyze", "demo"))


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

# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nnsim", description="Input similarity from the neural network's perspective (Charpiat et al., 2019): "
        "which samples does your trained model treat alike? See docs/cli.md.")
    from .. import __version__

    ap.add_argument("--version", action="version", version=f"nnsim {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _model_command(sub, "analyze", "the full analysis: samples.csv, summary.json, figures, report.html",
                   commands.cmd_analyze, _analyze_options)
    _model_command(sub, "density", "neighbour count of every sample (Similarity.density)", commands.cmd_density,
                   _density_options)
    _model_command(sub, "neighbors", "the k most similar samples of --data for each query", commands.cmd_neighbors,
                   _neighbors_options)
    _model_command(sub, "denoise", "self-denoising statistics (Similarity.denoising)", commands.cmd_denoise,
                   _denoise_options)
    p = sub.add_parser("index", help="an on-disk feature index for fast neighbour search (FeatureIndex)")
    isub = p.add_subparsers(dest="index_command", metavar="build|query", required=True)
    _model_command(isub, "build", "project the data's similarity features into an index folder",
                   commands.cmd_index_build, _index_build_options, labels=False)
    _model_command(isub, "query", "search an index (re-ranked exactly with --data)", commands.cmd_index_query,
                   _index_query_options, labels=False)
    _add_reproduce(sub)
    return ap


def _model_command(sub: Any, name: str, help_text: str, func: Any, own_options: Any, labels: bool = True) -> None:
    """A subcommand analysing a model on data: the model and data options, its own options, the common ones."""
    p = sub.add_parser(name, help=help_text)
    _add_model_options(p)
    _add_data_options(p, labels=labels)
    own_options(p)
    _add_common(p)
    p.set_defaults(func=func)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="train a small CNN on digits with 10%% flipped labels and write its report")
    p.add_argument("--out", default="nnsim-demo", metavar="DIR", help="output folder (default: nnsim-demo)")
    # One thread: the same numbers on every machine (summation order), and no OpenMP threads waiting on each
    # other on a busy machine (training took 9 s with one thread, 330 s with two on our loaded 2-core machine).
    _add_common(p, threads=1)
    p.set_defaults(func=commands.cmd_demo)


def _analyze_options(p: argparse.ArgumentParser) -> None:
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


def _density_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", metavar="R", help="count neighbours among these samples instead")
    p.add_argument("--method", default="soft", choices=["soft", "hard", "less_soft"])
    p.add_argument("--threshold", type=float, help="similarity threshold of method hard")
    p.add_argument("--power", type=float, help="exponent of method less_soft")
    p.add_argument("--unnormalized", action="store_true", help="sum the unnormalised kernel trace instead")
    p.add_argument("--exclude-self", action="store_true", help="do not count each sample as its own neighbour")
    p.add_argument("--out", default="density.csv", metavar="FILE", help="CSV output (default density.csv)")


def _neighbors_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query", required=True, metavar="Q",
                   help="indices into --data (0,5,9 or 0:10) or a file of query samples")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--exclude-self", action="store_true", help="with index queries: skip the query itself")
    p.add_argument("--out", default="neighbors.csv", metavar="FILE", help="CSV output (default neighbors.csv)")


def _denoise_options(p: argparse.ArgumentParser) -> None:
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


def _index_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="DIR", help="index folder")
    p.add_argument("--dim", type=int, help="numbers per stored row: the sketch width (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an index of another configuration")


def _index_query_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="DIR", help="index folder")
    p.add_argument("--query", required=True, metavar="Q", help="indices into --data or a file of query samples")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--no-rerank", action="store_true", help="return the projected estimates without re-ranking")
    p.add_argument("--out", default="neighbors.csv", metavar="FILE")


def _add_reproduce(sub: Any) -> None:
    p = sub.add_parser("reproduce", help="run one of the paper's experiments (nnsim.experiments.NAME)")
    p.add_argument("name", metavar="NAME", help="experiment name")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the experiment")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=commands.cmd_reproduce)


def _showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    # nnsim's warnings name the same samples on every rank: one copy, from rank 0.
    if main_process():
        print(f"nnsim: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring).

    Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` in the environment) it first joins the default process group
    (:func:`nnsim.distributed.setup_from_env`: gloo on CPU, NCCL on GPUs) and leaves it at the end; every rank
    runs the command, only rank 0 prints and writes, and every rank returns the same exit code.
    """
    parser = build_parser()
    if main_process():
        args = parser.parse_args(argv)
    else:  # usage errors and --help are printed by rank 0 only; every rank exits with argparse's code
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            error(f"--threads must be a positive integer, got {args.threads}")
            return EXIT_USAGE
        torch.set_num_threads(args.threads)
    # No tqdm monitor thread: a daemon thread still running at interpreter exit is a known source of aborts
    # ("terminate called without an active exception") in torch processes; it only tunes the bars' refresh.
    tqdm.monitor_interval = 0
    joined = distributed.dist is not None and distributed.dist.is_available() and not distributed.dist.is_initialized()
    try:
        rt = Runtime(quiet=bool(getattr(args, "quiet", False)), comm=distributed.setup_from_env())
    except Exception as e:  # rendezvous or backend failure, before any nnsim work
        error(f"cannot join the torch.distributed process group of this torchrun job: {type(e).__name__}: {e}",
              every_rank=True)
        return EXIT_INTERNAL
    joined = joined and distributed.dist.is_initialized()
    shown = warnings.showwarning
    if not debug:
        warnings.showwarning = _showwarning  # one line per warning, like the errors
    try:
        return _run(args, rt, debug)
    finally:
        warnings.showwarning = shown
        if joined:  # only a group this call created; a script that set one up keeps it
            with contextlib.suppress(Exception):
                distributed.dist.destroy_process_group()
            # Free the group's objects (gloo threads and their pending work) now, while the interpreter is
            # alive, not during its finalisation.
            del rt
            gc.collect()


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


def _run(args: argparse.Namespace, rt: Runtime, debug: bool) -> int:
    own = True
    try:
        if args.command != "reproduce":
            with rt.together():  # under torchrun: a failure on one rank fails every rank, before any collective
                _check_args(args)
        code, message = int(args.func(args, rt)), ""
    except KeyboardInterrupt:
        # Not negotiated: the launcher stops every rank (torchrun forwards the signal).
        error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            if rt.comm is not None:
                print(f"nnsim: rank {rt.comm.rank}:", file=sys.stderr, flush=True)
            traceback.print_exc()
        code, message = _exit_code(e)
        message = _in_cli_terms(message)
        if not debug and code == EXIT_INTERNAL:
            message += " (rerun with --debug for the traceback)"
        # A rank that only learnt that another rank failed defers to that rank's own error and exit code.
        own = not (isinstance(e, distributed.DistributedError) and _OTHER_RANK_FAILED.match(str(e)))
    if rt.comm is None:
        if code != EXIT_OK:
            error(message)
        return code
    return _agree_on_exit(rt.comm, code, message, own)


def _agree_on_exit(comm: distributed.Comm, code: int, message: str, own: bool) -> int:
    """Under torchrun: every rank gets here together (each step of a command either fails on every rank or on
    none), exchanges its outcome, and returns the same exit code: that of the first rank that failed on its own.
    Rank 0 prints the error once (with the failing ranks when they are not all of them, or differ)."""
    try:
        outcomes = distributed.all_gather_object(comm, (code, message, own))
    except Exception as e:  # the group broke (a rank died): report what this rank knows
        if code != EXIT_OK:
            error(message, every_rank=True)
        error(f"could not exchange the exit status with the other ranks: {type(e).__name__}: {e}", every_rank=True)
        return code if code != EXIT_OK else EXIT_INTERNAL
    failed = [(r, c, m, o) for r, (c, m, o) in enumerate(outcomes) if c != EXIT_OK]
    if not failed:
        return EXIT_OK
    causes = [f for f in failed if f[3]] or failed
    if len(causes) == comm.world and len({m for _, _, m, _ in causes}) == 1:
        error(causes[0][2])  # every rank failed alike (a missing file, a bad option): say it once
    else:
        for r, _, m, _ in causes:
            error(f"rank {r}: {m}")
    return causes[0][1]

