"""When to rebuild a published index: a pure function of its manifest, the clock and the catalogue.

Example::

    rebuild, reason = needs_rebuild(read_manifest("artifacts/index"), datetime.now(timezone.utc),
                                    n_fresh=1200, policy=cfg.rebuild, model_version="two_tower@4")
"""

from __future__ import annotations

from datetime import datetime

from feedrank.index.config import RebuildPolicy
from feedrank.index.store import IndexManifest


def needs_rebuild(
    manifest: IndexManifest,
    now: datetime,
    n_fresh: int,
    policy: RebuildPolicy,
    model_version: str | None = None,
) -> tuple[bool, str]:
    """``(True, why)`` when the index should be rebuilt, else ``(False, why not)``.

    ``n_fresh`` counts items that appeared since the build, whether already ``add``-ed to the index
    or still waiting; their share of the catalogue (items at build + ``n_fresh``) is compared with
    ``policy.max_fresh_share``. A ``model_version`` different from the manifest's always forces a
    rebuild: vectors from another model live in another space, and a user vector from the new user
    tower scored against old item vectors is meaningless. ``now`` must be timezone-aware.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(timezone.utc))")
    if n_fresh < 0:
        raise ValueError(f"n_fresh must be >= 0, got {n_fresh}")
    if model_version is not None and model_version != manifest.model_version:
        return True, f"model changed: index built from {manifest.model_version!r}, serving {model_version!r}"
    age_h = (now - manifest.built_at_datetime).total_seconds() / 3600
    if age_h > policy.max_age_hours:
        return True, f"index is {age_h:.1f} h old (max {policy.max_age_hours:g} h)"
    at_build = manifest.count - manifest.fresh_count
    share = n_fresh / (at_build + n_fresh)
    if share > policy.max_fresh_share:
        return True, f"{n_fresh} fresh items are {share:.1%} of the catalogue (max {policy.max_fresh_share:.1%})"
    return False, f"up to date: {age_h:.1f} h old, {share:.1%} fresh items"
