"""A grid of schedules over tasks (`himap sweep CONFIG.yaml`): the ablation plans as one run.

The config names a model, tasks and methods; each method is a preset, an ablation name from
himap.evaluation.ablations (KIND@BASE) or a group (all@base, k1r1-grid@base, criteria@base), where the
word `base` stands for each task's base schedule (its DEFAULT_METHOD unless the task entry says
`base:`). Every (task, method) runs through himap.evaluation.runner, so its predictions land in the same
files `himap eval --out OUT` writes and a rerun resumes. Schedules identical to an earlier one in
the same task (e.g. k1=2-r1=0.5@himap is himap) are run once and reported under both names.

Outputs in `out`: results.md, results.csv, results.json (one row per task and method) and
pareto.png (score against paper-convention TFLOPs per task, Pareto front marked).

    model: builtin              # path or id
    out: runs/sweep
    batch_size: 8
    limit: null                 # items per task (null: all)
    tasks:
      - name: shapes            # himap.tasks name
        data: null              # data folder (task default when null)
        split: null
        base: himap             # optional; default: the task's DEFAULT_METHOD
        optional: false         # true: run only when picked with --tasks NAME
    methods: [vanilla, fastv, base, all@base]
    scoring: {tokenizer: auto}  # task.score keywords (judge_base_url, judge_model, ... for judge tasks)
    threads: null               # torch CPU threads (null: torch's default)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass, field

from himap.prune.schedule import Schedule

RESULT_COLUMNS = ("task", "method", "same_as", "stages", "metric", "score", "tflops_paper",
                  "tflops_paper_ratio", "tflops_full", "latency_s_per_example", "n_items")
"""Columns of results.csv (results.json has the full summaries)."""


@dataclass
class TaskSpec:
    """One task of a sweep."""

    name: str  # himap.tasks name
    data: str | None = None  # data folder; None: the task's default
    split: str | None = None  # split selection
    base: str | None = None  # base schedule the `base` word stands for; None: task DEFAULT_METHOD
    image_dir: str | None = None  # image folder for loaders that take one
    limit: int | None = None  # overrides the sweep's limit for this task
    optional: bool = False  # run only when picked by name (`himap sweep --tasks NAME`)


@dataclass
class SweepConfig:
    """A parsed sweep config (see the module docstring for the YAML form)."""

    model: str  # model path or id ("builtin": the shipped model)
    tasks: list[TaskSpec]  # the tasks to run
    methods: list[str]  # method names; `base` and `@base` are resolved per task
    out: str = "runs/sweep"  # output folder (predictions under out/<task>/, tables at the top)
    batch_size: int = 1  # items per generate call
    limit: int | None = None  # items per task (None: all)
    max_new_tokens: int | None = None  # None: each task's MAX_NEW_TOKENS
    device: str = "auto"  # cpu, cuda or auto
    dtype: str | None = None  # fp32, bf16, fp16 (None: fp32 on CPU, bf16 on CUDA)
    attn_implementation: str = "sdpa"  # attention kernel every layer keeps
    threads: int | None = None  # torch CPU threads (None: torch's default); 1 suits tiny models on busy CPUs
    prompt_format: str = "hf"  # himap.models.loading.PROMPT_FORMATS: "hf" or "llava-v1" (the official scripts')
    plot: bool = True  # write pareto.png
    scoring: dict = field(default_factory=dict)  # task.score keywords: tokenizer, judge_base_url, judge_model, ...


def _check_keys(where: str, data: dict, allowed) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def parse_config(data: dict) -> SweepConfig:
    """A SweepConfig from the YAML document's dict, with errors that name the bad key."""
    if not isinstance(data, dict):
        raise ValueError("a sweep config is a YAML mapping (model, tasks, methods, ...)")
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    _check_keys("sweep config", data, fields)
    for key in ("model", "tasks", "methods"):
        if not data.get(key):
            raise ValueError(f"sweep config: `{key}` is required")
    tasks = []
    for i, t in enumerate(data["tasks"]):
        t = {"name": t} if isinstance(t, str) else t
        if not isinstance(t, dict) or "name" not in t:
            raise ValueError(f"sweep config: tasks[{i}] needs a `name`")
        _check_keys(f"tasks[{i}]", t, {f.name for f in dataclasses.fields(TaskSpec)})
        tasks.append(TaskSpec(**t))
    methods = data["methods"]
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not all(isinstance(m, str) for m in methods):
        raise ValueError("sweep config: `methods` is a list of names")
    if not isinstance(data.get("scoring") or {}, dict):
        raise ValueError("sweep config: `scoring` is a mapping of task.score keywords")
    if "prompt_format" in data:
        from himap.models.loading import check_prompt_format

        check_prompt_format(data["prompt_format"])
    return SweepConfig(**{**data, "tasks": tasks, "methods": list(methods), "scoring": data.get("scoring") or {}})


def load_config(path: str) -> SweepConfig:
    import yaml

    with open(path, encoding="utf-8") as f:
        return parse_config(yaml.safe_load(f))


def task_methods(methods: list[str], base: str) -> list[str]:
    """Method names for one task: `base` -> the base preset, `X@base` -> `X@<base>`, groups expanded,
    duplicates dropped (first kept)."""
    from himap.evaluation.ablations import expand

    out: list[str] = []
    for name in methods:
        if name == "base":
            name = base
        elif name.endswith("@base"):
            name = f"{name[:-len('base')]}{base}"
        for n in expand(name):
            if n not in out:
                out.append(n)
    return out


def unique_schedules(schedules: list[Schedule]) -> tuple[list[Schedule], dict[str, str]]:
    """(schedules with distinct stages, name -> name of the identical schedule that is run)."""
    first: dict[tuple, str] = {}
    kept, alias = [], {}
    for s in schedules:
        key = (tuple(s.stages), s.positions)
        if key in first:
            alias[s.name] = first[key]
        else:
            first[key] = s.name
            kept.append(s)
    return kept, alias


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, score) no other point beats: none has cost <= and score >=
    with one of them strict. Lower cost and higher score are better. Sorted by cost."""
    front = []
    for i, (c, s) in enumerate(points):
        dominated = any((c2 <= c and s2 >= s) and (c2 < c or s2 > s) for j, (c2, s2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def stages_text(schedule_dicts: list[dict]) -> str:
    """'K:R:criterion' per stage, e.g. '2:0.5:phi_sh 8:0.75:phi_dp'; long uniform schedules are
    shortened to their first and last stage."""
    parts = [f"{s['k']}:{s['ratio']:.3g}:{s['criterion']}" if s.get("keep") is None
             else f"{s['k']}:keep={s['keep']:.3g}:{s['criterion']}" for s in schedule_dicts]
    if len(parts) > 4:
        parts = [parts[0], f"... ({len(parts)} stages) ...", parts[-1]]
    return " ".join(parts) or "none"


def result_rows(summaries: list[dict], alias: dict[str, str], names: list[str]) -> list[dict]:
    """One row per requested name (aliases copy the row of the schedule actually run)."""
    by_method = {s["method"]: s for s in summaries}
    rows = []
    for name in names:
        src = by_method[alias.get(name, name)]
        row = dict(src, method=name, same_as=alias.get(name))
        rows.append(row)
    return rows


def write_tables(out: str, rows: list[dict], skipped: list | None = None) -> str:
    """results.json (full rows), results.csv (RESULT_COLUMNS) and results.md (with a list of the
    methods not run and why); returns the markdown."""
    from himap.evaluation.runner import _fmt, write_json

    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), rows)
    with open(os.path.join(out, "results.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: (stages_text(r["schedule"]) if c == "stages" else r.get(c)) for c in RESULT_COLUMNS})
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == task]
        front = {trows[i]["method"] for i in pareto_front(_points(trows)[1])} if _points(trows)[1] else set()
        lines += [f"### {task} ({trows[0]['metric']})", "",
                  "| method | stages | score | TFLOPs (paper) | ratio | TFLOPs (full) | latency s/example | Pareto |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in trows:
            ratio = f"{100 * r['tflops_paper_ratio']:.0f}%" if r.get("tflops_paper_ratio") is not None else "unavailable"
            name = r["method"] + (f" (= {r['same_as']})" if r.get("same_as") else "")
            lines.append(f"| {name} | {stages_text(r['schedule'])} | {_fmt(r['score'], 2)} | "
                         f"{_fmt(r['tflops_paper'])} | {ratio} | {_fmt(r['tflops_full'])} | "
                         f"{_fmt(r['latency_s_per_example'], 4)} | {'*' if r['method'] in front else ''} |")
        lines.append("")
        lines += [f"Not run: {m}: {why}" for t, m, why in (skipped or []) if t == task]
        if any(t == task for t, _, _ in skipped or []):
            lines.append("")
    md = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    return md


def _points(rows: list[dict]) -> tuple[str, list[tuple[float, float]]]:
    """(cost column used, (cost, score) per row) for rows that have both; paper TFLOPs first,
    the full count when the paper convention is unavailable."""
    for col in ("tflops_paper", "tflops_full"):
        if rows and all(r.get(col) is not None and isinstance(r.get("score"), (int, float)) for r in rows):
            return col, [(r[col], r["score"]) for r in rows]
    return "", []


def ablation_group(method: str) -> str:
    """Legend group of a method name: preset, a peer's family (pdrop, visionzip, dart, divprune),
    HiMAP at a peer's FLOPs, shallow-only, deep-only, uniform, K1/R1 grid, criterion."""
    from himap.evaluation.ablations import PEER_FAMILIES

    if "@" not in method:
        family = method.split("-", 1)[0]
        return family if family in PEER_FAMILIES else "preset"
    kind = method.split("@", 1)[0]
    if kind.startswith("match="):
        return "matched FLOPs"
    if kind.startswith("k1="):
        return "K1/R1 grid"
    if kind.startswith("crit=") or kind in ("random", "swapped") or kind.startswith("random"):
        return "criterion"
    return kind


_GROUP_STYLE = {"preset": ("tab:blue", "o"), "shallow-only": ("tab:orange", "s"), "deep-only": ("tab:green", "D"),
                "uniform": ("tab:purple", "^"), "K1/R1 grid": ("tab:gray", "."), "criterion": ("tab:brown", "x"),
                "matched FLOPs": ("tab:blue", "*"), "pdrop": ("tab:orange", "v"), "visionzip": ("tab:green", "P"),
                "dart": ("tab:purple", "X"), "divprune": ("tab:olive", "h")}


def _flops_unit(max_tflops: float) -> tuple[str, float]:
    """(axis unit, factor from TFLOPs) that keeps tick labels short: TFLOPs, GFLOPs or MFLOPs."""
    for unit, scale in (("TFLOPs", 1.0), ("GFLOPs", 1e3), ("MFLOPs", 1e6)):
        if max_tflops * scale >= 1:
            return unit, scale
    return "FLOPs", 1e12


def plot_pareto(rows: list[dict], path: str) -> str | None:
    """Score against TFLOPs per task (one panel each): points styled by ablation group, the Pareto
    front joined and ringed; presets and front points are labelled. Returns the path, or None when
    no task has costs and scores for every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in dict.fromkeys(r["task"] for r in rows)
             if _points([r for r in rows if r["task"] == t and not r.get("same_as")])[1]]
    if not tasks:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        trows = [r for r in rows if r["task"] == task and not r.get("same_as")]
        col, pts = _points(trows)
        front = pareto_front(pts)
        unit, scale = _flops_unit(max(x for x, _ in pts))
        pts = [(x * scale, y) for x, y in pts]
        for group, (color, marker) in _GROUP_STYLE.items():
            idx = [i for i, r in enumerate(trows) if ablation_group(r["method"]) == group]
            if idx:
                ax.scatter([pts[i][0] for i in idx], [pts[i][1] for i in idx], color=color, marker=marker,
                           label=group, zorder=2)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:red", marker="o",
                markerfacecolor="none", markersize=12, zorder=3, label="Pareto front")
        for i, (r, (x, y)) in enumerate(zip(trows, pts)):
            if i in front or "@" not in r["method"]:
                ax.annotate(r["method"], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"{unit} (paper convention)" if col == "tflops_paper" else f"{unit} (full count)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # short tick labels that never overlap
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_ylabel(trows[0]["metric"])
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class SweepResult:
    """What run_sweep produced (rank 0 holds the rows)."""

    rows: list[dict] = field(default_factory=list)  # one per task and requested method
    skipped: list = field(default_factory=list)  # (task, method, reason) of methods that cannot run here
    markdown: str = ""  # results.md
    plot: str | None = None  # pareto.png path, None if not drawn
    predicted: int = 0  # items predicted by this process in this call


def plan(cfg: SweepConfig, arch, skipped: list | None = None
         ) -> list[tuple[TaskSpec, list[str], list[Schedule], dict[str, str]]]:
    """(task, requested names, distinct schedules to run, aliases) per task; resolves every
    method up front so a bad name fails before any model runs. A method that cannot reach its
    asked cost on this model (`match=PEER@B` on a shallow model) raises, or, when `skipped` is a
    list, is left out and recorded there as (task, method, reason)."""
    from himap.evaluation.ablations import ModelShape, Unreachable, resolve
    from himap.tasks import get_task

    shape = None
    if arch is not None:
        from himap.cost.flops import paper_flops

        shape = ModelShape(n_image=arch.image_tokens, num_layers=arch.num_layers,
                           cost_fn=lambda s: paper_flops(arch, s))
    out = []
    for spec in cfg.tasks:
        if spec.optional:
            continue
        task = get_task(spec.name)
        names = task_methods(cfg.methods, spec.base or task.DEFAULT_METHOD)
        schedules = []
        for n in list(names):
            try:
                # keep the requested spelling as the name (k1=1-r1=.25@himap = k1=1-r1=0.25@himap)
                s = dataclasses.replace(resolve(n, shape), name=n)
                if arch is not None:
                    s.validate_for(arch.num_layers)
                    s = s.for_layers(arch.num_layers)  # the layers that run (peers: scaled to the depth)
            except Unreachable as err:
                if skipped is None:
                    raise ValueError(f"task {spec.name}, method {n!r}: {err}") from err
                skipped.append((spec.name, n, str(err)))
                names.remove(n)
                continue
            except ValueError as err:
                raise ValueError(f"task {spec.name}, method {n!r}: {err}") from err
            schedules.append(s)
        kept, alias = unique_schedules(schedules)
        out.append((spec, names, kept, alias))
    return out


def run_sweep(cfg: SweepConfig, predictor, arch, rank: int = 0, world_size: int = 1,
              progress: bool = True) -> SweepResult:
    """Evaluate every planned (task, schedule) through himap.evaluation.runner, then (rank 0) write the
    tables and the plot."""
    from himap.evaluation.runner import EvalConfig, evaluate

    result = SweepResult()
    summaries_rows = []
    for spec, names, schedules, alias in plan(cfg, arch, result.skipped):
        ecfg = EvalConfig(task=spec.name, data=spec.data, split=spec.split,
                          limit=spec.limit if spec.limit is not None else cfg.limit,
                          image_dir=spec.image_dir, batch_size=cfg.batch_size,
                          max_new_tokens=cfg.max_new_tokens, out=cfg.out, model=cfg.model,
                          rank=rank, world_size=world_size, progress=progress, prompt_format=cfg.prompt_format)
        res = evaluate(ecfg, schedules, predictor, arch=arch, score_kwargs=cfg.scoring or None)
        result.predicted += sum(res.predicted.values())
        if rank == 0:
            summaries_rows += result_rows(res.summaries, alias, names)
    if rank == 0:
        result.rows = summaries_rows
        result.markdown = write_tables(cfg.out, summaries_rows, result.skipped)
        if cfg.plot:
            result.plot = plot_pareto(summaries_rows, os.path.join(cfg.out, "pareto.png"))
    return result


def final_line(result: SweepResult) -> str:
    """The one machine-readable line a sweep ends with: {task: {method: score}}."""
    out: dict[str, dict] = {}
    for r in result.rows:
        out.setdefault(r["task"], {})[r["method"]] = {"score": r["score"], "tflops_paper": r["tflops_paper"]}
    return json.dumps({"sweep": out, "plot": result.plot})
