"""A progress bar for the command-line tools (``fastneg bench``, ``demo``, ``mine``): tqdm when it
is installed, else one line per step; a module of its own so that every tool imports it without
importing the others."""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]


def progress_bar(total: int, unit: str = "run"):  # noqa: ANN201
    """``(step(label), close())`` for a progress bar of ``total`` steps: tqdm when it is installed,
    else one ``[n/total] label`` line per step on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, unit=unit, dynamic_ncols=True)

        def step(label: str) -> None:
            bar.set_description(label)
            bar.update(1)
        return step, bar.close
    count = [0]

    def step_plain(label: str) -> None:
        count[0] += 1
        print(f"[{count[0]}/{total}] {label}", file=sys.stderr, flush=True)
    return step_plain, lambda: None
