"""A test-local fsspec filesystem whose disk fills up: real writes until a byte budget runs out."""

from __future__ import annotations

import errno

from fsspec.implementations.memory import MemoryFileSystem


class FullDiskMemoryFS(MemoryFileSystem):
    """In-memory filesystem that raises ENOSPC once `budget` bytes have been written.

    Set `budget = None` to "free the disk".
    """

    protocol = "fulldisk-test"
    budget: int | None = None

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" in mode:
            return f
        real_write = f.write

        def write(data):
            size = memoryview(data).nbytes
            if self.budget is not None:
                if size > self.budget:
                    raise OSError(errno.ENOSPC, "No space left on device", path)
                self.budget -= size
            return real_write(data)

        f.write = write
        return f


def full_disk_fs(budget: int | None) -> FullDiskMemoryFS:
    fs = FullDiskMemoryFS(global_store=False, skip_instance_cache=True)
    fs.budget = budget
    return fs
