"""The README's code snippets marked `<!-- tested -->` run as written, from another directory
with no PYTHONPATH: fpcm_jax is importable because the set-up command installs it."""

import os
import re
import subprocess
import sys

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
def test_readme_snippet_runs_from_anywhere(index, tmp_path):
    check = ("\nimport numpy as np\nlogits = np.asarray(logits)\n"
             "assert logits.shape == (4, 10) and np.all(np.isfinite(logits))\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    result = subprocess.run([sys.executable, "-c", readme_snippets()[index] + check],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
