"""``python -m rebased_kernels.train lm ...``: the LM trainer, DDP-ready under ``torchrun``.

``torchrun --nproc_per_node N -m rebased_kernels.train lm --data DIR ...`` starts one process
per GPU (NCCL) or CPU worker (gloo); each takes its rows of every global batch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    from rebased_kernels.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        return cli_main(["train", *argv])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
