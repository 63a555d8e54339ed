"""The embedded click log: determinism, layout, splits, slice flags and the planted structure."""

import itertools

import numpy as np
import pytest

from jdjax.data import clicklog
from jdjax.metrics import ctr


@pytest.fixture(scope="module")
def small():
    return clicklog.generate("small", seed=0)


def test_deterministic_and_seeded():
    a, b, c = (clicklog.generate("tiny", seed=s) for s in (0, 0, 1))
    for k in a["train"]:
        np.testing.assert_array_equal(a["train"][k], b["train"][k])
    assert not np.array_equal(a["train"]["item"], c["train"]["item"])


def test_layout_and_flags():
    size = clicklog.SIZES["tiny"]
    log = clicklog.generate(size, seed=0)
    for split in log.values():
        hist, hist_cat = split["hist_item"], split["hist_cat"]
        assert hist.shape[1] == size.maxlen
        valid = hist != clicklog.PAD
        assert np.all(valid[:, :-1] | ~valid[:, 1:]), "padding only at the end"
        np.testing.assert_array_equal(hist_cat[valid], hist[valid] // size.items_per_category)
        np.testing.assert_array_equal(split["cat"], split["item"] // size.items_per_category)
        np.testing.assert_array_equal(split["new"], ~(hist_cat == split["cat"][:, None]).any(1))
        assert set(np.unique(split["label"])) <= {0.0, 1.0}
    assert log["train"]["repeat"].any() and log["train"]["new"].any() and log["train"]["infreq"].any()


def test_time_split_orders_impressions_and_user_split_separates_users():
    size = clicklog.SIZES["tiny"]
    log = clicklog.generate(size, seed=0, split="time")
    assert log["train"]["time"].max() < log["val"]["time"].min() <= log["val"]["time"].max() < log["test"]["time"].min()
    assert len(log["test"]["user"]) == size.num_users * size.eval_impressions
    by_user = clicklog.generate(size, seed=0, split="user")
    users = [set(by_user[s]["user"]) for s in ("train", "val", "test")]
    assert not (users[0] & users[1]) and not (users[0] & users[2]) and not (users[1] & users[2])


def test_clicked_targets_join_the_history():
    log = clicklog.generate("tiny", seed=3)
    d = log["train"]
    for u in np.unique(d["user"])[:20]:
        rows = np.flatnonzero(d["user"] == u)
        rows = rows[np.argsort(d["time"][rows])]
        for a, b in itertools.pairwise(rows):
            last = d["hist_item"][b][d["hist_item"][b] != clicklog.PAD][-1]
            if d["label"][a] == 1:
                assert last == d["item"][a]


def test_bad_arguments():
    with pytest.raises(ValueError, match="size 'huge' is unknown"):
        clicklog.generate("huge")
    with pytest.raises(ValueError, match="split must be 'time' or 'user'"):
        clicklog.generate("tiny", split="random")


def _estimates(split, world):
    """Planted-logit analogues of sum pooling, vanilla attention, KFAtt-base and KFAtt-freq, all
    with the world's true precisions: what each pooling form could reach with perfect learning."""
    p = world.planted
    hist, cat, item = split["hist_item"], split["cat"], split["item"]
    valid = hist != clicklog.PAD
    hist_cat = np.where(valid, world.item_cat[np.maximum(hist, 0)], 0)
    z = world.z[np.maximum(hist, 0)] * valid[..., None]  # [N, T, r]
    prec = world.precision[cat[:, None], hist_cat] * valid
    n = ((hist_cat[:, :, None] == hist_cat[:, None, :]) & valid[:, None, :]).sum(-1)  # clicks of each click's category
    per_click = np.where(prec > 0, 1.0 / (1.0 / np.maximum(prec, 1e-12) + p.random_var), 0.0)
    capped = np.where(prec > 0, 1.0 / (1.0 / np.maximum(prec, 1e-12) + p.random_var / np.maximum(n, 1)), 0.0) / np.maximum(n, 1)
    prior = world.pref[cat]

    def with_prior(w):
        return (p.prior_precision * prior + np.einsum("nt,ntr->nr", w, z)) / (p.prior_precision + w.sum(1))[:, None]

    vanilla_w = per_click + 1e-3 * valid
    estimates = {
        "sum": z.sum(1) / np.maximum(valid.sum(1), 1)[:, None],
        "vanilla": np.einsum("nt,ntr->nr", vanilla_w, z) / vanilla_w.sum(1)[:, None],
        "base": with_prior(per_click),
        "freq": with_prior(capped),
    }
    return {k: p.alpha * np.einsum("nr,nr->n", world.z[item], v) + world.cat_bias[cat] for k, v in estimates.items()}


def test_planted_structure_favours_the_prior_on_new_and_capping_on_repeat(small):
    world = clicklog.make_world("small", seed=0)
    test = small["test"]
    logits = _estimates(test, world)
    np.testing.assert_allclose(logits["freq"] + world.planted.bias, test["oracle_logit"], atol=1e-4)
    y = test["label"]

    def auc(name, flag=None):
        sel = np.ones(len(y), bool) if flag is None else test[flag]
        return ctr.auc(y[sel], logits[name][sel])

    assert auc("freq") > auc("base") > auc("vanilla") > auc("sum")
    assert auc("base", "new") > auc("vanilla", "new") + 0.05  # the prior carries the 'new' slice
    assert auc("freq", "repeat") > auc("base", "repeat") + 0.01  # capping carries the 'repeat' slice
