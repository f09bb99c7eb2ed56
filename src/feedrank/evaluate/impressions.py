"""Which log rows are impressions: the one rule ranking and retrieval evaluation share.

Readers of real logs write rows no feed ever showed: MIND's and EB-NeRD's pre-window clicks, as
clicked rows of requests ``hist-...`` timestamped just before the user's first impression, so
that histories and counters are complete. They are history, not outcomes: a user first seen after
the evaluation cut carries such rows *after* the cut, and counting them as test positives would
grade a model on clicks it was never asked to predict.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

#: The request-id prefix of the history rows that feedrank's MIND and EB-NeRD readers write: the
#: default of retrieval evaluation, whose two-tower runs have no ``exclude_requests`` setting.
HISTORY_REQUESTS = ("hist-",)


def impression_rows(table: pa.Table, exclude_prefixes: Sequence[str] = ()) -> pa.Table:
    """The rows of ``table`` that are impressions: those whose ``request_id`` starts with none of
    ``exclude_prefixes`` (e.g. MIND's ``hist-`` rows, pre-window clicks that a reader writes so that
    histories and counters are complete, but that no feed ever showed)."""
    if not exclude_prefixes:
        return table
    request = table["request_id"]
    excluded = functools.reduce(pc.or_, (pc.starts_with(request, prefix) for prefix in exclude_prefixes))
    return table.filter(pc.invert(pc.fill_null(excluded, False)))
