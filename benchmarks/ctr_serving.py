"""CTR serving latency, KFAtt's cost over the attention it plugs into, and embedding lookup throughput.

    python -m benchmarks.ctr_serving --cases=serving          # (a) every model, batch 1 and 1024
    python -m benchmarks.ctr_serving --cases=kfatt_cost       # (b) KFAtt-b/f vs their attention, train and serve
    python -m benchmarks.ctr_serving --cases=embedding        # (c) 10M-row table lookups, 1 device
    python -m benchmarks.ctr_serving --cases=embedding_sharded   # (c) the same table row-sharded over 8 CPU devices
    python -m benchmarks.ctr_serving --smoke                  # tiny sizes, every case, prints only

(a) 'serving/<family>/<model>/b<batch>': the jitted inference forward pass (train=False, logits)
of every model of jdjax.models.din / dadnn / cscnn, built by jdjax.tasks.ctr.build_model from
its config file's model section (configs/kfatt.py, dadnn.py, cscnn.py) with random weights,
on batches of the embedded data (batch 1: the request of one user and one candidate; 1024:
one ranking request over 1024 candidates). Every model of a family is timed once per round,
rotated (harness.interleaved), after compile and warm-up; median and p90 per call.
'cscnn_served' is CSCNN with the visual vectors precomputed per ad (models.cscnn.precompute_visual)
and gathered at request time (no CNN in the request path).

(b) 'kfatt_cost/<scorer>/<mode>': for each attention KFAtt plugs into (vanilla 'attention',
'din', 'transformer'): the scorer with softmax pooling, + KFAtt-base and + KFAtt-freq, timed
interleaved; mode 'train_b256' = one training step (forward, backward, Adam; batch 256 as in
configs/kfatt.py), 'serve_b1' / 'serve_b1024' = the inference forward. base_ratio / freq_ratio
= median time over the plain attention's; target <= 1.15.

(c) 'embedding/<ids>/<batch>x<ids per row>': the lookup of jdjax.nn.ctr.Embeddings (jnp.take on
one [10M, 16] float32 table, 640 MB) for [batch] ids (a SparseFeat) or [batch, 100] ids (a
VarLenFeat, padding masked), ids uniform over the table ('uniform': cache-hostile) or
Zipf(1.1)-distributed ('zipf': a realistic hot set). lookups_per_s = ids per call / median time;
gbytes_per_s = the gathered bytes. 'embedding_sharded/...' runs in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=8: the table row-sharded over a `model` mesh axis
of 8 fake CPU devices (the 'tensor_parallel' rules), ids replicated; on one CPU this measures the
overhead of the sharded gather (masked local gathers + a sum over devices), not a speed-up.

load1 = 1-minute load average when the row was written (2 shared cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes; print but do not record.")
_CASES = flags.DEFINE_list("cases", ["serving", "kfatt_cost", "embedding", "embedding_sharded"], "Which case groups to run.")
_ROWS = flags.DEFINE_integer("table_rows", 10_000_000, "Rows of the embedding table of the lookup cases.")
_CHILD = flags.DEFINE_bool("child", False, "Internal: run the sharded lookup in this (8-device) process and print JSON.")

NOTES = {
    "serving": "Inference forward (jitted, train=False) of every CTR model, random weights, config-file sizes; interleaved rounds, "
    "median and p90 per call after compile and warm-up. cscnn_served = CSCNN with per-ad visual vectors precomputed "
    "offline (a row gather at request time). load1 = 1-minute load average (2 shared cores).",
    "kfatt_cost": "KFAtt-base / KFAtt-freq plugged into an attention vs the plain attention (softmax pooling), same model "
    "otherwise (configs/kfatt.py sizes): medians of interleaved rounds; ratio = KFAtt / plain; target <= 1.15. "
    "plain_dispatch_ms = "
    "a jitted no-op on the plain model's arguments (the fixed per-call cost of argument handling and dispatch, "
    "included in plain_ms); freq_thunks / plain_thunks = XLA instructions in the compiled entry computation.",
    "embedding": "jdjax.nn.ctr.Embeddings lookup (jnp.take) on a [rows, 16] float32 table; ids uniform or Zipf(1.1) over the "
    "table; lookups_per_s = ids per call / median call time.",
}


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def _ms(t: dict, key: str = "median_s") -> float:
    return round(1e3 * t[key], 4)


# ---------------------------------------------------------------------------------------------
# Models and batches of the three families


def _family_setup(family: str, smoke: bool):
    """(config, fmap, encoded numpy batch source of >= 1024 rows, extra) for 'behaviour' | 'scenes' | 'images'."""
    import numpy as np

    from configs import cscnn as cscnn_config
    from configs import dadnn as dadnn_config
    from configs import kfatt as kfatt_config
    from jdjax.data.features import FeatureMap
    from jdjax.tasks import ctr

    module = {"behaviour": kfatt_config, "scenes": dadnn_config, "images": cscnn_config}[family]
    cfg = module.get_config("smoke" if smoke else None)
    if not smoke and family == "behaviour":
        cfg.data.size = "small"  # the medium log's tables are larger but the models are the same
    features, splits, images = ctr.load_splits(cfg.data)
    fmap = FeatureMap.fit(features, splits["train"])
    source = ctr.encode_split(fmap, splits["train"], images)
    n = min(len(source), 1024)
    batch = source.get_batch(np.arange(n))
    num_scenes = int(splits["train"]["scene_index"].max()) + 1 if "scene_index" in splits["train"] else 0
    return cfg, fmap, batch, num_scenes, (splits, images)


def _inputs(batch: dict, b: int, drop=()) -> dict:
    import jax.numpy as jnp
    import numpy as np

    rows = np.resize(np.arange(len(batch["label"])), b)
    return {k: jnp.asarray(v[rows]) for k, v in batch.items() if k not in ("label", "group") and v.dtype != bool and k not in drop}


def _forward(model, params):
    import jax

    fwd = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False)[0])
    return lambda b: jax.block_until_ready(fwd(params, b))


def _init(model, batch):
    import flax.linen as nn
    import jax

    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])


def _model_names(family: str) -> list[str]:
    from jdjax.tasks import ctr

    return list(ctr.FAMILIES[family])


def serving_cases(smoke: bool):
    import numpy as np

    from benchmarks import harness
    from jdjax.models import cscnn
    from jdjax.tasks import ctr

    sizes = (1, 32) if smoke else (1, 1024)
    for family in ("behaviour", "scenes", "images"):
        cfg, fmap, batch, num_scenes, (splits, images) = _family_setup(family, smoke)
        models, params = {}, {}
        for name in _model_names(family):
            cfg.model.name = name
            models[name] = ctr.build_model(cfg.model, fmap, num_scenes)
            params[name] = _init(models[name], _inputs(batch, 2))
        if family == "images":  # the serving path: visual vectors precomputed per ad, looked up per request
            train = splits["train"]
            ad_cat = np.zeros(len(images), np.int32)
            ad_cat[train["ad_index"]] = fmap.encode({k: train[k] for k in ("user", "ad", "cat")})["cat"]
            table = cscnn.precompute_visual(models["cscnn"], params["cscnn"], images, ad_cat)
        for b in sizes:
            fns, first = {}, {}
            for name, model in models.items():
                x = _inputs(batch, b)
                f = _forward(model, params[name])
                first[name] = harness.time_call(lambda f=f, x=x: f(x), warmup=2, repeats=1)["first_s"]
                fns[name] = lambda f=f, x=x: f(x)
            if family == "images":
                served = _inputs(batch, b, drop=("image",))
                served["visual"] = table[np.asarray(served["ad_index"])]
                f = _forward(models["cscnn"], params["cscnn"])
                first["cscnn_served"] = harness.time_call(lambda f=f, x=served: f(x), warmup=2, repeats=1)["first_s"]
                fns["cscnn_served"] = lambda f=f, x=served: f(x)
            rounds = (20 if smoke else 200) if b == 1 else (5 if smoke else 15)
            times = harness.interleaved(fns, rounds)
            load1 = _load1()
            for name, t in times.items():
                yield "serving", f"serving/{family}/{name}/b{b}", {
                    "batch": b, "median_ms": _ms(t), "p90_ms": _ms(t, "p90_s"), "p10_ms": _ms(t, "p10_s"),
                    "examples_per_s": round(b / t["median_s"], 1), "compile_s": round(first[name] - t["median_s"], 3),
                    "rounds": rounds, "load1": load1, "notes": NOTES["serving"],
                }


# ---------------------------------------------------------------------------------------------
# KFAtt's cost over its attention


def kfatt_cost_cases(smoke: bool):
    import jax
    import optax

    from benchmarks import harness
    from jdjax.tasks import ctr

    cfg, fmap, batch, _, _ = _family_setup("behaviour", smoke)
    train_b = 32 if smoke else cfg.batch_size
    modes = {f"train_b{train_b}": train_b, "serve_b1": 1, f"serve_b{32 if smoke else 1024}": 32 if smoke else 1024}
    for scorer in ("attention", "din", "transformer"):
        variants = {"plain": scorer, "kfatt_base": "kfatt_base" if scorer == "attention" else f"{scorer}_kfatt_base",
                    "kfatt_freq": "kfatt_freq" if scorer == "attention" else f"{scorer}_kfatt_freq"}
        built = {}
        for v, name in variants.items():
            cfg.model.name = name
            model = ctr.build_model(cfg.model, fmap)
            built[v] = (model, _init(model, _inputs(batch, 2)))
        for mode, b in modes.items():
            x = _inputs(batch, b)
            fns, thunks = {}, {}
            for v, (model, params) in built.items():
                if mode.startswith("train"):
                    tx = optax.adam(1e-3)
                    labels = jax.numpy.asarray(batch["label"][:b])

                    @jax.jit
                    def step(p, s, x=x, model=model, tx=tx, labels=labels):
                        loss = lambda p: optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, x, train=True)[0], labels).mean()
                        updates, s = tx.update(jax.grad(loss)(p), s, p)
                        return optax.apply_updates(p, updates), s

                    args = (params, tx.init(params))
                    fns[v] = lambda step=step, args=args: jax.block_until_ready(step(*args))
                    fn = step
                else:
                    fn = jax.jit(lambda p, b_, model=model: model.apply({"params": p}, b_, train=False)[0])
                    args = (params, x)
                    fns[v] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
                thunks[v] = _entry_instructions(fn, args)
                if v == "plain":  # the fixed cost of a call on these arguments, nothing computed
                    noop = jax.jit(lambda *a: jax.numpy.zeros(()))
                    fns["dispatch"] = lambda noop=noop, args=args: jax.block_until_ready(noop(*args))
                for _ in range(3):  # compile and warm up
                    fns[v]()
            fns["dispatch"]()
            rounds = 10 if smoke else (400 if b == 1 else 100)
            times = harness.interleaved(fns, rounds)
            plain = times["plain"]["median_s"]
            yield "kfatt_cost", f"kfatt_cost/{scorer}/{mode}", {
                "batch": b, "plain_ms": _ms(times["plain"]), "kfatt_base_ms": _ms(times["kfatt_base"]),
                "kfatt_freq_ms": _ms(times["kfatt_freq"]), "base_ratio": round(times["kfatt_base"]["median_s"] / plain, 3),
                "freq_ratio": round(times["kfatt_freq"]["median_s"] / plain, 3),
                "plain_dispatch_ms": _ms(times["dispatch"]),
                "plain_thunks": thunks["plain"], "base_thunks": thunks["kfatt_base"], "freq_thunks": thunks["kfatt_freq"],
                "plain_p90_ms": _ms(times["plain"], "p90_s"), "freq_p90_ms": _ms(times["kfatt_freq"], "p90_s"),
                "rounds": rounds, "load1": _load1(), "notes": NOTES["kfatt_cost"],
            }


def _entry_instructions(fn, args) -> int:
    """Instructions of the compiled entry computation (roughly the thunks XLA:CPU runs per call)."""
    text = fn.lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    return sum(" = " in line and "parameter(" not in line and "constant(" not in line for line in entry.splitlines()[1:])


# ---------------------------------------------------------------------------------------------
# Embedding lookups


def _lookup_setup(rows: int, dim: int = 16, mesh=None):
    """lookup(ids [B, T]) -> embeddings [B, T, dim] through jdjax.nn.ctr.Embeddings on one table of
    `rows` x `dim` float32 (row-sharded over the mesh's `model` axis when a mesh is given)."""
    import jax
    import jax.numpy as jnp

    from jdjax.nn.ctr.embedding import Embeddings
    from jdjax.nn.ctr.features import TableSpec, VarLenFeat

    spec = (TableSpec("table", rows, dim),)
    out_shardings = None
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        out_shardings = {"table": NamedSharding(mesh, PartitionSpec("model", None))}
    init = jax.jit(lambda k: {"table": 0.01 * jax.random.normal(k, (rows, dim), jnp.float32)}, out_shardings=out_shardings)
    params = init(jax.random.key(0))  # born sharded: no full copy on one device
    fns = {}

    def lookup(ids):
        maxlen = ids.shape[1]
        if maxlen not in fns:
            model = Embeddings((VarLenFeat("ids", maxlen=maxlen, embedding_dim=dim, embedding_name="table"),), spec, row_multiple=1)
            fns[maxlen] = jax.jit(lambda p, i: model.apply({"params": p}, {"ids": i})["ids"])
        return jax.block_until_ready(fns[maxlen](params, ids))

    return lookup


def _ids(rows: int, shape, dist: str, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    if dist == "uniform":
        ids = rng.integers(2, rows, shape)
    else:  # Zipf(1.1) ranks mapped to random rows: a hot set
        ranks = np.minimum(rng.zipf(1.1, shape), rows - 2)
        perm = rng.permutation(rows - 2)[: min(rows - 2, 1_000_000)]
        ids = 2 + perm[np.minimum(ranks - 1, len(perm) - 1)]
    return ids.astype(np.int32)


def embedding_cases(smoke: bool, rows: int, sharded: bool = False):
    import jax
    import jax.numpy as jnp

    from benchmarks import harness

    rows = 10_000 if smoke else rows
    mesh = None
    if sharded:
        from jdjax.train import sharding as shd

        mesh = shd.make_mesh({"data": 1, "model": jax.device_count()})
    lookup = _lookup_setup(rows, mesh=mesh)
    name = "embedding_sharded" if sharded else "embedding"
    fns, shapes = {}, {}
    for dist in ("uniform", "zipf"):
        for b, t in ((1024, 1), (1024, 100)) if not smoke else ((8, 1), (8, 10)):
            ids = jnp.asarray(_ids(rows, (b, t), dist))
            key = f"{name}/{dist}/{b}x{t}"
            fns[key] = lambda ids=ids: lookup(ids)
            shapes[key] = (b, t)
            fns[key]()
    times = harness.interleaved(fns, 5 if smoke else 30)
    for key, t in times.items():
        b, ids_per_row = shapes[key]
        n = b * ids_per_row
        yield name, key, {
            "table_rows": rows, "dim": 16, "table_mb": round(rows * 16 * 4 / 2**20, 1), "devices": jax.device_count(),
            "ids_per_call": n, "median_ms": _ms(t), "p90_ms": _ms(t, "p90_s"),
            "lookups_per_s": round(n / t["median_s"]), "gbytes_per_s": round(n * 16 * 4 / t["median_s"] / 1e9, 3),
            "load1": _load1(), "notes": NOTES["embedding"],
        }


def sharded_embedding_cases(smoke: bool, rows: int):
    """Runs the sharded lookups in a child process with 8 fake CPU devices; yields its rows."""
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(),
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "benchmarks.ctr_serving", "--child", f"--table_rows={rows}"] + (["--smoke"] if smoke else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode:
        raise RuntimeError(f"the 8-device child failed:\n{out.stderr[-3000:]}")
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            yield "embedding", row.pop("case"), row


def main(argv):
    del argv
    from benchmarks import harness

    smoke = _SMOKE.value
    if _CHILD.value:
        for _, case, metrics in embedding_cases(smoke, _ROWS.value, sharded=True):
            print(json.dumps({"case": case, **metrics}), flush=True)
        return
    groups = {
        "serving": lambda: serving_cases(smoke),
        "kfatt_cost": lambda: kfatt_cost_cases(smoke),
        "embedding": lambda: embedding_cases(smoke, _ROWS.value),
        "embedding_sharded": lambda: sharded_embedding_cases(smoke, _ROWS.value),
    }
    unknown = [c for c in _CASES.value if c not in groups]
    if unknown:
        raise app.UsageError(f"unknown --cases {unknown}; choose from {sorted(groups)}.")
    for group in _CASES.value:
        for bench, case, metrics in groups[group]():
            harness.record(f"ctr_{bench}", case, metrics, smoke=smoke)


if __name__ == "__main__":
    app.run(main)
