"""The dump stage's work: captured attention and norms for every sample, written to the attention store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.io.attention_store import AttentionStoreWriter
from pipeline.io.images import load_images
from pipeline.models.base import ModelAdapter
from pipeline.teacher.attention_capture import capture_attention
from pipeline.teacher.decode import context_skips
from pipeline.teacher.params import DumpParams


def join_responses(manifest: pa.Table, responses: pa.Table) -> list[list[int]]:
    """Response token ids in manifest order; a manifest sample without a response is an error naming it."""
    by_id = dict(
        zip(
            responses.column("sample_id").to_pylist(),
            responses.column("response_token_ids").to_pylist(),
            strict=True,
        )
    )
    ids = manifest.column("sample_id").to_pylist()
    missing = [s for s in ids if s not in by_id]
    if missing:
        raise ValueError(f"responses: no response for sample(s) {missing[:5]} ({len(missing)} in all); rerun decode")
    return [by_id[s] for s in ids]


def select_samples(adapter: ModelAdapter, manifest: pa.Table, responses: pa.Table) -> tuple[pa.Table, dict[str, str]]:
    """The manifest rows the dump can run (manifest order), and ``{sample_id: reason}`` for those it leaves out.

    Left out: the samples decode skipped (their ``skip_reason``), and any whose prompt plus its response tokens
    does not fit the model's context (:func:`~pipeline.teacher.decode.context_skips`; only responses made with
    another model or context can get there). Needs the tokenizer and the view geometry only, no weights.
    """
    response_ids = join_responses(manifest, responses)
    ids = manifest.column("sample_id").to_pylist()
    decoded = {}
    if "skip_reason" in responses.column_names:  # responses from before the column have no skips
        decoded = {
            s: r
            for s, r in zip(
                responses.column("sample_id").to_pylist(), responses.column("skip_reason").to_pylist(), strict=True
            )
            if r is not None
        }
    skipped = {s: f"decode: {decoded[s]}" for s in ids if s in decoded}
    rest = [i for i, s in enumerate(ids) if s not in decoded]
    questions = manifest.column("question").to_pylist()
    sizes = list(zip(manifest.column("width").to_pylist(), manifest.column("height").to_pylist(), strict=True))
    reasons = context_skips(
        adapter,
        [questions[i] for i in rest],
        [sizes[i] for i in rest],
        [len(response_ids[i]) for i in rest],
        what="response tokens",
    )
    skipped.update({ids[i]: r for i, r in zip(rest, reasons, strict=True) if r is not None})
    keep = [i for i, s in enumerate(ids) if s not in skipped]
    return manifest.take(keep), {s: skipped[s] for s in ids if s in skipped}


def max_visual_tokens(adapter: ModelAdapter, manifest: pa.Table) -> int:
    """Largest visual grid over the manifest, so per-sample grids fit one padded array."""
    sizes = zip(manifest.column("width").to_pylist(), manifest.column("height").to_pylist(), strict=True)
    return max(h * w for h, w in {adapter.visual_grid(w, h) for w, h in sizes})


def padding_masks(adapter: ModelAdapter, manifest: pa.Table) -> dict[tuple[int, int], np.ndarray]:
    """``{(width, height): (grid_h * grid_w,) bool}``: the tokens over the padding of the view, per image size.

    From the adapter's ``padding_tokens(width, height)`` when it has one; sizes it answers None for (a view
    without padding) are left out, so an empty dict means the store needs no ``known_bg`` array.
    """
    fn = getattr(adapter, "padding_tokens", None)
    if not callable(fn):
        return {}
    out = {}
    for size in sorted(
        set(zip(manifest.column("width").to_pylist(), manifest.column("height").to_pylist(), strict=True))
    ):
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
) -> None:
    """Fill every pending range of ``writer`` (finished chunks of an interrupted run are skipped).

    A writer whose store has the ``known_bg`` array (see :func:`padding_masks`) gets each sample's padding tokens.
    """
    ids = manifest.column("sample_id").to_pylist()
    refs = manifest.column("image").to_pylist()
    questions = manifest.column("question").to_pylist()
    response_ids = join_responses(manifest, responses)
    sizes = list(zip(manifest.column("width").to_pylist(), manifest.column("height").to_pylist(), strict=True))
    masks = padding_masks(adapter, manifest) if writer.has_known_bg else None
    pending = writer.pending_ranges()
    bar = tqdm(total=sum(hi - lo for lo, hi in pending), desc="dump", unit="sample", disable=not progress)
    for lo, hi in pending:
        for start in range(lo, hi, params.batch_size):
            stop = min(start + params.batch_size, hi)
            images = load_images(refs[start:stop], ids[start:stop])
            prompts = [adapter.render_prompt(q) for q in questions[start:stop]]
            batch = adapter.build_batch(images, prompts, response_ids[start:stop])
            cap = capture_attention(
                adapter, batch, params.layers, params.per_head, params.include_eos, params.include_last_prompt
            )
            writer.write(
                start,
                ids[start:stop],
                np.asarray(batch.grids, dtype=np.int32),
                cap.n_rows.cpu().numpy().astype(np.int32),
                cap.attention.cpu().numpy(),
                cap.hidden_norm.cpu().numpy(),
                None if masks is None else known_bg_block(masks, sizes[start:stop], batch.grids),
            )
            bar.update(stop - start)
    bar.close()
    writer.finalize()
