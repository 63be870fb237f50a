"""Reports: tables and figures drawn from what runs record.

`report` (`--mode report`: the comparison table of run directories, reading files only),
`report_render` (its Markdown and CSV), `plots` (every figure: training curves, analyses,
corruptions).

May import: `runs` and below. The order of all packages is written once, in pyproject.toml
([tool.importlinter]).
"""
