"""What every stage entry point shares: its CLI options, its output locks and naming the inputs of an artifact."""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import click

from pipeline.distributed import env_info
from pipeline.io.contracts import fingerprint
from pipeline.io.locks import OutputLocked, atomic_path, output_lock

F = TypeVar("F", bound=Callable[..., object])

params_option = click.option(
    "--params",
    "params_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="parameters file (DVC's params.yaml)",
)
progress_option = click.option("--progress/--no-progress", default=True, help="show a progress bar")
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="override one key of this stage's params section (VALUE is YAML), e.g. --set sink_method=none",
)


def report_skips(stage: str, skipped: dict[str, str], where: str | Path, shown: int = 5) -> None:
    """Name the first skipped samples and why on stderr; every one is recorded in ``where``."""
    for sid, reason in list(skipped.items())[:shown]:
        click.echo(f"{stage}: skipped {sid}: {reason}", err=True)
    if len(skipped) > shown:
        click.echo(f"{stage}: ... and {len(skipped) - shown} more, each with its reason in {where}", err=True)


def fingerprints(*paths: str | Path) -> dict[str, str]:
    """{path: md5} for the inputs an artifact was made from."""
    return {str(p): fingerprint(p) for p in paths}


def model_fingerprint(model_dir: str | Path) -> str:
    """Cheap identity of a checkpoint directory: config, and the names and sizes of its weight files."""
    d = Path(model_dir)
    h = hashlib.md5((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors*")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


@contextmanager
def writing(*outputs: str | os.PathLike | None, work_dirs: tuple[str | os.PathLike, ...] = ()) -> Iterator[None]:
    """Hold the lock of every output (``None`` skipped) and work dir for the stage's whole run.

    A second ``sdrpn`` run writing one of them, or a work dir (PartStore) in use, stops at once with a one-line
    error naming it (exit code 1) instead of interleaving with this one.
    """
    try:
        with output_lock(*(p for p in outputs if p is not None)), output_lock(*work_dirs, kind="work dir"):
            yield
    except OutputLocked as exc:
        raise click.ClickException(str(exc)) from None


def writes(*param_names: str) -> Callable[[F], F]:
    """Decorate a stage's function (under its click decorators) to hold :func:`writing` on these parameters.

    ``@writes("labels_out")`` locks the path given as ``labels_out`` before the stage reads anything and until
    it returns, so its whole run is one writer's. A decorator rather than a ``with`` block in each body, so the
    stage bodies stay as they were.
    """

    def decorate(fn: F) -> F:
        unknown = set(param_names) - set(inspect.signature(fn).parameters)
        if unknown:
            raise TypeError(f"{fn.__name__} has no parameter(s) {sorted(unknown)} to lock")

        @functools.wraps(fn)
        def run(*args, **kwargs):
            # under torchrun rank 0 alone writes the outputs, so it alone locks them
            outputs = [kwargs.get(name) for name in param_names] if env_info().is_main else []
            with writing(*outputs):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


def write_text(path: Path, text: str) -> None:
    """Write a small output (metrics JSON) through a unique temp name, so readers never see half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
