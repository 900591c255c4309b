"""Reading the user's model and data files into an ``nn.Module`` and tensors, with one-line errors.

Every failure raises :class:`CLIError` carrying the message the command prints and its exit code; the
library's own :class:`~nnsim.InputError` / :class:`~nnsim.ModelError` are mapped to the same codes by the
command line's error handler.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import datasets
from .._model import first_line

#: Exit codes of the ``nnsim`` command (documented in docs/cli.md).
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

X_KEYS = ("x", "inputs", "data", "images", "X")
Y_KEYS = ("y", "labels", "targets", "target", "Y")


class CLIError(Exception):
    """A failure to report as one line (``str(err)``) with exit code ``err.code``."""

    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Data:
    """Loaded samples: inputs ``x [N, ...]`` (float32) and labels ``y [N]`` (int64) or None."""

    x: Tensor
    y: Tensor | None

    def __len__(self) -> int:
        return self.x.shape[0]


def _existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} file not found: {path}")
    if not p.is_file():
        raise CLIError(f"{what} path is not a file: {path}")
    return p


def _is_factory_spec(spec: str) -> bool:
    """``package.module:attr`` (and not a Windows drive letter or an existing file)."""
    if ":" not in spec or Path(spec).exists():
        return False
    mod, _, attr = spec.partition(":")
    return bool(mod) and bool(attr) and all(part.isidentifier() for part in mod.split(".") + attr.split("."))


def _import_factory(spec: str, what: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to where the user runs the command
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise CLIError(f"cannot import {mod_name!r} for the {what} {spec!r}: {e}", EXIT_INPUT) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{mod_name!r} has no attribute {attr!r} (the {what} {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"the {what} {spec!r} is not callable")
    return obj


# ---------------------------------------------------------------------------------------------------- models
def load_model(spec: str, weights: str | None = None, device: str = "cpu", random_init: bool = False) -> nn.Module:
    """A ``torch.export`` program file (``.pt2``), or ``package.module:factory`` plus a state-dict file.

    The ``.pt2`` route gives back ``torch.export.load(path).module()``: a graph of aten operations, analysed
    by nnsim's generic per-module path (no Linear/Conv layer rules apply to it). The factory route rebuilds
    the original ``nn.Module`` classes, so the structured layer rules apply: the fast path for large data.
    A factory without ``weights`` is refused unless ``random_init`` (its model would be an untrained one).
    """
    if _is_factory_spec(spec):
        model = _factory_model(spec, weights, random_init)
    else:
        if weights is not None:
            raise CLIError("--weights goes with a model factory 'package.module:factory'; a .pt2 file holds "
                           "its own weights", EXIT_USAGE)
        model = _exported_model(spec)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"cannot move the model to device {device!r}: {first_line(e)}", EXIT_USAGE) from e
    return model.eval()


def _factory_model(spec: str, weights: str | None, random_init: bool) -> nn.Module:
    """``package.module:factory``'s model with the state dict of ``weights`` loaded (checked key by key)."""
    factory = _import_factory(spec, "model factory")
    if weights is None and not random_init:
        raise CLIError(f"--model {spec} builds a model at its random initialisation: pass its trained weights "
                       "with --weights FILE (a state dict), or --random-init to analyse the untrained model on "
                       "purpose", EXIT_USAGE)
    try:
        model = factory()
    except Exception as e:
        raise CLIError(f"the model factory {spec!r} failed: {type(e).__name__}: {e}", EXIT_MODEL) from e
    if not isinstance(model, nn.Module):
        raise CLIError(f"the model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module",
                       EXIT_MODEL)
    if weights is None:
        return model
    path = _existing_file(weights, "weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIError(f"{weights}: not a readable state-dict file ({type(e).__name__}: "
                       f"{first_line(e)})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CLIError(f"{weights}: expected a state dict (name -> tensor), got {type(state).__name__}")
    mismatch = _state_dict_mismatch(model, state)
    if mismatch:
        raise CLIError(f"{weights} does not fit the model from {spec!r}: {mismatch}", EXIT_MODEL)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CLIError(f"{weights} does not fit the model from {spec!r}: {first_line(e)}", EXIT_MODEL) from e
    return model


def _exported_model(spec: str) -> nn.Module:
    """The module of a ``torch.export`` program file, checked to be in eval mode, with all parameters analysed."""
    path = _existing_file(spec, "model")
    hint = "" if path.suffix == ".pt2" else " (expected a torch.export program saved with torch.export.save)"
    if not zipfile.is_zipfile(path):
        raise CLIError(f"{spec}: not a readable torch.export program{hint}: not a zip archive (truncated or "
                       "another format)")
    # torch.export logs a full traceback before re-raising on a bad archive: keep the one-line promise.
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise CLIError(f"{spec}: not a readable torch.export program{hint}: {type(e).__name__}: "
                       f"{first_line(e)}", EXIT_INPUT) from e
    finally:
        logger.setLevel(level)
    model = program.module()
    # torch.export's module() replaces train()/eval() by methods that raise, because the graph's mode was
    # fixed at export time; the ordinary nn.Module methods are restored (the flags then change nothing).
    # nnsim.Similarity refuses a graph exported in training mode.
    del model.train, model.eval
    # Exported parameters do not keep the flags that said what was trained: analyse all of them.
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _state_dict_mismatch(model: nn.Module, state: dict[str, Any], show: int = 4) -> str:
    """What differs between the model's state dict and ``state`` (missing / unexpected keys, shapes), named: the
    first few of each and their count, plus a hint when the keys differ by a prefix only; '' when they fit."""
    own = model.state_dict()

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:show]) + (f", ... ({len(keys)} in all)" if len(keys) > show else "")

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], Tensor) and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {names(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (file vs model): {names(shapes)}")
    if missing and unexpected:
        prefix = os.path.commonprefix(unexpected)
        prefix = prefix[: prefix.rfind(".") + 1]
        if prefix and all(k.removeprefix(prefix) in own for k in unexpected):
            parts.append(f"the file's keys carry the prefix {prefix!r} (a wrapper such as DataParallel): save "
                         "the inner model's state_dict()")
    return "; ".join(parts)


def check_model_accepts(model: nn.Module, x: Tensor, device: str) -> Tensor:
    """Run the model on one sample, then on three; a failure becomes a one-line :class:`CLIError` (exit 4).

    Two batch sizes, because a program exported without a dynamic batch axis accepts only its own batch
    size and would otherwise fail in the middle of the analysis. Returns the output on the first sample.
    """
    outs = []
    for size in dict.fromkeys((1, min(3, len(x)))):
        probe = x[:size].to(device)
        try:
            with torch.no_grad():
                out = model(probe)
        except Exception as e:
            if size == 1:
                raise CLIError(f"the model does not accept the data: inputs of shape {list(probe.shape[1:])} "
                               f"({probe.dtype}) per sample gave {type(e).__name__}: {first_line(e)}",
                               EXIT_MODEL) from e
            raise CLIError(f"the model accepts one sample but not a batch of {size} ({type(e).__name__}: "
                           f"{first_line(e)}); a .pt2 must be exported with a dynamic batch axis, "
                           "dynamic_shapes=({0: torch.export.Dim('batch')},) (see docs/cli.md)", EXIT_MODEL) from e
        if not isinstance(out, Tensor):
            raise CLIError(f"the model returned {type(out).__name__}; the command line needs a model returning one "
                           "tensor [B, ...] (use the Python API with output=... for other outputs)", EXIT_MODEL)
        if out.dim() == 0 or out.shape[0] != size:
            raise CLIError(f"the model returned shape {list(out.shape)} for a batch of {size}: its first axis "
                           "must be the batch", EXIT_MODEL)
        outs.append(out)
    return outs[0]


# ---------------------------------------------------------------------------------------------------- data
def load_data(spec: str, labels: str | None = None, limit: int | None = None, x_key: str | None = None,
              y_key: str | None = None) -> Data:
    """Samples from ``.npz`` / ``.npy`` arrays, an IDX file (``--labels`` an IDX label file), or a factory.

    * ``.npz``: inputs under ``x_key`` (default: the first of x, inputs, data, images, X), labels under
      ``y_key`` (default: the first of y, labels, targets, target, Y), optional.
    * ``.npy``: the inputs; ``labels`` a second ``.npy`` file of labels.
    * IDX (``*-idx3-ubyte[.gz]`` etc.): ubyte images become ``[N, 1, H, W]`` in [0, 1]; ``labels`` an IDX label file.
    * ``package.module:factory``: a callable returning a Dataset whose items are ``x`` or ``(x, label, ...)``.

    Integer or unsigned inputs are converted to float32 (IDX ubyte images divided by 255), float64 to float32.
    """
    if limit is not None and limit < 1:
        raise CLIError(f"--limit must be a positive integer, got {limit}", EXIT_USAGE)
    if _is_factory_spec(spec):
        if labels is not None:
            raise CLIError("--labels goes with array or IDX data; a dataset factory returns its own labels",
                           EXIT_USAGE)
        return _from_factory(spec, limit)
    path = _existing_file(spec, "data")
    y_arr = None
    if path.suffix == ".npz":
        x_arr, y_arr = _read_npz(path, x_key, y_key)
    elif path.suffix == ".npy":
        x_arr = _read_npy(path)
    elif _looks_like_idx(path):
        x_arr = _read_idx(path)
        if x_arr.ndim == 3:
            x_arr = x_arr[:, None]  # [N, H, W] images -> [N, 1, H, W]
    else:
        raise CLIError(f"{spec}: unknown data format {path.suffix or '(no extension)'!r}; use .npz, .npy, an IDX "
                       "file, or package.module:factory returning a Dataset")
    if labels is not None:
        if y_arr is not None:  # only an .npz holds its own
            raise CLIError(f"{spec} already holds labels; drop --labels or choose the array with --y-key", EXIT_USAGE)
        y_arr = _read_labels(labels)
    if limit is not None:
        x_arr = x_arr[:limit]
        y_arr = None if y_arr is None else y_arr[:limit]
    return Data(_to_float(x_arr, spec, is_idx=_looks_like_idx(path)), _to_labels(y_arr, len(x_arr), spec))


def _read_npz(path: Path, x_key: str | None, y_key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            xk = x_key or next((k for k in X_KEYS if k in keys), None)
            if xk is None or xk not in keys:
                want = repr(x_key) if x_key else f"one of {list(X_KEYS)}"
                raise CLIError(f"{path}: no inputs array {want}; the file holds {keys} (choose with --x-key)")
            yk = y_key or next((k for k in Y_KEYS if k in keys), None)
            if y_key is not None and y_key not in keys:
                raise CLIError(f"{path}: no labels array {y_key!r}; the file holds {keys}")
            return f[xk], (None if yk is None else f[yk])
    except CLIError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CLIError(f"{path}: not a readable .npz file ({type(e).__name__}: {first_line(e)})") from e


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CLIError(f"{path}: not a readable .npy file ({type(e).__name__}: {first_line(e)})") from e


def _looks_like_idx(path: Path) -> bool:
    name = path.name.lower()
    return "idx" in name or name.endswith((".idx", ".ubyte", ".ubyte.gz"))


def _read_idx(path: Path) -> np.ndarray:
    try:
        return datasets.read_idx(path)
    except (OSError, ValueError) as e:
        raise CLIError(first_line(e) if str(path) in str(e) else f"{path}: {first_line(e)}") from e


def _read_labels(spec: str) -> np.ndarray:
    path = _existing_file(spec, "labels")
    if path.suffix == ".npy":
        return _read_npy(path)
    if path.suffix == ".npz":
        x, y = _read_npz(path, None, None)
        return y if y is not None else x
    if _looks_like_idx(path):
        return _read_idx(path)
    raise CLIError(f"{spec}: unknown labels format; use .npy, .npz or an IDX label file")


def _to_float(arr: np.ndarray, where: str, is_idx: bool) -> Tensor:
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise CLIError(f"{where}: inputs must be numeric, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise CLIError(f"{where}: inputs must have a sample axis and at least one feature axis, got shape "
                       f"{list(arr.shape)}")
    if len(arr) == 0:
        raise CLIError(f"{where}: no samples")
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32)
    if is_idx and arr.dtype == np.uint8:
        x = x / 255.0
    if not torch.isfinite(x).all():
        bad = torch.nonzero(~torch.isfinite(x.flatten(1)).all(1)).flatten().tolist()
        raise CLIError(f"{where}: inputs contain NaN or Inf at samples {bad[:10]}")
    return x


def _to_labels(arr: np.ndarray | None, n: int, where: str) -> Tensor | None:
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise CLIError(f"{where}: labels must be one integer class per sample [N], got shape {list(arr.shape)}")
    if len(arr) != n:
        raise CLIError(f"{where}: {n} inputs but {len(arr)} labels; the counts must match")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise CLIError(f"{where}: labels must be integer class indices, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise CLIError(f"{where}: labels must be class indices >= 0, got {int(arr.min())}")
    return torch.from_numpy(arr.astype(np.int64))


def _from_factory(spec: str, limit: int | None) -> Data:
    factory = _import_factory(spec, "dataset factory")
    try:
        ds = factory()
    except Exception as e:
        raise CLIError(f"the dataset factory {spec!r} failed: {type(e).__name__}: {first_line(e)}") from e
    try:
        n = len(ds)
    except TypeError as e:
        raise CLIError(f"the dataset factory {spec!r} returned {type(ds).__name__} without a length") from e
    n = n if limit is None else min(n, limit)
    if n == 0:
        raise CLIError(f"the dataset from {spec!r} is empty")
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if isinstance(item, (tuple, list)):
            if not item or not isinstance(item[0], (Tensor, np.ndarray)):
                raise CLIError(f"{spec}: item {i} is a sequence whose first element is not an array")
            xs.append(torch.as_tensor(np.asarray(item[0]) if isinstance(item[0], np.ndarray) else item[0]))
            if len(item) > 1:
                ys.append(int(item[1]))
        elif isinstance(item, (Tensor, np.ndarray)):
            xs.append(torch.as_tensor(item))
        else:
            raise CLIError(f"{spec}: item {i} is {type(item).__name__}; items must be x or (x, label, ...)")
    shapes = {tuple(t.shape) for t in xs}
    if len(shapes) > 1:
        raise CLIError(f"{spec}: samples have different shapes {sorted(shapes)[:4]}; nnsim needs one input shape")
    x = torch.stack(xs)
    y = None
    if ys:
        if len(ys) != n:
            raise CLIError(f"{spec}: some items have labels and some do not")
        y = torch.tensor(ys, dtype=torch.int64)
    return Data(_to_float(x.numpy(), spec, is_idx=False), y)
