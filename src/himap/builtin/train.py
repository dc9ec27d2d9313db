"""Train the built-in model: a small LLaVA (CLIP tower + projector + Llama decoder) from scratch
on the synthetic benchmark (himap.builtin.synthetic), on CPU, reproducibly from a seed.

The model is a stock `LlavaForConditionalGeneration` and is saved with `save_pretrained` next to
the offline processor (himap.builtin.offline_processor), so it loads through
AutoModelForImageTextToText / AutoProcessor like any llava-hf checkpoint.

Design choices, for a model that learns within an hour on two shared CPU cores. Each answers
a failure measured in a pilot run (the README's built-in section lists them):
- the vision tower has one CLIP layer and the features are its input (vision_feature_layer=-2,
  the patch embeddings after the pre-layernorm), so each image token describes one 16 x 16 patch
  and an object's information starts in exactly one image token;
- the tower's position embeddings are zero and frozen, so every background patch gives the same
  feature (with them, each background patch was a different random vector after the layer
  norm, and pilots never used the image);
- initializer_range 0.06 instead of HF's 0.02 (tuned for width ~4096): ~3x faster here;
- an auxiliary linear classifier reads each object's shape and colour from its image token
  (`aux_weight`, the head is discarded): without it colours were learnt but shapes stayed at
  chance, since the answers' gradient reaches the tower only through attention over 144 tokens;
- curriculum: early images draw the object many times (`copies_start`, fading to one copy at
  `copies_until` of the run), so the answer first shows in many image tokens;
- POPE answers depend on an interaction (the question's attribute x the image's), which has no
  first-order gradient and stalled at 50% for thousands of steps. Four aids give each half of
  the circuit its own signal: a linear probe at the answer position, half-way up the decoder,
  reads the value the question names and the image's value of that attribute
  (`query_aux_weight`; discarded after training), so the later layers only compare the two;
  each batch holds every image twice with every POPE answer flipped (`pope_pairs`), so the
  question is the only difference between a "yes" and a "no"; blank training images asked POPE
  questions (all "no": "an object is in view" then predicts "yes"; `pope_blank`); negatives
  naming never-drawn shapes/colours (the question alone predicts "no"; `pope_unseen`);
- the mix weights multiple choice highest (`mix`, mc 0.45): with shuffled options (the option
  holding the image's value must be looked up in the prompt) and mc at 0.25, mc stayed at chance
  for all 2,600 steps of a run; at 0.45 it left chance after ~1,200 steps and reached 100%;
- several questions per training image (`turns`, a multi-turn conversation, the caption last),
  so each pass over 144 image tokens trains several answers; the test is single-turn; the gold
  slot of each turn is random (an index cycle let later turns be guessed from earlier ones);
- the loss is on the answer tokens only (and </s>); one-word answers are an easier aid;
- warm-up then cosine learning-rate decay; periodic held-out accuracy on a fixed validation set
  (single-turn, one copy; scored by teacher forcing, which equals greedy decoding's exact
  match); the best checkpoint by held-out accuracy is kept (on ties, the later one).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

from himap.builtin import synthetic
from himap.builtin.offline_processor import (
    IMAGE,
    build_processor,
    chat_prompt,
    pixel_values,
)


@dataclass
class ModelConfig:
    """Sizes of the built-in model."""

    vision_hidden: int = 64  # CLIP tower width
    vision_layers: int = 1  # CLIP encoder layers (features are taken before the last one)
    vision_heads: int = 2  # CLIP attention heads
    text_hidden: int = 64  # Llama width
    text_intermediate: int = 256  # Llama MLP width
    text_layers: int = 10  # Llama decoder layers (>= 9 so that HiMAP's K2 = 8 applies)
    text_heads: int = 4  # Llama query heads
    text_kv_heads: int = 2  # Llama key/value heads (grouped-query attention)
    init_std: float = 0.06  # initializer_range of both towers (HF's 0.02 suits width ~4096; 0.06 learnt ~3x faster here)


@dataclass
class TrainConfig:
    """One training run; `himap train-default` derives its flags from these fields."""

    out_dir: str = "runs/builtin"  # checkpoints (best/, last/), log.jsonl, summary.json
    seed: int = 0  # model initialisation and data stream (same seed, same run)
    steps: int = 2600  # optimiser steps (the learning-rate schedule spans them)
    batch_size: int = 16  # training images (conversations) per step
    lr: float = 2e-3  # peak learning rate (AdamW)
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05  # final learning rate as a fraction of the peak
    weight_decay: float = 0.01  # AdamW decoupled weight decay (matrices only)
    grad_clip: float = 1.0  # gradient-norm clipping
    mix: dict = field(default_factory=lambda: {"mc": 0.45, "pope": 0.3, "caption": 0.05, "word": 0.2})  # kind weights of the training stream
    copies_start: int = 12  # curriculum: each object drawn this many times at step 0 ...
    copies_until: float = 0.3  # ... fading linearly to 1 copy at this fraction of the steps
    aux_weight: float = 1.0  # weight of the auxiliary patch classifier's loss (shape and colour of each object token)
    query_aux_weight: float = 1.0  # weight of the auxiliary answer-position probes (the POPE query's value and the image's)
    query_aux_layer: int = 0  # the probes read the output of this many decoder layers (0 = text_layers // 2)
    pope_pairs: bool = True  # half the batch repeats the other half's images with every POPE answer flipped
    pope_twin_draws: bool = False  # draw POPE questions so that flipped twins differ in nothing else (see synthetic)
    pope_blank: float = 0.15  # share of training images that are blank, with POPE questions only (all "no")
    pope_unseen: float = 0.3  # share of POPE negatives naming a never-drawn shape / colour (teaches reading the query)
    stop_at: int = 0  # stop after this step (keeping the schedule of `steps`), e.g. to end a first stage; 0 = steps
    turns: int = 3  # questions per training image (a multi-turn conversation; the test is single-turn)
    eval_every: int = 200  # steps between held-out evaluations (and checkpoints)
    eval_per_kind: int = 64  # held-out samples per kind (mc, pope, caption) at each evaluation
    max_minutes: float = 56.0  # stop early (saving what exists) after this wall time; 0 = no limit
    threads: int = 1  # torch.set_num_threads (1 beat 2 on a shared 2-core machine: 26 vs 2-8 samples/s)
    bf16: bool = False  # bf16 autocast (faster only on CPUs with bf16 matrix instructions)
    init_from: str = ""  # start from this checkpoint's weights (a second training stage) instead of random ones
    model: ModelConfig = field(default_factory=ModelConfig)  # model sizes


def build_model(model_cfg: ModelConfig, vocab_size: int, image_size: int, patch_size: int,
                image_token_id: int, pad_id: int, bos_id: int, eos_id: int):
    """A randomly initialised LlavaForConditionalGeneration with the given sizes."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    if model_cfg.text_layers < 9:
        raise ValueError("text_layers must be >= 9 so that the HiMAP preset's K2 = 8 leaves a pruned layer")
    vision = CLIPVisionConfig(
        hidden_size=model_cfg.vision_hidden, intermediate_size=2 * model_cfg.vision_hidden,
        num_hidden_layers=model_cfg.vision_layers, num_attention_heads=model_cfg.vision_heads,
        image_size=image_size, patch_size=patch_size, projection_dim=model_cfg.vision_hidden,
        initializer_range=model_cfg.init_std,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=model_cfg.text_hidden,
        intermediate_size=model_cfg.text_intermediate, num_hidden_layers=model_cfg.text_layers,
        num_attention_heads=model_cfg.text_heads, num_key_value_heads=model_cfg.text_kv_heads,
        max_position_embeddings=512, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=model_cfg.init_std,
    )
    # vision_feature_layer=-2 with one CLIP layer = the patch embeddings (0 would crash, see
    # TRANSFORMERS-NOTES); "default" drops the CLS token, as LLaVA 1.5 does
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    # The vision tower's position embeddings are zero and frozen: every background patch then
    # maps to the same feature wherever it is (the decoder's RoPE positions carry the layout),
    # so an object is the only thing that varies between images (see the module docstring).
    pos = model.model.vision_tower.get_parameter("embeddings.position_embedding.weight")
    with torch.no_grad():
        pos.zero_()
    pos.requires_grad_(False)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = bos_id
    return model


class Batcher:
    """Turns synthetic samples into model inputs with answer-only labels.

    Equivalent to the processor on the chat-template text (tests check it) but faster: the
    synthetic images are already square at the processor's size.
    """

    def __init__(self, processor, data_cfg: synthetic.SyntheticConfig):
        self.tokenizer = processor.tokenizer
        self.data_cfg = data_cfg
        self.n_image = data_cfg.grid * data_cfg.grid
        ip = processor.image_processor
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)

    def __call__(self, samples, with_answers: bool = True, blank: bool = False):
        """input_ids/attention_mask [B, T] (left-padded), pixel_values [B, 3, H, W], and when
        `with_answers`, labels [B, T] (-100 except the answer tokens and </s>).

        An element of `samples` is a Sample, or a list of Samples about one image (a multi-turn
        conversation, rendered as the chat template renders alternating user/assistant turns).
        """
        import torch

        tok = self.tokenizer
        rows, targets = [], []
        for conv in samples:
            conv = conv if isinstance(conv, (list, tuple)) else [conv]
            ids, target = [], []
            for t, s in enumerate(conv):
                if t == 0:
                    text = chat_prompt(s.prompt).replace(IMAGE, IMAGE * self.n_image)
                else:  # a later user turn: "\nUSER: {prompt}\nASSISTANT:" after "</s>"
                    text = f"\nUSER: {s.prompt}\nASSISTANT:"
                part = tok(text, add_special_tokens=False)["input_ids"]
                ids += part
                target += [False] * len(part)
                if not with_answers:
                    break
                answer = tok(" " + s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids += answer
                target += [True] * len(answer)
            rows.append(ids)
            targets.append(target)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for b, (r, tg) in enumerate(zip(rows, targets)):
            row = torch.tensor(r)
            input_ids[b, width - len(r):] = row
            mask[b, width - len(r):] = 1
            labels[b, width - len(r):] = torch.where(torch.tensor(tg), row, torch.tensor(-100))
        first = [c[0] if isinstance(c, (list, tuple)) else c for c in samples]
        images = [s.image(self.data_cfg, blank=blank) for s in first]
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "pixel_values": pixel_values(images, self.data_cfg.image_size, self.mean, self.std)}
        if with_answers:
            batch["labels"] = labels
        return batch


def answer_loss_and_hits(model, batch, hidden_layer: int | None = None):
    """Cross-entropy over the labelled (answer) tokens, and per-sample exact match: every answer
    token is the argmax given the gold prefix, i.e. greedy decoding would produce the answer.
    With `hidden_layer`, also returns that decoder layer's output [B, T, d] (for the probes)."""
    import torch

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model.model(**inputs, output_hidden_states=hidden_layer is not None)
    hidden = out.last_hidden_state  # [B, T, d]
    target = labels[:, 1:]  # token t+1 is predicted at position t
    sel = target != -100  # [B, T-1]
    logits = model.lm_head(hidden[:, :-1][sel]).float()  # [n_answer_tokens, V]
    loss = torch.nn.functional.cross_entropy(logits, target[sel])
    correct = torch.zeros_like(target, dtype=torch.bool)
    correct[sel] = logits.argmax(-1) == target[sel]
    hits = (correct | ~sel).all(dim=1)  # [B]
    if hidden_layer is None:
        return loss, hits
    return loss, hits, out.hidden_states[hidden_layer]


QUERY_VALUES = ("none",) + tuple(synthetic.COLOURS) + ("purple", "orange", "gray") + synthetic.SHAPES + synthetic.UNSEEN_SHAPES
"""Classes of the answer-position probes: every attribute value a POPE question can name, and
"none" (the image's value when the canvas is blank)."""


def answer_starts(labels) -> list[list[int]]:
    """Per row, the positions that predict the first token of each answer (turn order)."""
    rows = []
    for row in (labels != -100).tolist():
        rows.append([t - 1 for t in range(1, len(row)) if row[t] and not row[t - 1]])
    return rows


def query_targets(conversations, labels):
    """(row, position, query value, image value) of every POPE turn: the position is the one
    that predicts its yes/no; the values index QUERY_VALUES (image value -100 when the image
    has several objects, i.e. no single value). Tensors [n] each."""
    import torch

    b_idx, t_idx, query, image = [], [], [], []
    for b, (conv, starts) in enumerate(zip(conversations, answer_starts(labels))):
        conv = conv if isinstance(conv, (list, tuple)) else [conv]
        for s, pos in zip(conv, starts):
            if s.kind != "pope" or len(s.meta.get("query", ())) != 1:
                continue
            b_idx.append(b)
            t_idx.append(pos)
            query.append(QUERY_VALUES.index(s.meta["query"][0]))
            values = {getattr(o, s.meta["category"]) for o in s.objects}
            image.append(QUERY_VALUES.index(values.pop()) if len(values) == 1 else 0 if not values else -100)
    return tuple(torch.tensor(x, dtype=torch.long) for x in (b_idx, t_idx, query, image))


def query_loss(head, hidden, targets):
    """Cross-entropy of a linear probe that reads, at the position answering a POPE question,
    the value the question names and the image's value of that attribute. A training aid (the
    head is discarded): a yes/no answer is an interaction of the two, with no first-order
    gradient for either half; the probe makes both present mid-decoder, and the later layers
    then only compare them."""
    import torch

    b_idx, t_idx, query, image = targets
    if len(b_idx) == 0:
        return hidden.new_zeros(())
    logits = head(hidden[b_idx, t_idx]).float()  # [n, 2 * len(QUERY_VALUES)]
    n = len(QUERY_VALUES)
    loss = torch.nn.functional.cross_entropy(logits[:, :n], query)
    if (image != -100).any():
        loss = loss + torch.nn.functional.cross_entropy(logits[:, n:], image, ignore_index=-100)
    return loss


def patch_targets(conversations, data_cfg: synthetic.SyntheticConfig):
    """(sample, token) index pairs of every object's image token, with its shape and colour
    class ids: the targets of the auxiliary patch classifier. Tensors [n] each."""
    import torch

    b_idx, t_idx, shape, colour = [], [], [], []
    for b, conv in enumerate(conversations):
        s = conv[0] if isinstance(conv, (list, tuple)) else conv
        for o in s.objects + s.copies:
            b_idx.append(b)
            t_idx.append(o.cell[0] * data_cfg.grid + o.cell[1])
            shape.append(synthetic.SHAPES.index(o.shape))
            colour.append(data_cfg.colours.index(o.colour))
    return tuple(torch.tensor(x, dtype=torch.long) for x in (b_idx, t_idx, shape, colour))


def patch_loss(model, head, pixel_values, targets):
    """Cross-entropy of a linear classifier reading each object's shape and colour from its image
    token's projected feature (the decoder's input). A training aid (the head is discarded): it
    gives the vision tower a direct signal, where the answers' signal reaches it only through the
    decoder's attention over 144 tokens; without it, shapes stayed at chance in pilots."""
    import torch

    b_idx, t_idx, shape, colour = targets
    if len(b_idx) == 0:
        return pixel_values.new_zeros(())
    out = model.model.get_image_features(pixel_values=pixel_values)
    feats = getattr(out, "pooler_output", out)
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats  # [B, N, d]
    logits = head(feats[b_idx, t_idx])  # [n, n_shapes + n_colours]
    n_shapes = len(synthetic.SHAPES)
    return (torch.nn.functional.cross_entropy(logits[:, :n_shapes], shape)
            + torch.nn.functional.cross_entropy(logits[:, n_shapes:], colour))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def copies_at(step: int, cfg: TrainConfig) -> int:
    """Copies per object at `step`: copies_start fading linearly to 1 at copies_until * steps."""
    end = cfg.copies_until * cfg.steps
    if cfg.copies_start <= 1 or step >= end:
        return 1
    return max(1, round(cfg.copies_start - (cfg.copies_start - 1) * step / end))


def evaluate(model, batcher, samples, batch_size: int = 64, blank: bool = False) -> dict:
    """Exact-match accuracy per kind on `samples` (teacher forcing = greedy exact match)."""
    import torch

    was_training = model.training
    model.eval()
    hits_by_kind: dict[str, list[bool]] = {}
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            _, hits = answer_loss_and_hits(model, batcher(chunk, blank=blank))
            for s, h in zip(chunk, hits.tolist()):
                hits_by_kind.setdefault(s.kind, []).append(h)
    model.train(was_training)
    return {k: sum(v) / len(v) for k, v in hits_by_kind.items()}


def save_checkpoint(model, processor, directory: str, info: dict) -> None:
    """HF-format model (safetensors) + processor + training info, atomically replaced."""
    import shutil

    tmp = directory.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "training_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def train(cfg: TrainConfig, data_cfg: synthetic.SyntheticConfig = synthetic.SyntheticConfig(),
          progress: bool = True, extra_info: dict | None = None) -> dict:
    """Run training; returns the summary (also written to out_dir/summary.json). `extra_info`
    (e.g. the command line) is stored in each checkpoint's training_info.json."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    processor = build_processor(image_size=data_cfg.image_size, patch_size=data_cfg.patch_size)
    tok = processor.tokenizer
    model = build_model(cfg.model, len(tok), data_cfg.image_size, data_cfg.patch_size,
                        tok.image_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    if cfg.init_from:  # a later training stage: start from an earlier run's weights
        from transformers import LlavaForConditionalGeneration

        earlier = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
        try:
            model.load_state_dict(earlier.state_dict())
        except RuntimeError as err:
            raise ValueError(f"{cfg.init_from} does not match the model sizes of this run: {err}") from err
        del earlier
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    head = torch.nn.Linear(cfg.model.text_hidden, len(synthetic.SHAPES) + len(data_cfg.colours))
    probe = torch.nn.Linear(cfg.model.text_hidden, 2 * len(QUERY_VALUES))
    probe_layer = cfg.query_aux_layer or cfg.model.text_layers // 2
    if not 0 < probe_layer <= cfg.model.text_layers:
        raise ValueError(f"query_aux_layer must be in 1..{cfg.model.text_layers} (0: half way), got {cfg.query_aux_layer}")
    decay += [head.weight, probe.weight]
    no_decay += [head.bias, probe.bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    batcher = Batcher(processor, data_cfg)
    index = itertools.count()
    valid = synthetic.fixed_set(cfg.eval_per_kind, synthetic.VALID_SEED, config=data_cfg)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    open(log_path, "w").close()
    info = {"config": asdict(cfg), "data_config": asdict(data_cfg), "parameters": n_params,
            "torch": torch.__version__, **(extra_info or {})}
    best, history, t0, train_seconds = -1.0, [], time.time(), 0.0
    loss_ema = None
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress, mininterval=5)
    for step in bar:
        t_step = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        copies = copies_at(step, cfg)
        ids = [next(index) for _ in range(cfg.batch_size // 2 if cfg.pope_pairs else cfg.batch_size)]
        convs = [synthetic.make_conversation(i, cfg.seed + synthetic.TRAIN_SEED, cfg.mix, cfg.turns,
                                             data_cfg, copies, cfg.pope_unseen, cfg.pope_blank, flip,
                                             cfg.pope_twin_draws)
                 for flip in ((False, True) if cfg.pope_pairs else (False,)) for i in ids]
        batch = batcher(convs)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            if cfg.query_aux_weight:
                loss, _, mid = answer_loss_and_hits(model, batch, probe_layer)
                loss = loss + cfg.query_aux_weight * query_loss(probe, mid, query_targets(convs, batch["labels"]))
            else:
                loss, _ = answer_loss_and_hits(model, batch)
            if cfg.aux_weight:
                loss = loss + cfg.aux_weight * patch_loss(model, head, batch["pixel_values"],
                                                          patch_targets(convs, data_cfg))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        train_seconds += time.time() - t_step
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}", copies=copies, sps=f"{(step + 1) * cfg.batch_size / train_seconds:.1f}")
        last = (step + 1 == (cfg.stop_at or cfg.steps)
                or bool(cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes))
        if (step + 1) % cfg.eval_every == 0 or last:
            acc = evaluate(model, batcher, valid)
            score = (acc["mc"] + acc["pope"]) / 2
            record = {"step": step + 1, "copies": copies, "samples": (step + 1) * cfg.batch_size, "loss_ema": round(loss_ema, 4),
                      "lr": lr_at(step, cfg), "minutes": round((time.time() - t0) / 60, 2),
                      "train_samples_per_s": round((step + 1) * cfg.batch_size / train_seconds, 2),
                      "valid": {k: round(v, 4) for k, v in acc.items()}, "score": round(score, 4)}
            history.append(record)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.write(json.dumps(record))
            state = {**info, "step": step + 1, "valid": record["valid"], "minutes": record["minutes"]}
            save_checkpoint(model, processor, os.path.join(cfg.out_dir, "last"), state)
            if score >= best:  # ties go to the later, longer-trained checkpoint
                best = score
                save_checkpoint(model, processor, os.path.join(cfg.out_dir, "best"), state)
        if last:
            break
    summary = {"best_score": best, "minutes": round((time.time() - t0) / 60, 2), "steps": step + 1,
               "parameters": n_params, "history": history}
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
