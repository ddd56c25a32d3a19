"""The dump stage's work: captured attention and norms for every sample, written to the attention store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from pipeline.distributed import DistInfo
from pipeline.io.attention_store import AttentionStoreWriter
from pipeline.io.images import load_images
from pipeline.models.base import ModelAdapter
from pipeline.teacher.attention_capture import capture_attention
from pipeline.teacher.decode import context_skips
from pipeline.teacher.params import DumpParams

# manifest rows whose prompts are measured at once by select_samples: bounds its Python lists at any manifest size
SELECT_ROWS = 1024


def response_index(manifest: pa.Table, responses: pa.Table) -> pa.ChunkedArray:
    """Row of each manifest sample's response in ``responses`` (manifest order); a sample without one is an error."""
    index = pc.index_in(manifest.column("sample_id"), value_set=responses.column("sample_id").combine_chunks())
    if index.null_count:
        missing = manifest.column("sample_id").filter(pc.is_null(index))
        raise ValueError(
            f"responses: no response for sample(s) {missing.slice(0, 5).to_pylist()} ({len(missing)} in all); "
            "rerun decode"
        )
    return index


def _column(table: pa.Table, name: str, start: int, stop: int) -> list:
    return table.column(name).slice(start, stop - start).to_pylist()


def select_samples(adapter: ModelAdapter, manifest: pa.Table, responses: pa.Table) -> tuple[pa.Table, dict[str, str]]:
    """The manifest rows the dump can run (manifest order), and ``{sample_id: reason}`` for those it leaves out.

    Left out: the samples decode skipped (their ``skip_reason``), and any whose prompt plus its response tokens
    does not fit the model's context (:func:`~pipeline.teacher.decode.context_skips`; only responses made with
    another model or context can get there). Needs the tokenizer and the view geometry only, no weights. The
    manifest is measured :data:`SELECT_ROWS` rows at a time.
    """
    index = response_index(manifest, responses)
    n_tokens = pc.list_value_length(responses.column("response_token_ids"))
    # responses from before the skip_reason column have no skips
    decoded = responses.column("skip_reason") if "skip_reason" in responses.column_names else None
    keep = np.ones(manifest.num_rows, dtype=bool)
    skipped: dict[str, str] = {}
    for start in range(0, manifest.num_rows, SELECT_ROWS):
        stop = min(start + SELECT_ROWS, manifest.num_rows)
        rows = index.slice(start, stop - start)
        ids = _column(manifest, "sample_id", start, stop)
        reasons: list[str | None] = [None] * len(ids)
        if decoded is not None:
            reasons = [None if r is None else f"decode: {r}" for r in decoded.take(rows).to_pylist()]
        rest = [i for i, r in enumerate(reasons) if r is None]
        questions = _column(manifest, "question", start, stop)
        widths, heights = _column(manifest, "width", start, stop), _column(manifest, "height", start, stop)
        sizes = list(zip(widths, heights, strict=True))
        lengths = n_tokens.take(rows).to_pylist()
        fits = context_skips(
            adapter,
            [questions[i] for i in rest],
            [sizes[i] for i in rest],
            [lengths[i] for i in rest],
            what="response tokens",
        )
        for i, r in zip(rest, fits, strict=True):
            reasons[i] = r
        for i, r in enumerate(reasons):
            if r is not None:
                skipped[ids[i]] = r
                keep[start + i] = False
    return (manifest if keep.all() else manifest.filter(pa.array(keep))), skipped  # no copy when all are kept


def image_sizes(manifest: pa.Table) -> list[tuple[int, int]]:
    """The distinct ``(width, height)`` of the manifest's images, sorted."""
    sizes = manifest.select(["width", "height"]).group_by(["width", "height"]).aggregate([])
    return sorted(zip(sizes.column("width").to_pylist(), sizes.column("height").to_pylist(), strict=True))


def max_visual_tokens(adapter: ModelAdapter, manifest: pa.Table) -> int:
    """Largest visual grid over the manifest, so per-sample grids fit one padded array."""
    return max(h * w for h, w in {adapter.visual_grid(w, h) for w, h in image_sizes(manifest)})


def padding_masks(adapter: ModelAdapter, manifest: pa.Table) -> dict[tuple[int, int], np.ndarray]:
    """``{(width, height): (grid_h * grid_w,) bool}``: the tokens over the padding of the view, per image size.

    From the adapter's ``padding_tokens(width, height)`` when it has one; sizes it answers None for (a view
    without padding) are left out, so an empty dict means the store needs no ``known_bg`` array.
    """
    fn = getattr(adapter, "padding_tokens", None)
    if not callable(fn):
        return {}
    out = {}
    for size in image_sizes(manifest):
        mask = fn(*size)
        if mask is not None:
            out[size] = np.asarray(mask, dtype=bool).reshape(-1)
    return out


def known_bg_block(masks: dict[tuple[int, int], np.ndarray], sizes, grids) -> np.ndarray:
    """(n, max grid area) bool rows for one batch: each sample's padding mask (all False when none is known)."""
    grids = np.asarray(grids, dtype=np.int64).reshape(-1, 2)
    out = np.zeros((len(grids), int((grids[:, 0] * grids[:, 1]).max())), dtype=bool)
    for i, (size, (gh, gw)) in enumerate(zip(sizes, grids, strict=True)):
        mask = masks.get(tuple(size))
        if mask is None:
            continue
        if mask.shape != (gh * gw,):
            raise ValueError(f"padding_tokens{tuple(size)} gave {mask.shape[0]} tokens, the grid has {gh} x {gw}")
        out[i, : gh * gw] = mask
    return out


def dump_attention(
    adapter: ModelAdapter,
    manifest: pa.Table,
    responses: pa.Table,
    params: DumpParams,
    writer: AttentionStoreWriter,
    progress: bool = True,
    info: DistInfo | None = None,
    finalize: bool = True,
) -> None:
    """Fill the pending shards of ``writer`` (finished shards of an interrupted run are skipped), then finalize.

    ``info``: only the shards this rank owns (:meth:`~pipeline.distributed.DistInfo.owns`); ``finalize=False``
    leaves the store unfinished (under torchrun rank 0 finalizes once every rank is done). The manifest is read
    one batch at a time, and the writer holds one shard. A writer whose store has the ``known_bg`` array (see
    :func:`padding_masks`) gets each sample's padding tokens.
    """
    info = info or DistInfo()
    index = response_index(manifest, responses)
    tokens = responses.column("response_token_ids")
    masks = padding_masks(adapter, manifest) if writer.has_known_bg else None
    ranges = [writer.unit_range(u) for u in writer.pending_units() if info.owns(u)]
    bar = tqdm(
        total=sum(hi - lo for lo, hi in ranges), desc="dump", unit="sample", disable=not (progress and info.is_main)
    )
    for lo, hi in ranges:
        for start in range(lo, hi, params.batch_size):
            stop = min(start + params.batch_size, hi)
            ids = _column(manifest, "sample_id", start, stop)
            images = load_images(_column(manifest, "image", start, stop), ids)
            prompts = [adapter.render_prompt(q) for q in _column(manifest, "question", start, stop)]
            response_ids = tokens.take(index.slice(start, stop - start)).to_pylist()
            batch = adapter.build_batch(images, prompts, response_ids)
            cap = capture_attention(
                adapter, batch, params.layers, params.per_head, params.include_eos, params.include_last_prompt
            )
            sizes = zip(_column(manifest, "width", start, stop), _column(manifest, "height", start, stop), strict=True)
            writer.write(
                start,
                ids,
                np.asarray(batch.grids, dtype=np.int32),
                cap.n_rows.cpu().numpy().astype(np.int32),
                cap.attention.cpu().numpy(),
                cap.hidden_norm.cpu().numpy(),
                None if masks is None else known_bg_block(masks, list(sizes), batch.grids),
            )
            bar.update(stop - start)
    bar.close()
    if finalize:
        writer.finalize()
