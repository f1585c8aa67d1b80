"""Each worker rank's stderr in a file of its own: copied to the owner's stderr after each case, its end quoted when
the rank dies without a traceback (a C++ abort, a signal)."""

from __future__ import annotations

import os
import sys

__all__ = ["RankLogs", "redirect_stderr"]


def redirect_stderr(path: str) -> None:
    """Point this process's fd 2 (Python's and C++'s stderr) at the end of `path`."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)


class RankLogs:
    """One stderr file per rank, named after `prefix`; `forward` copies what is new, `tail` reads the end."""

    def __init__(self, prefix: str, world_size: int):
        self.paths = [f"{prefix}.rank{r}.stderr" for r in range(world_size)]
        self._read = [0] * world_size
        for path in self.paths:
            open(path, "w").close()

    def forward(self) -> None:
        """Copy what each rank wrote since the last call to this process's stderr, rank by rank."""
        for rank, path in enumerate(self.paths):
            try:
                with open(path, errors="replace") as f:
                    f.seek(self._read[rank])
                    text = f.read()
                    self._read[rank] = f.tell()
            except OSError:
                continue
            if text:
                sys.stderr.write(f"[rank {rank} of {len(self.paths)}, stderr]\n{text}")

    def tail(self, rank: int, size: int = 3000) -> str:
        """The last `size` characters rank `rank` wrote to its stderr."""
        try:
            with open(self.paths[rank], errors="replace") as f:
                return f.read()[-size:]
        except OSError:
            return ""

    def remove(self) -> None:
        """Forward what is left, then delete the files."""
        self.forward()
        for path in self.paths:
            if os.path.exists(path):
                os.unlink(path)
