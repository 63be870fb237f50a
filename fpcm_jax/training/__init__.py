"""Training: adversarial training of a model from a config.

`checks` (the options of --mode train), `train` (the epoch loop: cadence, validation, best
models, test), `train_step` (TrainState, the jitted step: attack, loss, AWP, EMA; LR schedule),
`losses` (PGD-AT's CE, TRADES, MART).

May import: `evaluation` (validation uses its accuracy) and everything below it. The order of
all packages is written once, in pyproject.toml ([tool.importlinter]).
"""
