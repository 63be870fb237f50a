"""Data: where images come from, verified.

`datasets` (the named datasets as uint8 arrays, your own data's splits; `Batches`),
`augmentation` (on-device training augmentation: pad-and-crop, random-resized crop), `sources` (your own data: any prepared tfds dataset or an image
folder, read image by image), `streaming` (training batches streamed with Grain when a split
does not fit memory), `archives` (official archives: download, verify, read, prepare),
`corruptions` (the CIFAR-10-C / CIFAR-100-C archives and CIFAR-10.1, read and verified).

May import: the ground floor (`models`, `parallel`, `progress`, `files`). The order of all
packages is written once, in pyproject.toml ([tool.importlinter]).
"""
