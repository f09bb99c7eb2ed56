"""Engagement labels: turn what happened to an impression into training targets and weights.

The weights are product decisions ("a share is worth five clicks"), so they live in ``LabelConfig``
(section ``labels`` of a YAML config), never in code. Two outputs:

- ``engagement_labels``: one binary label and one example weight per impression, for a single-task
  ranker or the retrieval model trained on weighted positives.
- ``task_targets``: one raw target per engagement type, for the multi-task ranker, which learns
  each engagement on its own and combines them later in its value formula.

**The rule** (one definition, additive in the value of each engagement)::

    long    = clicked and dwell_s >= long_dwell_s
    label   = 1 if (clicked or shared) and not hidden else 0
    weight  = hide_weight                                    if hidden
            = click_weight * (long_dwell_multiplier if long else 1) * clicked
              + share_weight * shared                        if clicked or shared
            = negative_weight                                otherwise (impression ignored)

Additive because each engagement is separate evidence of interest: a click with a long read and a
share (1 * 2 + 5 = 7 by default) says more than either alone, and a share without an opening click
(sharing from the feed) still counts as a positive worth ``share_weight``. Dwell only matters on a
click: the canonical log writes 0 dwell on unclicked impressions, and a non-zero one there is a log
error (``feedrank.data.schema.validate`` reports it), not engagement.

**Hide takes precedence.** A row can be both clicked and hidden (the user opened the item, then
said "not interested": typically clickbait). The explicit negative is the later and stronger signal,
so the row is a negative with ``hide_weight`` whatever else happened. ``task_targets`` on the
other hand reports the raw facts (``click=1`` and ``hide=1`` on that row): the multi-task ranker
must learn that such items get clicked *and* hidden.

Both functions accept numpy arrays or torch tensors (one code path: the array module is picked
from the inputs, and torch results stay on the input's device), and return float32 of the same kind.
A trainer therefore labels a ``Batch`` where it lives, e.g. on the GPU::

    label, weight = engagement_labels(batch.clicked, batch.dwell_s, batch.shared, batch.hidden, cfg)

(It must use ``label`` as the target together with ``weight``: ``batch.clicked`` is 1 on clicked
then hidden rows, which this rule weights as negatives.)

Example::

    >>> cfg = LabelConfig()
    >>> label, weight = engagement_labels([1, 1, 0, 1], [3.0, 30.0, 0.0, 40.0], [0, 1, 0, 0], [0, 0, 0, 1], cfg)
    >>> label.tolist(), weight.tolist()
    ([1.0, 1.0, 0.0, 0.0], [1.0, 7.0, 1.0, 3.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array, torch tensor, or a sequence of numbers

_FLAG_COLUMNS = ("clicked", "shared", "hidden")


@dataclass
class LabelConfig:
    """How engagements become labels and weights (section ``labels`` of a YAML config)."""

    click_weight: float = 1.0  # a click, the unit of value
    long_dwell_s: float = 10.0  # a click read at least this long is a "long dwell" ...
    long_dwell_multiplier: float = 2.0  # ... and its click weight is multiplied by this
    share_weight: float = 5.0  # added on a share: "a share is worth 5 clicks"
    hide_weight: float = 3.0  # weight of an explicit "not interested" (a strong negative)
    negative_weight: float = 1.0  # weight of an impression that got no engagement

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{f.name} must be finite and >= 0, got {value}")


def _module(*columns: ArrayLike) -> ModuleType:
    """``torch`` if any input is a tensor (so results stay on its device), else ``numpy``."""
    return torch if any(isinstance(c, torch.Tensor) for c in columns) else np


def _as_float32(x: ArrayLike, xp: ModuleType, device: torch.device | None) -> Any:
    """``x`` as float32 of module ``xp``; a tensor keeps its device unless ``device`` is given."""
    if xp is torch:
        return torch.as_tensor(x, dtype=torch.float32, device=device)
    return np.asarray(x, dtype=np.float32)


def _count(mask: Any) -> int:
    return int(mask.sum())


def _checked(
    clicked: ArrayLike, dwell_s: ArrayLike, shared: ArrayLike, hidden: ArrayLike
) -> tuple[ModuleType, dict[str, Any]]:
    """The four columns as float32 1-D arrays of one kind, after checking every rule.

    Raises ``ValueError`` naming the column and the number of offending values: wrong shape,
    lengths that differ, NaN / infinite / negative dwell, flags other than 0 and 1.
    """
    raw = {"clicked": clicked, "dwell_s": dwell_s, "shared": shared, "hidden": hidden}
    xp = _module(*raw.values())
    device = next((c.device for c in raw.values() if isinstance(c, torch.Tensor)), None)
    cols = {name: _as_float32(x, xp, device) for name, x in raw.items()}
    for name, x in cols.items():
        if x.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array, got shape {tuple(x.shape)}")
    lengths = {name: int(x.shape[0]) for name, x in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns differ in length: {', '.join(f'{k}={v}' for k, v in lengths.items())}")
    dwell = cols["dwell_s"]
    for problem, mask in (("NaN", xp.isnan(dwell)), ("infinite", xp.isinf(dwell)), ("negative", dwell < 0)):
        if n_bad := _count(mask):
            raise ValueError(
                f"dwell_s: {n_bad} {problem} value(s) of {lengths['dwell_s']}; dwell must be finite seconds >= 0"
            )
    for name in _FLAG_COLUMNS:
        x = cols[name]
        if n_bad := _count((x != 0) & (x != 1)):  # NaN fails both comparisons, so it is caught too
            raise ValueError(f"{name}: {n_bad} value(s) other than 0/1 (or False/True)")
    return xp, cols


def engagement_labels(
    clicked: ArrayLike, dwell_s: ArrayLike, shared: ArrayLike, hidden: ArrayLike, cfg: LabelConfig
) -> tuple[Any, Any]:
    """``(label, weight)``, float32 arrays of the inputs' kind, by the rule in the module docstring.

    Inputs are 1-D and equally long; flags are bool or 0/1 numbers. Empty inputs give empty outputs.
    """
    xp, c = _checked(clicked, dwell_s, shared, hidden)
    click, share, hide = c["clicked"] > 0, c["shared"] > 0, c["hidden"] > 0
    long_dwell = click & (c["dwell_s"] >= cfg.long_dwell_s)
    engaged = click | share
    click_value = cfg.click_weight * xp.where(long_dwell, cfg.long_dwell_multiplier, 1.0) * c["clicked"]
    positive_weight = click_value + cfg.share_weight * c["shared"]
    weight = xp.where(hide, cfg.hide_weight, xp.where(engaged, positive_weight, cfg.negative_weight))
    label = engaged & ~hide
    return _as_float32(label, xp, None), _as_float32(weight, xp, None)


def task_targets(
    clicked: ArrayLike, dwell_s: ArrayLike, shared: ArrayLike, hidden: ArrayLike, cfg: LabelConfig
) -> dict[str, Any]:
    """Per-task float32 targets for the multi-task ranker: the raw facts, no hide precedence.

    ``click``, ``long_dwell`` (a click with ``dwell_s >= cfg.long_dwell_s``), ``share`` and ``hide``
    are 0/1. ``dwell`` is ``log1p(dwell_s)`` on clicked rows and 0 elsewhere: it is only a target
    where there was a click, so the ranker must mask its dwell loss with ``targets["click"]``
    (log1p because dwell is heavy-tailed; a squared loss on raw seconds is dominated by outliers).
    """
    xp, c = _checked(clicked, dwell_s, shared, hidden)
    click = c["clicked"]
    long_dwell = (click > 0) & (c["dwell_s"] >= cfg.long_dwell_s)
    return {
        "click": click,
        "long_dwell": _as_float32(long_dwell, xp, None),
        "dwell": xp.log1p(c["dwell_s"]) * click,
        "share": c["shared"],
        "hide": c["hidden"],
    }
