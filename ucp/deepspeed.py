"""DeepSpeed helpers: save a live ZeRO-1/2 engine through ucp and resume it on any number of ranks.

Example::

    ckpt = ucp.deepspeed.Checkpointer("ckpt/", every=10, keep=2)
    start = ckpt.resume(engine)                 # 0 on a fresh run
    for step in range(start + 1, steps + 1):
        ...; engine.backward(loss); engine.step()
        ckpt.maybe_save(step, engine)           # returns after the snapshot copy
    ckpt.close()

``load_universal(engine, dir)`` loads a DeepSpeed universal folder written by
``ucp reshard --engine deepspeed-universal`` (frozen parameters and buffers included, which DeepSpeed's own
universal load leaves out); ``restore_extras`` copies only those. The top-level names
``ucp.DeepSpeedCheckpointer``, ``ucp.load_deepspeed`` and ``ucp.restore_deepspeed_extras`` are
deprecated aliases of these, kept for one release.
"""

from .engines.deepspeed._hook import DeepSpeedCheckpointer as Checkpointer
from .engines.deepspeed._hook import load_deepspeed as load_universal
from .engines.deepspeed._hook import restore_deepspeed_extras as restore_extras

__all__ = ["Checkpointer", "load_universal", "restore_extras"]
