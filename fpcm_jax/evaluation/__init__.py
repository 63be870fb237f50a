"""Evaluation: a trained model under attack, corruption and analysis.

`checks` (the options of --mode eval and --mode analyze), `accuracy` (clean and robust accuracy
over a split; the perturbation check), `evaluate` (--mode eval: the attacks, the table and
reports), `autoattack_eval` (AutoAttack over a split: its bookkeeping, progress and report
entry), `corruption_eval` (common corruptions and their frequency view), `analysis` (--mode
analyze: frequency-bias analyses), `spectra` (radial frequency grids).

May import: `reports`, `runs`, `experiment`, `data` and the ground floor. The order of all
packages is written once, in pyproject.toml ([tool.importlinter]).
"""
