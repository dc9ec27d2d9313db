"""Evaluation: the resumable runner behind `himap eval` (runner), metrics, CIDEr (captions), the
judge client (judge), ablation schedules (ablations) and sweeps (sweep). The benchmarks
themselves are in himap.tasks, one file per task."""
