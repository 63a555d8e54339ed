"""DADNN invariants (spec §3.4): one scene without KT is a plain MLP CTR model, MMoE with one expert
is the shared bottom, a sample's label reaches only its own head, KT reaches the other heads;
the DCN baseline; the generic multi-scene CSV / Parquet reader."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdjax.data import clicklog
from jdjax.data.features import FeatureMap
from jdjax.models import dadnn
from jdjax.nn.ctr.embedding import Embeddings
from jdjax.nn.ctr.layers import MLP

B = 32


@pytest.fixture(scope="module")
def data():
    log = clicklog.generate_scenes("tiny", seed=0)
    fmap = FeatureMap.fit(clicklog.scene_features(4), log["train"])
    raw = {k: v[:B] for k, v in log["train"].items()}
    batch = {k: jnp.asarray(v) for k, v in fmap.encode({k: raw[k] for k in ("user", "item", "cat", "scene")}).items()}
    batch["scene_index"] = jnp.asarray(raw["scene"], jnp.int32)
    return fmap, batch, jnp.asarray(raw["label"])


def _model(fmap, name, **kw):
    kw = {"num_scenes": 4, "bottom_hidden": (16, 8), "head_hidden": (4,), "num_experts": 3,
          "scene": "scene_index", **kw}
    return dadnn.DADNN(fmap.features, fmap.tables(), name, **kw)


def _params(model, batch):
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])


def test_scene_log_layout():
    log = clicklog.generate_scenes("small", seed=0)
    train = log["train"]
    share = np.bincount(train["scene"], minlength=4) / len(train["scene"])
    np.testing.assert_allclose(share, clicklog.SCENE_SIZES["small"].scene_shares, atol=0.01)
    assert train["scene3"].sum() == (train["scene"] == 3).sum()


def test_one_scene_without_kt_is_a_plain_mlp(data):
    fmap, batch, _ = data
    one = {**batch, "scene_index": jnp.zeros_like(batch["scene_index"])}
    model = _model(fmap, "shared_bottom", num_scenes=1)
    params = _params(model, one)
    logit, aux = model.apply({"params": params}, one)
    assert "losses" not in aux
    # The same weights as one embedding layer and one MLP 16-8-4-1.
    emb = Embeddings(fmap.features, fmap.tables()).apply({"params": params["embeddings"]}, one)
    x = jnp.concatenate([emb[f.name] for f in fmap.features], -1)
    heads = jax.tree.map(lambda p: p[0], params["heads"])
    mlp_params = {**params["bottom"], "dense_2": heads["dense_0"], "out": heads["out"]}
    plain = MLP((16, 8, 4), "relu", out_features=1).apply({"params": mlp_params}, x)[:, 0]
    np.testing.assert_allclose(logit, plain, rtol=1e-6, atol=1e-6)


def test_mmoe_with_one_expert_is_the_shared_bottom(data):
    fmap, batch, _ = data
    mmoe = _model(fmap, "mmoe", num_experts=1)
    params = _params(mmoe, batch)
    shared = _model(fmap, "shared_bottom")
    shared_params = {**params, "bottom": jax.tree.map(lambda p: p[0], params["bottom"]["experts"])}
    out_mmoe, aux = mmoe.apply({"params": params}, batch)
    out_shared, _ = shared.apply({"params": shared_params}, batch)
    np.testing.assert_allclose(aux["gates"], 1.0)
    np.testing.assert_allclose(out_mmoe, out_shared, rtol=1e-6, atol=1e-6)


def _head_grad_norms(model, params, batch, labels, with_kt):
    def loss(p):
        logit, aux = model.apply({"params": p}, batch)
        total = optax.sigmoid_binary_cross_entropy(logit, labels).mean()
        return total + (sum(aux["losses"].values()) if with_kt else 0.0)

    grads = jax.jit(jax.grad(loss))(params)["heads"]
    norm = sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads))  # [S]
    return np.asarray(norm), grads


def test_label_gradient_reaches_only_the_own_scene_head(data):
    fmap, batch, labels = data
    scene0 = {**batch, "scene_index": jnp.zeros_like(batch["scene_index"])}
    model = _model(fmap, "dadnn_mlp", kt_weight=0.5)
    params = _params(model, scene0)
    norms, plain = _head_grad_norms(model, params, scene0, labels, with_kt=False)
    assert norms[0] > 0 and np.all(norms[1:] == 0)
    norms_kt, with_kt = _head_grad_norms(model, params, scene0, labels, with_kt=True)
    assert np.all(norms_kt[1:] > 0)  # the other heads learn from KT only
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_kt)):  # the teacher's head: label gradient only
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-7)


def test_mutual_distillation_lets_kt_reach_the_teacher(data):
    fmap, batch, labels = data
    scene0 = {**batch, "scene_index": jnp.zeros_like(batch["scene_index"])}
    model = _model(fmap, "dadnn_mlp", kt_weight=0.5, kt_stop_gradient=False)
    params = _params(model, scene0)
    _, plain = _head_grad_norms(model, params, scene0, labels, with_kt=False)
    _, with_kt = _head_grad_norms(model, params, scene0, labels, with_kt=True)
    assert not np.allclose(jax.tree.leaves(plain)[0][0], jax.tree.leaves(with_kt)[0][0])


def test_kt_loss_vanishes_when_heads_agree():
    logits = jnp.array([[0.3, 0.3, 0.3], [-1.0, -1.0, -1.0]])
    assert float(dadnn.knowledge_transfer_loss(logits, jnp.array([0, 2]))) == pytest.approx(0.0, abs=1e-6)
    assert float(dadnn.knowledge_transfer_loss(logits.at[0, 1].set(2.0), jnp.array([0, 2]))) > 0


def test_dcn_is_the_mixed_model_plus_a_cross_network(data):
    """DCN = cross network beside the mixed model's deep MLP; with every cross weight and bias zero the
    cross output is the input itself (x_{l+1} = x_l)."""
    fmap, batch, labels = data
    dcn = _model(fmap, "dcn", cross_layers=2)
    params = _params(dcn, batch)
    assert set(params) == {"embeddings", "cross", "bottom", "heads"}
    logit, aux = dcn.apply({"params": params}, batch)
    assert logit.shape == (B,) and aux["logits"].shape == (B, 1) and "losses" not in aux
    zero = {**params, "cross": jax.tree.map(jnp.zeros_like, params["cross"])}
    emb = Embeddings(fmap.features, fmap.tables()).apply({"params": params["embeddings"]}, batch)
    x = jnp.concatenate([emb[f.name] for f in fmap.features], -1)
    deep = MLP((16, 8), "relu").apply({"params": params["bottom"]}, x)
    heads = jax.tree.map(lambda p: p[0], params["heads"])
    ref = MLP((4,), "relu", out_features=1).apply({"params": heads}, jnp.concatenate([x, deep], -1))[:, 0]
    np.testing.assert_allclose(dcn.apply({"params": zero}, batch)[0], ref, rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: optax.sigmoid_binary_cross_entropy(dcn.apply({"params": p}, batch)[0], labels).mean()))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["cross"]["kernel_0"]).sum()) > 0


def _write_scene_files(directory, fmt, rows_per_split=60, seed=0):
    """train/val/test with a string scene id, a user, two categorical columns and a dense one."""
    rng = np.random.default_rng(seed)
    header = ["label", "scene_id", "user", "item", "site", "price"]
    for split in ("train", "val", "test"):
        n = rows_per_split
        scene = rng.choice(["home", "search", "cart"], n)
        cols = {"label": rng.integers(0, 2, n), "scene_id": scene, "user": rng.integers(0, 10, n),
                "item": np.char.add("i", rng.integers(0, 8, n).astype(str)), "site": rng.integers(0, 3, n),
                "price": rng.random(n).round(3)}
        if fmt == "parquet":
            pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
            pq.write_table(pa.table(cols), str(directory / f"{split}.parquet"))
        else:
            lines = [",".join(header)] + [",".join(str(cols[h][i]) for h in header) for i in range(n)]
            (directory / f"{split}.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_scene_file_reader_builds_and_trains(tmp_path, fmt):
    from configs import dadnn as dadnn_config
    from jdjax.tasks import ctr
    from jdjax.train import loop

    _write_scene_files(tmp_path, fmt)
    features, splits = clicklog.load_scene_files(str(tmp_path), 4, scene="scene_id", dense=("price",))
    assert [f.name for f in features] == ["scene", "user", "item", "site", "price"]
    train = splits["train"]
    assert set(np.unique(train["scene"])) == {0, 1, 2}  # cart, home, search (sorted)
    assert train["scene0"].sum() == (train["scene"] == 0).sum() and train["price"].dtype == np.float32

    def config(directory):
        cfg = dadnn_config.get_config("smoke")
        cfg.checkpoint.async_save, cfg.logging.tensorboard = False, False
        cfg.data.name, cfg.data.data_dir, cfg.data.scene_column, cfg.data.dense_columns = "scene_files", str(directory), "scene_id", "price"
        cfg.num_train_steps, cfg.eval_every_steps, cfg.batch_size, cfg.eval_batch_size = 4, 2, 16, 32
        return cfg

    cfg = config(tmp_path)
    task = ctr.build(cfg)
    if fmt == "parquet":
        # The task built from the Parquet files holds exactly the arrays of the one built from the same rows
        # as CSV (written alongside), so its training run is the CSV case's (trained there, not twice).
        (tmp_path / "as_csv").mkdir()
        _write_scene_files(tmp_path / "as_csv", "csv")
        as_csv = ctr.build(config(tmp_path / "as_csv"))
        assert set(task.eval_sources) == set(as_csv.eval_sources) == {"val", "test"}
        shapes = [jax.eval_shape(t.init, jax.random.key(0)) for t in (task, as_csv)]  # the same model and tables
        assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
        assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])
        for split in ("train", "val", "test"):
            source = task.train_source if split == "train" else task.eval_sources[split]
            ref = as_csv.train_source if split == "train" else as_csv.eval_sources[split]
            assert len(source) == len(ref) == 60
            got, want = source.get_batch(np.arange(60)), ref.get_batch(np.arange(60))
            assert set(got) == set(want)
            for k in want:
                assert got[k].dtype == want[k].dtype, k
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        return
    results = loop.train_and_evaluate(cfg, str(tmp_path / "run"), task)
    assert results["status"] == "completed"
    assert {"test/auc", "test/gauc", "test/scene2/auc"} <= set(results)


def test_scene_file_reader_errors(tmp_path):
    from configs import dadnn as dadnn_config
    from jdjax import tasks as jtasks

    with pytest.raises(FileNotFoundError, match="no train file"):
        clicklog.load_scene_files(str(tmp_path), 4)
    _write_scene_files(tmp_path, "csv")
    with pytest.raises(ValueError, match=r"columns \['scene'\] are not in"):
        clicklog.load_scene_files(str(tmp_path), 4)
    test_csv = tmp_path / "test.csv"
    test_csv.write_text(test_csv.read_text().replace(",home,", ",outlet,", 1))
    with pytest.raises(ValueError, match="scenes .*outlet.* not in the train file"):
        clicklog.load_scene_files(str(tmp_path), 4, scene="scene_id")
    cfg = dadnn_config.get_config("smoke")
    cfg.data.name = "scene_files"
    assert any("needs --config.data.data_dir" in e for e in jtasks.validate(cfg))
