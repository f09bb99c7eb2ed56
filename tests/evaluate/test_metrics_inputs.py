"""Bad input to the ranking metrics fails with a message that names the argument."""

import numpy as np
import pytest
import torch

from feedrank.evaluate.metrics import auc, group_auc, hit_at_k, mrr, ndcg_at_k, precision_at_k, recall_at_k


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: auc([1, 0, 1], [0.1, 0.2]), "labels has 3 rows but scores has 2"),
        (lambda: auc([], []), "labels is empty"),
        (lambda: auc([[1, 0]], [[0.1, 0.2]]), r"labels must be 1-D, got shape \(1, 2\)"),
        (lambda: auc([1, 0], [0.1, float("nan")]), "scores contains NaN: 1 value"),
        (lambda: auc([1, 0, 2], [0.1, 0.2, 0.3]), r"labels must be binary \(0/1\): 1 value\(s\), first at flat index 2"),
        (lambda: auc(["a", "b"], [0.1, 0.2]), "labels must be numeric"),
        (lambda: group_auc([1, 0], [0.1, 0.2], groups=[1]), "labels has 2 rows but groups has 1"),
        (lambda: group_auc([1, 0], [0.1, 0.2], groups=None), "groups is required"),
        (lambda: group_auc([1, 0], [0.1, 0.2], groups=[1.0, np.nan]), "groups contains NaN"),
        (lambda: mrr([1, 0], [0.1, 0.2], groups=[]), "groups is empty"),
        (lambda: mrr([0.5, 1], [0.1, 0.2]), "labels must be binary"),
        (lambda: ndcg_at_k([1, -1], [0.1, 0.2], k=1), "labels must be finite and >= 0"),
        (lambda: ndcg_at_k([1, 0], [0.1, 0.2], k=0), "k must be an integer >= 1, got 0"),
        (lambda: precision_at_k([1, 0], [0.1, 0.2], k=1.5), "k must be an integer >= 1, got 1.5"),
        (lambda: recall_at_k([1, 0], [0.1, 0.2], k=True), "k must be an integer >= 1, got True"),
        (lambda: hit_at_k([1, 0], [0.1, 0.2], k=-3), "k must be an integer >= 1"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_torch_numpy_and_list_inputs_agree():
    labels, scores, groups = [1, 0, 0, 1, 0], [0.3, 0.9, 0.1, 0.8, 0.7], [2, 2, 2, 9, 9]
    expected = ndcg_at_k(labels, scores, 2, groups)
    assert ndcg_at_k(torch.tensor(labels), torch.tensor(scores, dtype=torch.bfloat16), 2, torch.tensor(groups)) == expected
    assert ndcg_at_k(np.array(labels, dtype=bool), np.array(scores), np.int64(2), np.array(groups)) == expected


def test_infinite_scores_are_a_valid_ordering():
    # -inf is how callers mask items; it simply ranks last
    assert auc([1, 0, 1], [np.inf, -np.inf, 0.0]) == 1.0
    assert mrr([0, 1], [-np.inf, 0.0]) == 1.0
