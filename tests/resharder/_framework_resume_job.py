"""Stock torchtitan and accelerate jobs (no ucp import) resuming from a checkpoint folder.

Run under torchrun, one process per rank::

    python -m torch.distributed.run --nproc_per_node N ... _framework_resume_job.py torchtitan FOLDER RECORD [unfused]
    python -m torch.distributed.run --nproc_per_node N ... _framework_resume_job.py accelerate DIR RECORD

``torchtitan``: builds the job of ``tests/engines/_titan_make.py`` (its Llama 3, FSDP2 over the N
ranks, its ``OptimizersContainer`` and ``LRSchedulersContainer``) and lets torchtitan's own
``CheckpointManager``, with ``checkpoint.folder = FOLDER``, load the newest ``step-N`` as
``torchtitan.train`` does on start (``load(step=checkpoint.load_step)``, -1); the data loader is
left out of the load (``exclude_from_loading``), as the job has none; ``unfused``: the model is
built with ``fuse_qkv=False``. ``accelerate``: builds the
job of ``tests/engines/_accel_make.py`` (FSDP2, sharded state dicts) and calls
``accelerator.load_state(DIR)``. Either way rank 0 then writes RECORD: the full state torch gathers
from what the job holds, as the making job wrote its reference.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

assert "ucp" not in sys.modules
ENGINES = Path(__file__).resolve().parent.parent / "engines"


def _helper(name: str):
    spec = importlib.util.spec_from_file_location(f"resume_job{name}", ENGINES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchtitan(folder: str, record: str, unfused: str = "") -> None:
    import torch.distributed as dist
    from torchtitan.components.checkpoint import CheckpointManager

    make = _helper("_titan_make")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dump = os.path.dirname(record)
    model, optimizers, schedulers = make._build(world, dump, fuse_qkv=unfused != "unfused")
    state = make.TrainState()
    config = CheckpointManager.Config(enable=True, folder=folder, exclude_from_loading=["dataloader"])
    ckpt = CheckpointManager(config, dataloader=None, model_parts=[model], optimizers=optimizers,
                             lr_schedulers=schedulers, states={"train_state": state}, sd_adapter=None,
                             base_folder=dump)
    assert ckpt.load(step=config.load_step), f"torchtitan found no checkpoint in {folder}"
    make._write_reference(model, optimizers, schedulers, state, record, rank)
    ckpt.close()


def accelerate(folder: str, record: str) -> None:
    make = _helper("_accel_make")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    accelerator, model, opt, sched = make.build(rank, world)
    accelerator.load_state(folder)
    make.write_reference(model, opt, sched, record, rank)


if __name__ == "__main__":
    {"torchtitan": torchtitan, "accelerate": accelerate}[sys.argv[1]](*sys.argv[2:])
    assert "ucp" not in sys.modules
    sys.stdout.flush()
    sys.stderr.flush()
