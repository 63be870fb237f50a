"""The README and the manual (docs/, a MkDocs site) stay true: the site builds with --strict
(a link to a missing page or anchor fails), the README's links reach existing pages and
anchors, and every code block marked `<!-- tested -->` runs as written, from another
directory with no PYTHONPATH (fpcm_jax is importable because the set-up command installs it)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
TESTED = r"<!-- tested -->\s*```python\n(.*?)```"


def pages():
    return ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(DOCS)
                                  if name.endswith(".md"))


def marked_blocks():
    """(page, index, code) of every block marked tested."""
    return [(page, index, code) for page in pages()
            for index, code in enumerate(re.findall(TESTED, open(os.path.join(ROOT, page)).read(),
                                                    flags=re.S))]


def test_the_tested_blocks_are_where_users_look():
    found = {(page, code.count("from fpcm_jax.layers import FPCM"),
              code.count("from fpcm_jax.layers import NNXFPCM")) for page, _, code in marked_blocks()}
    assert ("README.md", 1, 0) in found
    assert ("docs/layer.md", 1, 0) in found and ("docs/layer.md", 0, 1) in found


@pytest.mark.parametrize("page, index, code", marked_blocks(),
                         ids=[f"{page}-{index}" for page, index, _ in marked_blocks()])
def test_a_tested_block_runs_from_anywhere(page, index, code, tmp_path):
    check = ("\nimport numpy as np\nlogits = np.asarray(logits)\n"
             "assert logits.shape == (4, 10) and np.all(np.isfinite(logits))\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    result = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_manual_builds_strictly(tmp_path):
    # not -q: it hides the warnings that --strict counts
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
               os.path.join(ROOT, "mkdocs.yml"), "-d", str(tmp_path / "site")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "layout" / "index.html").exists()


def anchors_of(page: str):
    """MkDocs' anchors of a page's headings (lower case, punctuation dropped, spaces -> '-')."""
    headings = re.findall(r"^#+ (.*)$", open(os.path.join(ROOT, page)).read(), flags=re.M)
    return {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}


def test_the_readme_links_reach_pages_and_anchors():
    readme = open(os.path.join(ROOT, "README.md")).read()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 14
    for page, anchor in links:
        assert os.path.exists(os.path.join(ROOT, page)), page
        assert not anchor or anchor in anchors_of(page), f"{page}#{anchor}"


def test_the_readme_is_a_front_page():
    assert sum(1 for _ in open(os.path.join(ROOT, "README.md"))) <= 250
