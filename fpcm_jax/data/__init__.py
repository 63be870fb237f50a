"""Data: where images come from, verified.

`datasets` (the named datasets as uint8 arrays; on-device augmentation; `Batches`),
`archives` (official archives: download, verify, read, prepare), `corruptions` (the
CIFAR-10-C / CIFAR-100-C archives and CIFAR-10.1, read and verified).

May import: the ground floor (`models`, `parallel`, `progress`, `files`). The order of all
packages is written once, in pyproject.toml ([tool.importlinter]).
"""
