"""Which DCP directories make up one training state, for the roots training frameworks write.

A plain ``torch.distributed.checkpoint`` directory (``.metadata`` + ``*.distcp``) is one state. Two
frameworks put their DCP directories under a root of their own:

* **torchtitan** (``CheckpointManager``): ``<folder>/step-<N>/``, one DCP directory per saved step
  (no zero padding). The newest step that has its ``.metadata`` (DCP writes it last) is taken,
  unless a step is asked for. Its dump folder, with the default ``checkpoint/`` folder in it, is
  taken too.
* **accelerate** (``Accelerator.save_state`` under FSDP with sharded state dicts):
  ``pytorch_model_fsdp_0/`` (DCP of ``{"model": ...}``) and ``optimizer_0/`` (DCP of
  ``{"optimizer": ...}``) side by side, with ``scheduler.bin`` (a ``torch.save`` of the learning
  rate scheduler's state dict) and per-rank RNG pickles, which ucp leaves alone.

:func:`find_root` looks at names only (one listing, plus one per candidate directory);
:func:`merge_parts` joins the metadata of several directories into one, with every data file named
relative to the root.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re

from ucp.storage import Storage

from ucp.core._errors import CheckpointNotFoundError, ConvertError, CorruptCheckpointError
from ._meta import DcpMetadata

__all__ = ["Root", "find_root", "is_dcp_dir", "merge_parts", "accelerate_part_hint", "roots_near_miss"]

METADATA = ".metadata"
RANK_METADATA = re.compile(r"^__(\d+)\.metadata$")
_TITAN_STEP = re.compile(r"^step-(\d+)$")
_ACCEL_MODEL = re.compile(r"^pytorch_model_fsdp_(\d+)$")
_ACCEL_OPTIM = re.compile(r"^optimizer_(\d+)$")
ACCEL_SCHEDULER = "scheduler.bin"
#: torchtitan's default ``checkpoint.folder`` inside its ``job.dump_folder``.
TITAN_FOLDER = "checkpoint"


@dataclasses.dataclass(frozen=True)
class Root:
    """What :func:`find_root` found.

    Attributes:
        kind: ``"dcp"`` (the URL is a DCP directory), ``"torchtitan"`` or ``"accelerate"``.
        parts: the DCP directories that together hold the state, relative to the URL ('' is the
            URL itself).
        step: torchtitan: the chosen step; else None.
        steps: torchtitan: every complete step found, ascending.
    """

    kind: str
    parts: tuple[str, ...]
    step: int | None = None
    steps: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.kind == "torchtitan":
            inside = posixpath.dirname(self.parts[0])
            return (f"torchtitan checkpoint folder{' ' + inside + '/' if inside else ''}: {len(self.steps)} step(s) "
                    f"({', '.join(map(str, self.steps))}), newest step-{self.steps[-1]}")
        if self.kind == "accelerate":
            return f"accelerate FSDP save_state: {' + '.join(p + '/' for p in self.parts)}"
        return "torch.distributed.checkpoint directory"


def is_dcp_dir(names: list[str]) -> bool:
    """Whether a directory listing is a DCP checkpoint's (metadata and data files)."""
    has_meta = METADATA in names or any(RANK_METADATA.match(n) for n in names)
    return has_meta and any(n.endswith(".distcp") for n in names)


def find_root(storage: Storage, *, tag: str | None = None) -> Root | None:
    """The DCP directories at ``storage`` (a DCP directory, a torchtitan folder or an accelerate
    ``save_state`` folder), or None when it is none of these.

    Args:
        storage: the URL given to ucp.
        tag: torchtitan: the step to take (``"4"`` or ``"step-4"``); default: the newest.

    Raises:
        CheckpointNotFoundError: ``tag`` names no complete step.
        ConvertError: an accelerate folder with several models (ucp converts one state).
    """
    names = storage.list("")
    if is_dcp_dir(names):
        return Root("dcp", ("",))
    steps = sorted(int(m.group(1)) for n in names if (m := _TITAN_STEP.match(n))
                   and is_dcp_dir(storage.list(n)))
    if steps:
        step = _pick_step(steps, tag, storage.url)
        return Root("torchtitan", (f"step-{step}",), step=step, steps=tuple(steps))
    models = sorted(n for n in names if _ACCEL_MODEL.match(n))
    if models:
        return _accelerate_root(storage, names, models)
    if TITAN_FOLDER in names:  # torchtitan's dump folder, its checkpoint.folder below
        inner = find_root(storage.child(TITAN_FOLDER), tag=tag)
        if inner is not None and inner.kind == "torchtitan":
            return dataclasses.replace(inner, parts=tuple(f"{TITAN_FOLDER}/{p}" for p in inner.parts))
    return None


def _pick_step(steps: list[int], tag: str | None, where: str) -> int:
    if tag is None:
        return steps[-1]
    text = tag[len("step-"):] if tag.startswith("step-") else tag
    if not text.isdigit() or int(text) not in steps:
        raise CheckpointNotFoundError(f"{where}: no complete torchtitan step {tag!r}; the complete steps "
                                      f"(step-N folders with .metadata) are {', '.join(map(str, steps))}")
    return int(text)


def _accelerate_root(storage: Storage, names: list[str], models: list[str]) -> Root:
    if len(models) > 1:
        raise ConvertError(f"{storage.url}: an accelerate save_state of {len(models)} models "
                           f"({', '.join(models)}); ucp converts one model's state: point at a copy "
                           "holding one pytorch_model_fsdp_<i>/ and its optimizer_<i>/")
    index = _ACCEL_MODEL.match(models[0]).group(1)  # type: ignore[union-attr]
    parts = [models[0]]
    optim = f"optimizer_{index}"
    if optim in names:
        parts.append(optim)
    for part in parts:
        if not is_dcp_dir(storage.list(part)):
            raise CheckpointNotFoundError(
                f"{storage.url}/{part}: not a complete torch.distributed.checkpoint directory (no "
                ".metadata or no .distcp files); accelerate writes it with sharded state dicts "
                "(fsdp_state_dict_type: SHARDED_STATE_DICT): is the save complete?")
    return Root("accelerate", tuple(parts))


def roots_near_miss(storage: Storage) -> str | None:
    """Why a folder that looks like a torchtitan or accelerate root is none (for auto-detection's
    error), or None."""
    names = storage.list("")
    steps = sorted(n for n in names if _TITAN_STEP.match(n))
    if steps:
        return (f"{len(steps)} torchtitan step folder(s) ({', '.join(steps[:3])}{' ...' if len(steps) > 3 else ''}) "
                "but none holds .metadata and .distcp files: no save finished (DCP writes .metadata last)")
    optim = sorted(n for n in names if _ACCEL_OPTIM.match(n))
    if optim:
        return (f"accelerate's {optim[0]}/ but no pytorch_model_fsdp_<i>/ beside it: copy the model folder "
                "too (save_state writes both)")
    return None


def accelerate_part_hint(url: str) -> str | None:
    """What to do instead when ``url`` is one folder of an accelerate ``save_state`` (by its name)."""
    name = posixpath.basename(url.replace("\\", "/").rstrip("/"))
    m = _ACCEL_OPTIM.match(name) or _ACCEL_MODEL.match(name)
    if m is None:
        return None
    return (f"{name}/ looks like one folder of an accelerate save_state: convert the folder above it, "
            f"which holds pytorch_model_fsdp_{m.group(1)}/ and optimizer_{m.group(1)}/ as one state")


def merge_parts(parts: dict[str, DcpMetadata], *, where: str) -> DcpMetadata:
    """One metadata for several DCP directories of a root: data files renamed ``<part>/<file>``.

    Raises:
        CorruptCheckpointError: two directories save the same key.
    """
    if list(parts) == [""]:
        return parts[""]
    tensors, objects, owner = {}, {}, {}
    for part, meta in parts.items():
        for key, t in meta.tensors.items():
            chunks = tuple(dataclasses.replace(c, file=f"{part}/{c.file}") for c in t.chunks)
            tensors[key] = dataclasses.replace(t, chunks=chunks)
        for key, o in meta.objects.items():
            objects[key] = dataclasses.replace(o, file=f"{part}/{o.file}")
        for key in (*meta.tensors, *meta.objects):
            if key in owner:
                raise CorruptCheckpointError(f"{where}: {owner[key]}/ and {part}/ both save {key!r}; "
                                             "they are not one training state")
            owner[key] = part
    versions = {m.version for m in parts.values()}
    return DcpMetadata(versions.pop() if len(versions) == 1 else None, tensors, objects)
