"""neural-tangents side of `bench_neural_tangents.py`; runs in its own (jax) environment, not nnsim's.

Reads the MLP's weights and inputs from an .npz and answers one line per request on stdin: an implementation
name (``structured``; ``structured_stax``, the MLP written with neural-tangents' own layers; ``contraction``;
``vector_products``) gets back ``wall cpu`` seconds of one call of the compiled eNTK function (compiled and
warmed on the first request of each); ``save PATH`` writes the last kernels [N, N, d, d] of every
implementation used so far to PATH (.npz); ``quit`` ends it.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

IMPLEMENTATIONS = {"structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
                   "structured_stax": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
                   "contraction": nt.NtkImplementation.JACOBIAN_CONTRACTION,
                   "vector_products": nt.NtkImplementation.NTK_VECTOR_PRODUCTS}
# The same MLP as neural-tangents' own layers (standard parameterisation with unit scales: x @ W + b).
_, STAX_APPLY, _ = stax.serial(stax.Flatten(), stax.Dense(256, 1.0, 1.0, parameterization="standard"), stax.Relu(),
                               stax.Dense(256, 1.0, 1.0, parameterization="standard"), stax.Relu(),
                               stax.Dense(10, 1.0, 1.0, parameterization="standard"))


def apply(params: list[tuple[jnp.ndarray, jnp.ndarray]], x: jnp.ndarray) -> jnp.ndarray:
    """The zoo's MLP: Flatten, (Linear, ReLU) x 2, Linear, with w = torch's W^T [in, out] (stored transposed:
    a transpose inside ``apply`` hides the dense layer from neural-tangents' structured rules, 800x slower)."""
    h = x.reshape(x.shape[0], -1)
    for k, (w, b) in enumerate(params):
        h = h @ w + b
        if k < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def main() -> None:
    data = np.load(sys.argv[1])
    params = [(jnp.asarray(data[f"w{k}"].T), jnp.asarray(data[f"b{k}"])) for k in range(int(data["layers"]))]
    x = jnp.asarray(data["x"])
    fns: dict[str, object] = {}
    last: dict[str, np.ndarray] = {}
    print("ready", jax.__version__, nt.__version__ if hasattr(nt, "__version__") else "?", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "save":
            np.savez(cmd[1], **last)
            print("saved", flush=True)
            continue
        name = cmd[0]
        if name not in fns:
            f = STAX_APPLY if name == "structured_stax" else apply
            p = [(), params[0], (), params[1], (), params[2]] if name == "structured_stax" else params
            fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=IMPLEMENTATIONS[name]))
            fn(x, None, p).block_until_ready()  # compile outside the timing
            fns[name] = (fn, p)
        t0, c0 = time.perf_counter(), time.process_time()
        fn, p = fns[name]
        k = fn(x, None, p).block_until_ready()
        print(f"{time.perf_counter() - t0:.6f} {time.process_time() - c0:.6f}", flush=True)
        last[name] = np.asarray(k)


if __name__ == "__main__":
    main()
