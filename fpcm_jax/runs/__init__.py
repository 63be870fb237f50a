"""Runs: what a run leaves on disk, and reading it back.

`run_dir` (a run directory: run.json, best models, summary), `run_record` (config, environment,
resume guard, history), `checkpoint` (orbax I/O with checksums), `loading` (the one way to load a
trained model or an official file), `convert` (official state_dict <-> Flax variables),
`torch_zip` (PyTorch's .pt format without torch), `export` (a model as the official
state_dict), `metrics` (console lines, metrics.jsonl, TensorBoard).

May import: `experiment`, `data` and the ground floor. The order of all packages is written
once, in pyproject.toml ([tool.importlinter]).
"""
