"""The rebuild policy against hand-computed ages and fresh shares."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from feedrank.index import IndexConfig, IndexManifest, RebuildPolicy, needs_rebuild

BUILT = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
POLICY = RebuildPolicy(max_age_hours=24, max_fresh_share=0.1)


def manifest(count: int = 1000, fresh_count: int = 0, model_version: str = "tt@1") -> IndexManifest:
    return IndexManifest(
        format_version=1, model_version=model_version, dim=16, count=count, fresh_count=fresh_count,
        built_at=BUILT.isoformat(), build_seconds=1.0, saved_at=BUILT.isoformat(), recall=0.99, recall_k=100,
        recall_queries=1000, config=IndexConfig(), files={},
    )


def test_fresh_index_needs_no_rebuild():
    assert needs_rebuild(manifest(), BUILT + timedelta(hours=2), 0, POLICY) == (False, "up to date: 2.0 h old, 0.0% fresh items")


def test_age_over_the_limit_triggers_a_rebuild():
    assert needs_rebuild(manifest(), BUILT + timedelta(hours=24), 0, POLICY)[0] is False  # not *over* yet
    assert needs_rebuild(manifest(), BUILT + timedelta(hours=30), 0, POLICY) == (True, "index is 30.0 h old (max 24 h)")


def test_fresh_share_over_the_limit_triggers_a_rebuild():
    # 111 / (1000 + 111) = 9.99% stays; 112 / 1112 = 10.07% goes over
    assert needs_rebuild(manifest(), BUILT, 111, POLICY)[0] is False
    assert needs_rebuild(manifest(), BUILT, 112, POLICY) == (True, "112 fresh items are 10.1% of the catalogue (max 10.0%)")


def test_items_already_added_are_not_counted_as_built():
    # 1100 indexed of which 100 added after the build: 100 fresh of 1000 + 100 = 9.1%
    assert needs_rebuild(manifest(count=1100, fresh_count=100), BUILT, 100, POLICY) == (
        False, "up to date: 0.0 h old, 9.1% fresh items")


def test_a_new_model_always_forces_a_rebuild():
    assert needs_rebuild(manifest(), BUILT, 0, POLICY, model_version="tt@2") == (
        True, "model changed: index built from 'tt@1', serving 'tt@2'")
    assert needs_rebuild(manifest(), BUILT, 0, POLICY, model_version="tt@1")[0] is False


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        needs_rebuild(manifest(), datetime(2024, 5, 1), 0, POLICY)
    with pytest.raises(ValueError, match="n_fresh must be >= 0, got -1"):
        needs_rebuild(manifest(), BUILT, -1, POLICY)
