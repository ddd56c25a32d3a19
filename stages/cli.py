"""The ``sdrpn`` command: one subcommand per DVC stage, each imported only when it runs.

A stage's module is imported on demand so that ``sdrpn world`` or ``sdrpn label`` never pays for (or depends
on) torch and transformers, which only the model stages need. ``sdrpn --help`` imports every stage to show
its short help. tests/test_dvc_deps.py reads :data:`COMMANDS` to find the code behind each dvc.yaml stage.
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:function" of its click command; adding a stage is one line here
COMMANDS: dict[str, str] = {
    "world": "stages.world:world",
    "prepare": "stages.prepare:prepare",
    "decode": "stages.decode:decode",
    "dump": "stages.dump:dump",
    "label": "stages.label:label",
    "label-report": "stages.label_report:label_report",
    "train": "stages.train:train",
    "evaluate": "stages.evaluate:evaluate",
    "release": "stages.release:release",
    "benchmarks": "stages.benchmarks:benchmarks",
    "inspect": "stages.inspect:inspect",
    "report": "stages.report:report",
    "import-authors-labels": "stages.import_authors_labels:import_authors_labels",
    "select-heads": "stages.select_heads:select_heads_cmd",
    "launch": "stages.launch:launch",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are named in a ``{name: "module:function"}`` map and imported on use."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        # pipeline order, not click's alphabetical one
        return [*self.lazy_commands, *sorted(set(super().list_commands(ctx)) - set(self.lazy_commands))]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_commands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup, lazy_commands=COMMANDS)
def main() -> None:
    """SD-RPN pipeline stages (run them through `dvc repro`, or one by one)."""


if __name__ == "__main__":
    main()
