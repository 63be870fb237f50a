"""Evaluation: a trained model under attack, corruption and analysis.

`checks` (the options of --mode eval and --mode analyze, and the threat model), `accuracy`
(clean and robust accuracy over a split), `evaluate` (--mode eval: the attacks, AutoAttack's
bookkeeping, the table and reports), `corruption_eval` (common corruptions and their frequency
view), `analysis` (--mode analyze: frequency-bias analyses), `spectra` (radial frequency grids).

May import: `reports`, `runs`, `experiment`, `data` and the ground floor. The order of all
packages is written once, in pyproject.toml ([tool.importlinter]).
"""
