"""launch: run a model stage as one process, or under torchrun when params.yaml's ``compute`` asks for more.

dvc.yaml runs ``sdrpn launch --nnodes N --nproc-per-node P --rdzv-endpoint HOST:PORT <stage> <args>``. With one
node of one process the stage runs right here, in this process: torchrun's launcher would only add its start-up
(about 2 s of importing torch per stage). Otherwise this process becomes ``python -m torch.distributed.run
--nnodes N --nproc_per_node P --rdzv_backend c10d --rdzv_endpoint HOST:PORT -m stages.cli <stage> <args>``
(torch's ``torchrun``, its workers this same interpreter, so nothing depends on PATH). Imports no torch itself.
"""

from __future__ import annotations

import os
import sys

import click


def torchrun_argv(nnodes: str, nproc_per_node: str, rdzv_endpoint: str, stage_args: list[str]) -> list[str]:
    """The torchrun command line for a stage, launched from this interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        nnodes,
        "--nproc_per_node",
        nproc_per_node,
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        rdzv_endpoint,
        "-m",
        "stages.cli",
        *stage_args,
    ]


@click.command(
    "launch", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}, add_help_option=True
)
@click.option("--nnodes", default="1", show_default=True, help="nodes (torchrun's --nnodes, e.g. 2 or 1:4)")
@click.option("--nproc-per-node", default="1", show_default=True, help="processes per node (torchrun's)")
@click.option("--rdzv-endpoint", default="localhost:0", show_default=True, help="rendezvous host:port (c10d)")
@click.argument("stage_args", nargs=-1, required=True, type=click.UNPROCESSED)
def launch(nnodes: str, nproc_per_node: str, rdzv_endpoint: str, stage_args: tuple[str, ...]) -> None:
    """Run `sdrpn STAGE ARGS...` as one process, or under torchrun for several processes or nodes."""
    if str(nnodes) == "1" and str(nproc_per_node) == "1":
        from stages.cli import main

        main.main(args=list(stage_args), prog_name="sdrpn")  # exits with the stage's own status
    argv = torchrun_argv(str(nnodes), str(nproc_per_node), str(rdzv_endpoint), list(stage_args))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
