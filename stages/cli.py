"""The ``sdrpn`` command: one subcommand per DVC stage."""

from __future__ import annotations

import click

from stages.decode import decode
from stages.dump import dump
from stages.evaluate import evaluate
from stages.inspect import inspect
from stages.label import label
from stages.label_report import label_report
from stages.prepare import prepare
from stages.train import train
from stages.world import world


@click.group()
def main() -> None:
    """SD-RPN pipeline stages (run them through `dvc repro`, or one by one)."""


for command in (world, prepare, decode, dump, label, label_report, train, evaluate, inspect):
    main.add_command(command)

if __name__ == "__main__":
    main()
