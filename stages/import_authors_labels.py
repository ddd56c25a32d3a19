"""import-authors-labels: the SD-RPN authors' released pseudo-label pickle -> an attention store (not a DVC stage).

Then ``sdrpn label STORE_OUT labels.parquet --params <file>`` turns the store into the authors' labels; the
params and the whole recipe are in docs/authors-label-rules.md ("Importing the authors' file").
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.io.attention_store import MIN_CHUNK_SAMPLES
from pipeline.io.authors_import import AuthorsImportError, UnsafePickleError, import_authors_file, write_problems_jsonl
from stages.common import fingerprints, writes


def _grid(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    h, sep, w = value.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
        raise click.BadParameter(f"expected HxW such as 24x24, got {value!r}", param_hint="--grid")
    return int(h), int(w)


@click.command("import-authors-labels")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("store_out", type=click.Path(path_type=Path))
@click.option("--grid", "grid", default=None, metavar="HxW", help="token grid (default: from the first record)")
@click.option("--model-id", default="", help="model the authors' maps came from, recorded in the store attrs")
@click.option(
    "--skip-invalid",
    "skips_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="skip invalid records instead of failing, writing each one's problems to this JSONL file",
)
@click.option(
    "--records-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="also write the imported samples as records JSONL for `prepare` (sample ids = the store's)",
)
@click.option("--chunk-samples", default=MIN_CHUNK_SAMPLES, show_default=True, help="zarr chunk along samples")
@writes("store_out", "skips_out", "records_out")
def import_authors_labels(
    file: Path,
    store_out: Path,
    grid: str | None,
    model_id: str,
    skips_out: Path | None,
    records_out: Path | None,
    chunk_samples: int,
) -> None:
    """Write the attention store STORE_OUT from the authors' pseudo-label pickle FILE (read without running code)."""
    try:
        result = import_authors_file(
            file,
            store_out,
            grid=_grid(grid),
            skip_invalid=skips_out is not None,
            model_id=model_id,
            inputs=fingerprints(file),
            chunk_samples=chunk_samples,
            records_out=records_out,
        )
    except (AuthorsImportError, UnsafePickleError) as e:
        raise click.ClickException(str(e)) from None
    if skips_out is not None:
        write_problems_jsonl(result.problems, skips_out)
    n_skipped = result.n_records - result.n_imported
    h, w = result.grid
    click.echo(
        f"import-authors-labels: {result.n_imported} of {result.n_records} records ({h}x{w} grid, pseudo-layers "
        f"{result.layers}) -> {store_out}" + (f"; {n_skipped} skipped -> {skips_out}" if skips_out else "")
    )
