"""The README's code snippets marked `<!-- tested -->` run as written."""

import os
import re

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_snippets():
    text = open(README).read()
    return re.findall(r"<!-- tested -->\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_linen_and_nnx_snippets():
    snippets = readme_snippets()
    assert len(snippets) == 2
    assert "from fpcm_jax.layers import FPCM" in snippets[0]
    assert "from fpcm_jax.layers import NNXFPCM" in snippets[1]


@pytest.mark.parametrize("index", [0, 1])
def test_readme_snippet_runs(index):
    namespace = {}
    exec(compile(readme_snippets()[index], f"README snippet {index}", "exec"), namespace)
    logits = np.asarray(namespace["logits"])
    assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
