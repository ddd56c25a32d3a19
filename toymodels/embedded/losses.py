"""Training objectives of the embedded model.

Loss is on the answer tokens (glyph and ``</s>``). Training-only extras, never saved: a per-token auxiliary
head on the projector output (glyph and frame colour of every token cell), a "point" loss that asks some
heads of one decoder layer to put the answer rows' attention on the named frame's tokens, a "sink" loss
that plants large-norm attention sinks, and a "read" loss that points heads at the crop's glyph tokens.
The attention of the answer rows is recomputed from a layer's input with the pipeline's own query-key
arithmetic (``pipeline.models.attention_math``), so it is what the dump stage measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from pipeline.models.attention_math import attention_probs, attention_scores

# ----------------------------------------------------------------------------- attention of answer rows


def positions(keep: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] of a sequence whose dropped tokens (``keep`` False) take no position."""
    return (keep.long().cumsum(-1) - 1).clamp(min=0)


def answer_attention(
    layer: nn.Module, rotary: nn.Module, hidden_in: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention probabilities [B, heads, len(rows), L] of query ``rows`` at decoder ``layer`` (causal).

    ``hidden_in`` is the layer's input (the residual stream before its input norm). ``keep`` [B, L]
    marks the tokens that exist (dropped crop tokens are masked out and skipped by the positions,
    as in the forward pass); None = all.
    """
    B, L, _ = hidden_in.shape
    attn = layer.self_attn
    hd = attn.head_dim
    h = layer.input_layernorm(hidden_in)
    q = attn.q_proj(h[:, rows]).view(B, len(rows), -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(B, L, -1, hd).transpose(1, 2)
    pos = torch.arange(L, device=hidden_in.device)[None].expand(B, -1) if keep is None else positions(keep)
    cos, sin = rotary(hidden_in, pos)
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos[:, :, rows] + rotate_half(q) * sin[:, :, rows]  # the Llama rotary embedding
    k = k * cos + rotate_half(k) * sin
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    hidden = (torch.arange(L, device=hidden_in.device)[None, :] > rows[:, None])[None, None]
    if keep is not None:
        hidden = hidden | ~keep[:, None, None, :]
    return attention_probs(attention_scores(q, k, attn.scaling), hidden)


def box_masks(cells: torch.Tensor, grid: int) -> torch.Tensor:
    """[..., 4] (r0, c0, r1, c1) cell boxes -> [..., grid*grid] bool masks."""
    r = torch.arange(grid, device=cells.device)
    rin = (r >= cells[..., 0:1]) & (r < cells[..., 2:3])
    cin = (r >= cells[..., 1:2]) & (r < cells[..., 3:4])
    return (rin[..., :, None] & cin[..., None, :]).flatten(-2)


# ----------------------------------------------------------------------------- answer and auxiliary head


def answer_loss(
    logits: torch.Tensor, ans_pos: torch.Tensor, target: torch.Tensor, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of the answer word ``target`` [B, K] (predicted at ans_pos - 1) and of </s> (at ans_pos, weight 0.1);
    and the answer word's accuracy."""
    lg = logits[:, ans_pos - 1].float()
    loss = F.cross_entropy(lg.flatten(0, 1), target.flatten())
    eos = logits[:, ans_pos].float().flatten(0, 1)
    loss = loss + 0.1 * F.cross_entropy(eos, torch.full_like(target.flatten(), eos_id))
    acc = (lg.argmax(-1) == target).float().mean()
    return loss, acc


class AuxHead(nn.Module):
    """Per-token glyph and colour classifier on the projector output (training only, never saved).

    Glyph classes: 0 = none, then the world's alphabet; colour classes: 0 = none, the named colours, grey.
    """

    def __init__(self, hidden: int, n_glyphs: int, n_colours: int):
        super().__init__()
        self.n_glyph = n_glyphs + 1
        self.linear = nn.Linear(hidden, self.n_glyph + n_colours + 2)

    def forward(self, proj_out: torch.Tensor) -> torch.Tensor:
        return self.linear(proj_out.float())

    def loss(self, proj_out: torch.Tensor, glyph_lab: torch.Tensor, colour_lab: torch.Tensor) -> torch.Tensor:
        """Per-cell glyph and colour CE; labels [n_views, n_cells] (glyph -100 = ignored).

        The glyph term is averaged over the cells that hold a glyph (a mean over all cells would
        drown them: ~1 in 20 cells holds one), plus a light glyph-or-not term over every cell.
        """
        out = self(proj_out).flatten(0, 1)  # [n_views * n_cells, C]
        ng = self.n_glyph
        glyph_lab, colour_lab = glyph_lab.flatten(), colour_lab.flatten()
        has = glyph_lab > 0
        lg = F.cross_entropy(out[has, :ng], glyph_lab[has]) if has.any() else out.sum() * 0
        lp = F.cross_entropy(out[:, :ng], glyph_lab) if (glyph_lab >= 0).any() else out.sum() * 0
        lc = F.cross_entropy(out[:, ng:], colour_lab)
        return lg + 0.2 * lp + lc

    @torch.no_grad()
    def glyph_accuracy(
        self, proj_out: torch.Tensor, glyph_lab: torch.Tensor, views: slice = slice(None)
    ) -> torch.Tensor:
        """Glyph accuracy of ``views`` of ``proj_out`` [n_views, n_cells, hidden] on the cells that hold one."""
        pred = self(proj_out)[views, :, : self.n_glyph].argmax(-1)
        return (pred == glyph_lab)[glyph_lab > 0].float().mean()


# ----------------------------------------------------------------------------- attention losses


def point_loss(att: torch.Tensor, cells: torch.Tensor, n_heads: int, image: slice, grid: int) -> torch.Tensor:
    """-log(attention mass on the named frame's tokens) of the rows of ``att`` [B, heads, K, L], first
    ``n_heads`` heads; ``image`` are the image's token positions, ``cells`` [B, K, 4] the frame's cell box."""
    img = att[:, :n_heads, :, image]  # [B, h, K, grid * grid]
    mask = box_masks(cells, grid).float()  # [B, K, grid * grid]
    mass = (img * mask[:, None]).sum(-1)
    return -(mass + 1e-6).log().mean()


@dataclass(frozen=True)
class SinkTarget:
    """The planted sinks: which visual tokens, where their norm is large, which heads attend to them."""

    cells: list[int]  # visual tokens (row-major) that become sinks
    layers: list[int]  # decoder layers whose inputs carry the sinks' large norm
    ratio: float  # sink norm / median visual-token norm (at least)
    other_ratio: float  # norm / median of every other token (at most)
    first_head: int  # heads first_head .. first_head + n_heads - 1 attend to the sinks
    n_heads: int
    mass: float  # their attention mass on the sinks
    mass_loss: str = "sq"  # "sq": 10 (mass - target)^2; "log": (log mass - log target)^2


def sink_loss(
    att: torch.Tensor, hidden_states: tuple[torch.Tensor, ...], sink: SinkTarget, image: slice
) -> torch.Tensor:
    """Plant attention sinks on the image's ``sink.cells``, as large MLLMs grow them.

    A hinge asks their residual-stream norm at the inputs of ``sink.layers`` to be >= ``sink.ratio``
    x the median visual-token norm, and the sink heads to put ``sink.mass`` of the rows' attention
    ``att`` [B, heads, K, L] on them.
    """
    device = att.device
    cells = torch.tensor(sink.cells, device=device)
    loss = att.new_zeros(())
    others = torch.ones(image.stop - image.start, dtype=torch.bool, device=device)
    others[cells] = False
    for k in sink.layers:
        norm = hidden_states[k][:, image].float().norm(dim=-1)  # [B, n_img]
        log_ratio = norm.log() - norm.median(-1).values.log()[:, None]
        loss = loss + F.relu(math.log(sink.ratio) - log_ratio[:, cells]).mean()
        # every other token stays far below the detector's threshold (no spill onto frames)
        loss = loss + F.relu(log_ratio[:, others] - math.log(sink.other_ratio)).mean() * 10
    heads = att[:, sink.first_head : sink.first_head + sink.n_heads]
    mass = heads[..., image.start + cells].sum(-1)  # [B, h, K]
    if sink.mass_loss == "log":  # keeps a gradient where a row gives the sinks almost nothing
        return loss + ((mass + 1e-4).log() - math.log(sink.mass)).pow(2).mean()
    return loss + ((mass - sink.mass) ** 2).mean() * 10


def read_loss(att: torch.Tensor, cells: torch.Tensor, n_heads: int, image: slice) -> torch.Tensor:
    """-log(attention mass of the rows of ``att`` [B, heads, K, L] on the ``cells`` [B, n_img] of ``image``),
    first ``n_heads`` heads, over the samples with at least one such cell."""
    valid = cells.any(-1)
    crop = att[:, :n_heads, :, image]  # [B, h, K, n_img]
    mass = (crop * cells[:, None, None].float()).sum(-1)
    return -(mass[valid] + 1e-6).log().mean()
