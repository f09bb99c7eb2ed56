"""Reuse a feature build when it already matches: the one place every task and every evaluation
gets its point-in-time features from.

Training, evaluation and the labs all need ``FEATURES_DIR`` for a log and a ``FeatureConfig``;
building it is the most expensive step of a run, so a build is reused whenever its manifest
records the same log content and the same config, and rebuilt otherwise. It lives here, beside
``build.py``, rather than in ``train/`` so that evaluation (which must not import training code)
can call it too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from feedrank.features.build import FeatureConfig, build_features, config_record, load_manifest, log_hash

log = logging.getLogger(__name__)


def ensure_features(log_dir: str | Path, features_dir: str | Path, cfg: FeatureConfig, progress: bool = True) -> dict:
    """The feature build of ``log_dir`` under ``cfg`` at ``features_dir``: reused when its manifest
    records the same log content and config, rebuilt otherwise. Returns the manifest."""
    try:
        manifest = load_manifest(features_dir)
    except (FileNotFoundError, ValueError):
        manifest = None
    wanted = config_record(cfg)
    if manifest is not None and manifest.get("config") == wanted and manifest.get("source_hash") == log_hash(Path(log_dir)):
        log.info("reusing the feature build at %s", features_dir)
        return manifest
    return build_features(log_dir, features_dir, cfg, progress=progress).manifest
