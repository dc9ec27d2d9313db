"""Train the built-in model: a small LLaVA (CLIP tower + projector + Llama decoder) from scratch
on the synthetic benchmark (himap.synthetic), on CPU, reproducibly from a seed.

The model is a stock `LlavaForConditionalGeneration` and is saved with `save_pretrained` next to
the offline processor (himap.offline_processor), so it loads through
AutoModelForImageTextToText / AutoProcessor like any llava-hf checkpoint.

Design choices, for a model that learns within an hour on two shared CPU cores (each one
answers a measured failure of a pilot run; see /README's built-in section):
- the vision tower has one CLIP layer and the features are its input (vision_feature_layer=-2,
  the patch embeddings after the pre-layernorm), so each image token describes one 16 x 16 patch
  and an object's information starts in exactly one image token;
- the tower's position embeddings are zero and frozen, so every background patch gives the same
  feature (with them, each background patch was a different random vector after the
  layer norm, and pilots never used the image);
- curriculum: early images draw each object many times (`copies_start`, fading to one copy at
  `copies_until` of the run), so the answer first shows in many image tokens;
- several questions per training image (`turns`, a multi-turn conversation, the caption last),
  so each pass over 144 image tokens trains several answers; the test is single-turn;
- the loss is on the answer tokens only (and </s>); one-word answers are an easier aid;
- warm-up then cosine learning-rate decay; periodic held-out accuracy on a fixed validation set
  (single-turn, one copy; scored by teacher forcing, which equals greedy decoding's exact
  match); the best checkpoint by held-out accuracy is kept.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

from himap import synthetic
from himap.offline_processor import BOS, EOS, IMAGE, build_processor, chat_prompt, pixel_values


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
    steps: int = 3200  # optimiser steps (the learning-rate schedule spans them)
    batch_size: int = 16  # training images (conversations) per step
    lr: float = 2e-3  # peak learning rate (AdamW)
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05  # final learning rate as a fraction of the peak
    weight_decay: float = 0.01  # AdamW decoupled weight decay (matrices only)
    grad_clip: float = 1.0  # gradient-norm clipping
    mix: dict = field(default_factory=lambda: {"mc": 0.3, "pope": 0.4, "caption": 0.1, "word": 0.2})  # kind weights of the training stream
    copies_start: int = 12  # curriculum: each object drawn this many times at step 0 ...
    copies_until: float = 0.4  # ... fading linearly to 1 copy at this fraction of the steps
    pope_blank: float = 0.0  # share of training images that are blank, with POPE questions only (all "no")
    pope_unseen: float = 0.0  # share of POPE negatives naming a never-drawn shape / colour (teaches reading the query)
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
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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


def answer_loss_and_hits(model, batch):
    """Cross-entropy over the labelled (answer) tokens, and per-sample exact match: every answer
    token is the argmax given the gold prefix, i.e. greedy decoding would produce the answer."""
    import torch

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs).last_hidden_state  # [B, T, d]
    target = labels[:, 1:]  # token t+1 is predicted at position t
    sel = target != -100  # [B, T-1]
    logits = model.lm_head(hidden[:, :-1][sel]).float()  # [n_answer_tokens, V]
    loss = torch.nn.functional.cross_entropy(logits, target[sel])
    correct = torch.zeros_like(target, dtype=torch.bool)
    correct[sel] = logits.argmax(-1) == target[sel]
    hits = (correct | ~sel).all(dim=1)  # [B]
    return loss, hits


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
        batch = batcher([synthetic.make_conversation(next(index), cfg.seed + synthetic.TRAIN_SEED, cfg.mix,
                                                     cfg.turns, data_cfg, copies, cfg.pope_unseen, cfg.pope_blank)
                         for _ in range(cfg.batch_size)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, _ = answer_loss_and_hits(model, batch)
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
            if score > best:
                best = score
                save_checkpoint(model, processor, os.path.join(cfg.out_dir, "best"), state)
        if last:
            break
    summary = {"best_score": best, "minutes": round((time.time() - t0) / 60, 2), "steps": step + 1,
               "parameters": n_params, "history": history}
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
