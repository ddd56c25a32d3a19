"""The embedded model's training run: model, optimizer, schedule, the loop, held-out evaluation, saving.

Each step mixes two kinds of sample:
* base view only, ``--turns`` QA turns about different frames of one image;
* base view + a high-resolution crop of the named frame (random margin and jitter) as a second
  image, one QA turn.

The saved directory is a plain ``LlavaForConditionalGeneration`` + processor (fp32 safetensors) and
``training_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.student.train import cosine_lr
from pipeline.teacher.labels import LabelParams
from pipeline.world.generator import GLYPHS, WorldParams, world_vocabulary
from toymodels.embedded import SIZES, log
from toymodels.embedded.data import Batches, Templates, ensure_data, load_data
from toymodels.embedded.losses import (
    AuxHead,
    SinkTarget,
    answer_attention,
    answer_loss,
    box_masks,
    point_loss,
    positions,
    read_loss,
    sink_loss,
)
from toymodels.llava import ToyLlavaSizes, build_toy_llava, save_toy_llava

# The label stage's default rules (sink: norm > sink_norm_factor x the median; fg: a >= tau_fg a_max), which
# the held-out evaluation applies to the label layer. labels.py works on numpy in float64 on the host; here
# the rules run on the device in float32, with torch's median (the lower of the two middle values).
LABEL_RULES = LabelParams()
LR_FLOOR = 0.05  # the cosine ends at this share of --lr


class Trainer:
    """The model, its training-only heads and hooks, and one step's loss."""

    def __init__(
        self,
        args: argparse.Namespace,
        model: nn.Module,
        processor: Any,
        params: WorldParams,
        data: dict[str, torch.Tensor],
        device: torch.device,
        n_img: int,
        easy_idx: torch.Tensor | None = None,
    ):
        self.args, self.model, self.params, self.device = args, model, params, device
        self.tpl = Templates(processor, params, args.turns, n_img).to(device)
        self.batches = Batches(data, self.tpl, params.grid, device)
        self.easy_idx = easy_idx  # the curriculum's images
        self.image = slice(2, 2 + n_img)  # the first image's tokens in every layout ("USER", ":", image)
        hidden = model.config.text_config.hidden_size
        self.aux = AuxHead(hidden, len(params.glyphs), len(params.colours)).to(device)
        self.sink = SinkTarget(
            cells=args.sink_cells,
            layers=args.sink_layers,
            ratio=args.sink_ratio,
            other_ratio=args.other_ratio,
            first_head=args.point_heads,
            n_heads=args.sink_heads,
            mass=args.sink_mass,
            mass_loss=args.sink_mass_loss,
        )
        lm = model.model.language_model
        self.layers, self.rotary = lm.layers, lm.rotary_emb
        self._proj_out: torch.Tensor | None = None
        self._layer_in: torch.Tensor | None = None
        model.model.multi_modal_projector.register_forward_hook(self._grab_proj)
        if args.point_weight > 0 or args.sink_weight > 0:
            self.layers[args.point_layer].register_forward_pre_hook(self._grab_layer_in, with_kwargs=True)

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the model and the auxiliary head."""
        return list(self.model.parameters()) + list(self.aux.parameters())

    def _grab_proj(self, module, inputs, output) -> None:
        self._proj_out = output

    def _grab_layer_in(self, module, args, kwargs) -> None:
        self._layer_in = args[0] if args else kwargs["hidden_states"]

    def forward(self, ids: torch.Tensor, pix: torch.Tensor, keep: torch.Tensor | None = None, **kw):
        """The model on ``ids``; with ``keep``, dropped tokens are masked out and take no position."""
        if keep is None:
            return self.model(input_ids=ids, pixel_values=pix, **kw)
        return self.model(
            input_ids=ids, pixel_values=pix, attention_mask=keep.long(), position_ids=positions(keep), **kw
        )

    def answer_rows_attention(self, ans_pos: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Attention [B, heads, K, L] at ``--point-layer`` of the rows ``--point-rows`` names: those predicting
        the answers (``predict``), the answer tokens' own rows (``answer``: the response rows the dump
        stage reads), or both (K doubles: predict rows first)."""
        layer = self.layers[self.args.point_layer]
        rows = {"predict": ans_pos - 1, "answer": ans_pos, "both": torch.cat([ans_pos - 1, ans_pos])}
        return answer_attention(layer, self.rotary, self._layer_in, rows[self.args.point_rows], keep)

    def _point_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """The target cells [B, K, 4] lined up with ``answer_rows_attention``'s rows."""
        return torch.cat([cells, cells], 1) if self.args.point_rows == "both" else cells

    def _point_loss(self, att: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        return point_loss(att, self._point_cells(cells), self.args.point_heads, self.image, self.params.grid)

    def _read_loss(self, idx: torch.Tensor, hidden_states, keep: torch.Tensor | None) -> torch.Tensor:
        """Read loss of the crop samples ``idx`` at ``--read-layer``: the answer-predicting row's attention on
        the crop tokens that show the named frame's glyph."""
        a, tpl = self.args, self.tpl
        cells = self.batches.crop_read_cells(idx)
        if not cells.any():
            return hidden_states[0].new_zeros(())
        layer = self.layers[a.read_layer]
        att = answer_attention(layer, self.rotary, hidden_states[a.read_layer], tpl.crop_ans - 1, keep)
        crop = slice(self.image.stop, self.image.stop + tpl.n_img)  # the second image's tokens
        return read_loss(att, cells, a.read_heads, crop)

    def _base_glyph(self, idx: torch.Tensor) -> torch.Tensor:
        """Per-cell glyph labels of base views; -100 (ignored) everywhere with --no-aux-base-glyph."""
        lab = self.batches.data["base_glyph"][idx]
        return lab if self.args.aux_base_glyph else torch.full_like(lab, -100)

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total loss of one step and its parts."""
        a, bt, tpl = self.args, self.batches, self.tpl
        d = bt.data
        zero = torch.zeros((), device=self.device)
        pool = self.easy_idx if step < a.curriculum_steps else None
        shape_att = a.point_weight or a.sink_weight
        # base views, several turns
        idx = bt.sample(pool, a.batch)
        ids, pix, glyph, cells = bt.base_batch(idx, a.turns)
        out = self.forward(ids, pix, output_hidden_states=a.sink_weight > 0)
        loss_b, acc_b = answer_loss(out.logits, tpl.base_ans, tpl.glyph_ids[glyph], tpl.eos_id)
        aux_b = self.aux.loss(self._proj_out, self._base_glyph(idx), d["base_colour"][idx])
        att = self.answer_rows_attention(tpl.base_ans) if shape_att else None
        pt = self._point_loss(att, cells) if a.point_weight > 0 else zero
        sk = sink_loss(att, out.hidden_states, self.sink, self.image) if a.sink_weight > 0 else zero
        # base view + crop, one turn
        idx_c = bt.sample(pool, a.crop_batch)
        ids, pix, glyph, cells_c, keep = bt.crop_batch(idx_c, a.crop_mask_prob)
        out = self.forward(ids, pix, keep, output_hidden_states=a.sink_weight > 0 or a.read_weight > 0)
        rd = self._read_loss(idx_c, out.hidden_states, keep) if a.read_weight > 0 else zero
        loss_c, acc_c = answer_loss(out.logits, tpl.crop_ans, tpl.glyph_ids[glyph], tpl.eos_id)
        gl = torch.stack([self._base_glyph(idx_c), d["crop_glyph"][idx_c]], 1).flatten(0, 1)
        cl = torch.stack([d["base_colour"][idx_c], d["crop_colour"][idx_c]], 1).flatten(0, 1)
        aux_c = self.aux.loss(self._proj_out, gl, cl)
        # the per-token head's glyph accuracy on the crops' glyph cells (crop views: every second one)
        tex_acc = self.aux.glyph_accuracy(self._proj_out, d["crop_glyph"][idx_c], slice(1, None, 2))
        att = self.answer_rows_attention(tpl.crop_ans, keep) if shape_att else None
        if a.point_weight > 0:
            pt = pt + self._point_loss(att, cells_c)
        if a.sink_weight > 0:
            sk = sk + sink_loss(att, out.hidden_states, self.sink, self.image)
        total = (
            a.base_weight * loss_b
            + loss_c
            + a.aux_weight * (aux_b + aux_c)
            + a.point_weight * pt
            + a.sink_weight * sk
            + a.read_weight * rd
        )
        stats = {
            "base": loss_b,
            "crop": loss_c,
            "acc_b": acc_b,
            "acc_c": acc_c,
            "aux": aux_b + aux_c,
            "point": pt,
            "sink": sk,
            "read": rd,
            "tex_acc": tex_acc,
        }
        return total, stats

    @torch.no_grad()
    def evaluate(self, held: Batches, batch: int = 128) -> dict[str, Any]:
        """Held-out: base-only and crop accuracy (one turn), and per-layer argmax-in-box of the answer row."""
        model, tpl, a, image = self.model, self.tpl, self.args, self.image
        model.eval()
        d = held.data
        accs_b, accs_c, inbox = [], {"crop": [], "masked": []}, []
        denoised, sink_ratio, spill, point_mass = [], [], [], []
        answer_row: dict[str, list[torch.Tensor]] = {"raw": [], "denoised": [], "argmax": []}
        single = tpl.base[: int(tpl.base_ans[0]) + 2]
        factor = LABEL_RULES.sink_norm_factor
        for s in range(0, held.n, batch):
            idx = torch.arange(s, min(held.n, s + batch), device=self.device)
            t = d["target"][idx][:, None]
            _, pix, _, _ = held.base_batch(idx, 1)
            ids = single[None].repeat(len(idx), 1)
            colour = d["frame_colour"][idx].gather(1, t)
            glyph = d["frame_glyph"][idx].gather(1, t)
            ids[:, tpl.base_col[0]] = tpl.colour_ids[colour[:, 0]]
            ans = int(tpl.base_ans[0])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.amp):
                out = model(input_ids=ids[:, :ans], pixel_values=pix, output_hidden_states=True)
            accs_b.append((out.logits[:, -1].argmax(-1) == tpl.glyph_ids[glyph[:, 0]]).float())
            mask = box_masks(d["frame_cells"][idx].gather(1, t[..., None].expand(-1, -1, 4))[:, 0], held.grid)
            rows = torch.tensor([ans - 1], device=self.device)
            per_layer = []
            for li, layer in enumerate(self.layers):
                att = answer_attention(layer, self.rotary, out.hidden_states[li].float(), rows)
                m = att[:, :, 0, image].mean(1)
                per_layer.append(mask.gather(1, m.argmax(-1, keepdim=True))[:, 0].float())
                if li == a.point_layer:  # the label layer with the sinks zeroed, and the sinks' norm
                    norm = out.hidden_states[li][:, image].float().norm(dim=-1)
                    ratio = norm / norm.median(-1, keepdim=True).values
                    m = m.masked_fill(ratio > factor, 0)
                    denoised.append(mask.gather(1, m.argmax(-1, keepdim=True))[:, 0].float())
                    sink_ratio.append(ratio.max(-1).values)
                    over = ratio > factor
                    over[:, a.sink_cells] = False
                    spill.append(over.float().sum(-1))
                    heads = att[:, : a.point_heads, 0, image]
                    point_mass.append((heads * mask[:, None].float()).sum(-1).mean(-1))
            inbox.append(torch.stack(per_layer, 1))
            # the dumped row: the model's own answer token fed back, as decode + dump do
            own = out.logits[:, -1].argmax(-1, keepdim=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.amp):
                out2 = model(input_ids=torch.cat([ids[:, :ans], own], 1), pixel_values=pix, output_hidden_states=True)
            li = a.point_layer
            att = answer_attention(self.layers[li], self.rotary, out2.hidden_states[li].float(), rows + 1)
            m = att[:, :, 0, image].mean(1)
            norm = out2.hidden_states[li][:, image].float().norm(dim=-1)
            sink = norm / norm.median(-1, keepdim=True).values > factor
            for key, mm in (("raw", m), ("denoised", m.masked_fill(sink, 0))):
                fg = mm >= LABEL_RULES.tau_fg * mm.max(-1, keepdim=True).values
                answer_row[key].append((fg & mask).sum(-1) / fg.sum(-1).clamp(min=1))
            answer_row["argmax"].append(mask.gather(1, m.argmax(-1, keepdim=True))[:, 0].float())
            ans_c = int(tpl.crop_ans[0])
            for key, prob in (("crop", 0.0), ("masked", 1.0)):
                ids_c, pix_c, glyph_c, _, keep = held.crop_batch(idx, prob)
                keep = None if keep is None else keep[:, :ans_c]
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.amp):
                    lg = self.forward(ids_c[:, :ans_c], pix_c, keep).logits[:, -1]
                accs_c[key].append((lg.argmax(-1) == tpl.glyph_ids[glyph_c[:, 0]]).float())
        model.train()
        return {
            "acc_base": torch.cat(accs_b).mean().item(),
            "acc_crop": torch.cat(accs_c["crop"]).mean().item(),
            "acc_crop_masked": torch.cat(accs_c["masked"]).mean().item(),
            "argmax_in_box": [round(v, 3) for v in torch.cat(inbox).mean(0).tolist()],
            "argmax_in_box_without_norm_sinks": round(torch.cat(denoised).mean().item(), 3),
            "max_over_median_norm": round(torch.cat(sink_ratio).mean().item(), 2),
            "other_tokens_over_10x_median": round(torch.cat(spill).mean().item(), 2),
            "point_heads_mass_in_box": round(torch.cat(point_mass).mean().item(), 3),
            # at --point-layer, on the answer token's row (the one the dump reads), the fg rule (0.2 a_max)
            "answer_row_argmax_in_box": round(torch.cat(answer_row["argmax"]).mean().item(), 3),
            "answer_row_fg_precision_raw": round(torch.cat(answer_row["raw"]).mean().item(), 3),
            "answer_row_fg_precision_denoised": round(torch.cat(answer_row["denoised"]).mean().item(), 3),
        }


def warm_start(model: nn.Module, processor: Any, init: Path) -> None:
    """Load the weights of the model in ``init`` into ``model``, whose vocabulary may extend init's.

    The new vocabulary must keep every old word's id (``world_vocabulary`` appends new alphabets). New
    words' input embeddings and output rows start as the mean over the old answer words' rows, so the
    model starts out treating them as answers.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    old_vocab = AutoTokenizer.from_pretrained(init).get_vocab()
    new_vocab = processor.tokenizer.get_vocab()
    moved = {w: i for w, i in old_vocab.items() if new_vocab.get(w) != i}
    if moved:
        raise SystemExit(f"{init}: the new vocabulary moves old words {sorted(moved)[:5]}; append new words instead")
    state = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32).state_dict()
    own = model.state_dict()
    old_answers = [old_vocab[g] for g in GLYPHS if g in old_vocab]
    for key, value in state.items():
        if key not in own:
            raise SystemExit(f"{init}: unexpected weight {key}")
        if value.shape != own[key].shape:
            if value.shape[1:] != own[key].shape[1:] or value.shape[0] > own[key].shape[0]:
                raise SystemExit(f"{init}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
            grown = value.new_empty(own[key].shape)
            grown[: len(value)] = value
            grown[len(value) :] = value[old_answers].mean(0)
            state[key] = grown
    missing = set(own) - set(state)
    if missing:
        raise SystemExit(f"{init}: missing weights {sorted(missing)[:5]}")
    model.load_state_dict(state)


@dataclass
class TrainResult:
    """What a run wrote (``summary`` is ``training_summary.json``) and the total loss of every step."""

    out: Path
    summary: dict[str, Any]
    losses: list[float]


def run(args: argparse.Namespace, sizes: ToyLlavaSizes = SIZES) -> TrainResult | None:
    """Generate (or reuse) the data, train and save, as ``args`` (the script's flags) say; ``sizes`` is the
    architecture (the embedded model's unless a test shrinks it). None for --write-processor / --generate-only."""
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    args.amp = args.amp and device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    params = WorldParams(**json.loads(args.world))
    if args.write_processor:
        _, processor = build_toy_llava(world_vocabulary(params), sizes, seed=args.seed)
        processor.save_pretrained(args.out)
        log(f"wrote the processor to {args.out}")
        return None
    easy = replace(params, min_frames=2, max_frames=3)
    cache = Path(args.cache or f"/tmp/sdrpn-world-cache-{args.seed}-{args.n_images}-{args.n_easy}")
    held_cache = cache.with_name(cache.name + "-heldout")
    # training worlds: 1000+seed (default) and 2000+seed (easy); held-out: 3000+seed
    parts = [(1000 + args.seed, params, args.n_images)] + (
        [(2000 + args.seed, easy, args.n_easy)] if args.n_easy else []
    )
    ensure_data(cache, parts, args.workers, args.crop_margin, args.crop_jitter, sizes.image_size)
    held_parts = [(3000 + args.seed, params, args.n_heldout)]
    ensure_data(held_cache, held_parts, args.workers, args.crop_margin, 0.0, sizes.image_size)
    if args.generate_only:
        return None

    model, processor = build_toy_llava(world_vocabulary(params), sizes, seed=args.seed)
    if args.init:
        warm_start(model, processor, Path(args.init))
        log(f"warm start from {args.init}")
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters; device {device}; amp {args.amp}")
    data = load_data(cache, device)
    held_data = load_data(held_cache, device)
    n_img = (sizes.image_size // sizes.patch_size) ** 2
    n_train = data["n_named"].shape[0]
    easy_idx = torch.arange(args.n_images, n_train, device=device) if args.n_easy else None
    trainer = Trainer(args, model, processor, params, data, device, n_img, easy_idx)
    held = Batches(held_data, trainer.tpl, params.grid, device)
    opt = torch.optim.AdamW(
        trainer.parameters(),
        lr=args.lr,
        weight_decay=args.weight_decay,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )

    total = args.steps
    history: list[dict[str, Any]] = []
    losses: list[torch.Tensor] = []

    def evaluate(step: int, seconds: float) -> None:
        ev = trainer.evaluate(held)
        ev.update(step=step, seconds=seconds)
        history.append(ev)
        log(f"eval {json.dumps(ev)}")

    t0 = time.time()
    step = 0
    calib_at = min(200, args.warmup)
    if args.init:  # where the warm start stands, for the record
        evaluate(0, 0.0)
        t0 = time.time()  # the budget is for training
    while step < total:
        if args.time_budget > 0 and time.time() - t0 > 1.1 * args.time_budget:
            log(f"time budget exceeded at step {step}; stopping")
            break
        if step == calib_at and args.time_budget > 0:
            per = (time.time() - t0) / step
            fit = int(args.time_budget / (per * 1.04))
            total = max(step + 1, min(args.steps, fit))
            log(f"{per * 1000:.1f} ms/step -> {total} steps to fit {args.time_budget:.0f}s")
        lr = cosine_lr(step, total, args.lr, args.warmup, floor=LR_FLOOR, peak_in_warmup=True)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, stats = trainer.step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())  # no .item() here: that would wait for the device every step
        step += 1
        if step % 50 == 0 or step == 1:
            s = {k: round(float(v.detach()), 3) for k, v in stats.items()}
            el = time.time() - t0
            log(f"step {step}/{total} lr {lr:.2e} loss {loss.item():.3f} gn {gn.item():.2f} {s} {el:.0f}s")
        if step % args.eval_every == 0 or step == total:
            evaluate(step, round(time.time() - t0, 1))
    if not history or history[-1]["step"] != step:
        evaluate(step, round(time.time() - t0, 1))
    train_s = time.time() - t0
    out = Path(args.out)
    model.eval().to("cpu").float()
    try:
        save_toy_llava(model, processor, out)
    except Exception as e:  # an older transformers may not save this processor: keep the weights anyway
        log(f"processor not saved ({e!r}); rewrite it with --write-processor")
        model.save_pretrained(out)
    summary = {
        "steps": step,
        "train_seconds": round(train_s, 1),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "parameters": n_params,
        "sizes": asdict(sizes),
        "world": asdict(params),
        "args": vars(args),
        "history": history,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1))
    log(f"saved {out} after {step} steps, {train_s:.0f}s")
    return TrainResult(out, summary, torch.stack(losses).tolist() if losses else [])
