"""fsspec-backed checkpoint storage: atomic writes, checksums, retries, parallel I/O."""

from ._direct import direct_opener, write_blocks
from ._flush import Flusher
from ._memory import keep_freed_memory
from ._retry import RetryPolicy, is_transient, retry_call
from ._stats import ReadCounter, read_counter
from ._store import PACKAGE_FOR_PROTOCOL, Storage, checksum, open_regular, verify
from ._store import _fsync_dir as fsync_dir

__all__ = ["Storage", "RetryPolicy", "checksum", "verify", "is_transient", "retry_call",
           "PACKAGE_FOR_PROTOCOL", "ReadCounter", "read_counter", "open_regular", "Flusher", "fsync_dir",
           "direct_opener", "write_blocks", "keep_freed_memory"]
