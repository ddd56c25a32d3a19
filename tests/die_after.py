"""`python -m tests.die_after <sdrpn args>`: the sdrpn CLI, except that rank ``SDRPN_DIE_RANK`` exits with an error
right after writing ``SDRPN_DIE_AFTER`` parts, as a rank killed mid-way would (tests of resumption under torchrun)."""

from __future__ import annotations

import os
import sys

from pipeline.io.resumable import PartStore
from stages.cli import main

if __name__ == "__main__":
    rank, after = int(os.environ["SDRPN_DIE_RANK"]), int(os.environ["SDRPN_DIE_AFTER"])
    write = PartStore.write
    written = []

    def write_then_die(self: PartStore, index: int, table) -> None:
        write(self, index, table)
        written.append(index)
        if self.rank == rank and len(written) >= after:
            print(f"rank {rank}: dying after parts {written}", file=sys.stderr, flush=True)
            os._exit(3)

    PartStore.write = write_then_die  # type: ignore[method-assign]
    main()
