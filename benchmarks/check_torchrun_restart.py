"""End-to-end check of a multi-process index build under torchrun, with a rank killed on the first attempt.

    python -m torch.distributed.run --nproc_per_node=2 --max-restarts=2 benchmarks/check_torchrun_restart.py STORE

On the first attempt rank 1 dies (os._exit) when it reaches row 45, after finishing its first shard; torchrun
restarts the whole group, whose build keeps every finished shard and computes only the missing rows (printed
per rank). The script then checks the distributed soft density against the single-process one. STORE must
not exist before the first attempt (or hold a store of this same build).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.utils.data import Dataset

import nnsim
import nnsim.index.features as fi
from nnsim import distributed as nd

torch.set_num_threads(1)
nd.setup_from_env()
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
x = torch.randn(60, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class Dying(Dataset):
    """Rank 1 of the first attempt dies computing row 45 (its second read: the centre's rows are read first)."""

    reads = 0

    def __len__(self) -> int:
        return len(x)

    def __getitem__(self, i: int) -> torch.Tensor:
        if attempt == 0 and nd.rank() == 1 and i == 45:
            Dying.reads += 1
            if Dying.reads == 2:
                os._exit(9)
        return x[i]


computed: list[tuple[int, int]] = []
real = fi.chunk_features


def counting(sim, batch, start, *args, **kwargs):  # type: ignore[no-untyped-def]
    computed.append((start, batch[0].shape[0]))
    return real(sim, batch, start, *args, **kwargs)


fi.chunk_features = counting
sim = nnsim.Similarity(model, progress=False, chunk_size=5)
index = nnsim.FeatureIndex.build(sim, Dying(), sys.argv[1], dim=16, shard_size=10)
density = sim.density(x)
print(f"rank {nd.rank()} attempt {attempt}: computed rows {sorted(computed)}", flush=True)
assert torch.allclose(density, sim.density(x, group=False), rtol=1e-10, atol=1e-10)
nd.print0(f"attempt {attempt}, {nd.world_size()} processes: store complete = {index.manifest['complete']}, "
          "density equal to the single-process one")
if nd.world_size() > 1:
    torch.distributed.destroy_process_group()
