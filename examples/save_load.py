"""Train a small MLP with tensor parallelism on 2 CPU ranks, save asynchronously, load back.

    torchrun --standalone --nproc_per_node 2 examples/save_load.py --out /tmp/ucp-demo

Each rank saves only its own shard (DTensor placements are recorded, so no spec is needed);
training goes on while the background worker writes; ``ucp.load`` returns every rank its own
state, bit for bit. The optimizer state is saved as ``get_state_dict`` gives it, keyed by
parameter names, so the checkpoint also converts and reshards:

    ucp inspect /tmp/ucp-demo ; ucp convert /tmp/ucp-demo /tmp/ucp-demo-universal
"""

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import ucp


class MLP(torch.nn.Module):
    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ucp-demo"))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = parallelize_module(MLP(), mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))

    handles = []
    for step in range(1, args.steps + 1):
        loss = (model(data) - data).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            t0 = time.perf_counter()
            model_sd, optim_sd = get_state_dict(model, opt)  # optimizer state keyed by names
            state = {"model": model_sd, "optim": optim_sd, "step": step}
            handles.append(ucp.save(state, args.out, step=step, keep=2, overwrite=True,
                                    topology=f"tp={world}"))
            stall = time.perf_counter() - t0
            if rank == 0:
                print(f"step {step:3d}  loss {loss.item():.5f}  save stalled training {stall * 1e3:.1f} ms")
    for h in handles:
        h.wait()

    model_sd, optim_sd = get_state_dict(model, opt)
    back = ucp.load(args.out, like={"model": model_sd, "optim": optim_sd})
    same = all(torch.equal(back["model"][k].to_local(), v.to_local()) for k, v in model_sd.items())
    set_state_dict(model, opt, model_state_dict=back["model"], optim_state_dict=back["optim"])
    if rank == 0:
        steps = sorted(os.listdir(args.out))
        print(f"committed: {[s for s in steps if s.startswith('step-')]} (keep=2) in {args.out}")
        print(f"loaded step {back['step']}: every shard equal bit for bit: {same}")
    dist.destroy_process_group()
    if not same:
        raise SystemExit("loaded state differs from the saved one")


if __name__ == "__main__":
    main()
