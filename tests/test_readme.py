"""The README's examples run as printed: the quick start trains, the stages compose."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(heading: str) -> list[str]:
    """The python blocks of the README section under ``## {heading}``."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block in the README's {heading!r}"
    return blocks


def _quick_start() -> str:
    return _python_blocks("Quick start")[0]


def test_quick_start_runs_and_the_loss_drops(capsys):
    scope: dict = {}
    exec(compile(_quick_start(), "README quick start", "exec"), scope)  # noqa: S102
    final = float(scope["loss_fn"](scope["params"], scope["images"], scope["labels"]))
    assert "ArcFace loss after 200 steps" in capsys.readouterr().out
    # Untrained, the same batch scores far worse.
    import jax

    keys = jax.random.split(jax.random.key(0), 4)
    untrained = dict(
        backbone=0.1 * jax.random.normal(keys[0], (64, 32)),
        centres=jax.random.normal(keys[1], (10, 32)),
    )
    start = float(scope["loss_fn"](untrained, scope["images"], scope["labels"]))
    assert final < 0.5 * start


def test_compose_your_own_runs(capsys):
    """Registry stages and a user's Stages: dense == chunked, stateful returns state."""
    scope: dict = {}
    for block in _python_blocks("Compose your own"):
        exec(compile(block, "README compose your own", "exec"), scope)  # noqa: S102
    import margin_jax as mj

    assert isinstance(scope["mine"], mj.Stages)
    assert isinstance(scope["state"], mj.CurricularState)
    assert "CurricularFace t =" in capsys.readouterr().out
