"""Known-positive masking: the dense grid (small catalogues) and the binary search (large) agree."""

import torch

from feedrank.models import two_tower
from feedrank.models.two_tower import TwoTower, TwoTowerConfig


def test_dense_and_searched_known_positive_masks_are_equal(monkeypatch):
    cfg = TwoTowerConfig(dim=8, user_id_dim=4, item_id_dim=8, cat_dim=2, freshness_dim=2, hidden=[8],
                         history_encoder="mean", mask_known_positives=True)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    users, items = torch.randint(0, 30, (200,), generator=g), torch.randint(0, 40, (200,), generator=g)
    query_users, query_items = torch.randint(0, 30, (16,), generator=g), torch.randint(0, 40, (25,), generator=g)
    masks = []
    for cells in (two_tower.DENSE_KNOWN_MAX_CELLS, 0):
        monkeypatch.setattr(two_tower, "DENSE_KNOWN_MAX_CELLS", cells)
        model = TwoTower(cfg, n_users=30, n_items=40, user_cat_sizes=[3], item_cat_sizes=[3])
        model.attach_known_positives(users, items)
        assert (model.known_dense.numel() > 0) == (cells > 0)
        masks.append(model.known_positive_mask(query_users, query_items))
    pairs = {(int(u), int(i)) for u, i in zip(users, items) if u > 1}  # the OOV user (1) is dropped
    brute = [[(int(u), int(i)) in pairs for i in query_items] for u in query_users]
    assert masks[0].tolist() == brute and masks[1].tolist() == brute
