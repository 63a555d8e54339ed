"""CTR step costs as ratios inside one run: behaviour poolings vs vanilla attention, CSCNN's
attention vs the plain CNN, and the distinct-image trick vs one tower pass per sample.

    python -m benchmarks.ctr            # records to benchmarks/RESULTS.md
    python -m benchmarks.ctr --smoke    # tiny sizes, prints only

Case 'behaviour/<model>': one jitted training step (forward + backward + Adam) of each model of
jdjax.models.din at the kfatt config's sizes (batch 256, 30 behaviours), relative to vanilla
attention (the KFAtt paper: KFAtt's latency is close to DIN's and the Transformer's).
Case 'image/<model>': the same for jdjax.models.cscnn on 16x16 ad images, relative to the plain CNN.
Case 'scenes/<model>': the same for jdjax.models.dadnn at the dadnn config's sizes (batch 512),
relative to the mixed (single-head) model.
Case 'distinct_images/<k>': the CSCNN forward pass on a batch of 256 samples showing k distinct
ads, tower once per distinct ad (max_unique_images = k) vs once per sample.
examples_per_s = batch / step time (training throughput on this CPU). Every model of a group (and
the two variants of a distinct_images case) is compiled and warmed up first, then timed once per
round in rotating order (harness.interleaved), so that a change of load on the shared cores hits
them alike; step_ms is the median over the rounds, compile_s the first call minus that median,
load1 the 1-minute load average. Serving latency, KFAtt's cost over its attention and embedding
lookups: benchmarks/ctr_serving.py.
"""

import os

from absl import app, flags

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes; print but do not record.")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Interleaved rounds per group (each case timed once per round; the median is reported).")


def _step_fn(model, batch):
    """A jitted train step (logloss, Adam) and its initial (params, opt_state)."""
    import flax.linen as nn
    import jax
    import optax

    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits, aux = model.apply({"params": p}, batch, train=True)
            extra = sum(aux.get("losses", {}).values())  # DADNN's knowledge transfer
            return optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean() + extra

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step, (params, tx.init(params))


def _step_call(model, batch):
    """A zero-argument call running one training step of `model` on `batch` to completion."""
    import jax

    step, (params, opt_state) = _step_fn(model, batch)
    return lambda: jax.block_until_ready(step(params, opt_state))


def _time_interleaved(calls: dict, repeats: int, warmup: int = 2) -> dict:
    """{name: harness.interleaved summary + 'first_s'}: each call's first (compiling) run timed apart,
    `warmup` untimed runs, then `repeats` rounds of every call in rotating order."""
    import time

    from benchmarks import harness

    first = {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        call()
        first[name] = time.perf_counter() - t0
        for _ in range(warmup):
            call()
    times = harness.interleaved(calls, repeats)
    return {name: {**t, "first_s": first[name]} for name, t in times.items()}


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def behaviour_cases(smoke: bool, repeats: int):
    import jax.numpy as jnp
    import numpy as np

    from jdjax.data import clicklog
    from jdjax.data.features import FeatureMap
    from jdjax.models.din import MODELS, BehaviourCTR

    log = clicklog.generate("tiny" if smoke else "small", seed=0)["train"]
    b = 32 if smoke else 256
    fmap = FeatureMap.fit(clicklog.features(18, log["hist_item"].shape[1]), log)
    enc = fmap.encode({k: log[k][:b] for k in ("user", "item", "cat", "hist_item", "hist_cat")})
    batch = {**{k: jnp.asarray(v) for k, v in enc.items()}, "label": jnp.asarray(log["label"][:b])}
    times = _time_interleaved({name: _step_call(BehaviourCTR(fmap.features, fmap.tables(), name), batch) for name in MODELS},
                              repeats)
    base, load1 = times["attention"]["median_s"], _load1()
    for name, t in times.items():
        yield f"behaviour/{name}", {"batch": b, "behaviours": int(np.asarray(batch["hist_item"]).shape[1]),
                                    "step_ms": 1e3 * t["median_s"], "examples_per_s": b / t["median_s"],
                                    "ratio_vs_attention": t["median_s"] / base,
                                    "compile_s": t["first_s"] - t["median_s"], "rounds": repeats, "load1": load1}


def image_cases(smoke: bool, repeats: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdjax.data import clicklog
    from jdjax.data.features import FeatureMap
    from jdjax.models.cscnn import MODELS, ImageCTR

    splits, images = clicklog.generate_ads("tiny" if smoke else "small", seed=0)
    train = splits["train"]
    b = 32 if smoke else 256
    fmap = FeatureMap.fit(clicklog.ad_features(16), train)

    def batch_of(rows):
        enc = fmap.encode({k: train[k][rows] for k in ("user", "ad", "cat")})
        return {**{k: jnp.asarray(v) for k, v in enc.items()}, "label": jnp.asarray(train["label"][rows]),
                "ad_index": jnp.asarray(train["ad_index"][rows]), "image": jnp.asarray(images[train["ad_index"][rows]])}

    batch = batch_of(np.arange(b))
    times = _time_interleaved({name: _step_call(ImageCTR(fmap.features, fmap.tables(), name), batch) for name in MODELS}, repeats)
    base, load1 = times["cnn"]["median_s"], _load1()
    for name, t in times.items():
        yield f"image/{name}", {"batch": b, "step_ms": 1e3 * t["median_s"], "examples_per_s": b / t["median_s"],
                                "ratio_vs_cnn": t["median_s"] / base,
                                "compile_s": t["first_s"] - t["median_s"], "rounds": repeats, "load1": load1}

    # Batches grouped by ad: k distinct ads, b / k samples each.
    for k in ([4] if smoke else [8, 32, 128]):
        ads = np.unique(train["ad_index"])[:k]
        rows = np.concatenate([np.flatnonzero(train["ad_index"] == a)[: b // k] for a in ads])
        rows = np.resize(rows, b)
        grouped = batch_of(rows)
        every = ImageCTR(fmap.features, fmap.tables(), "cscnn")
        dedup = ImageCTR(fmap.features, fmap.tables(), "cscnn", max_unique_images=k)
        params = jax.jit(every.init)(jax.random.key(0), grouped)
        fwd_every, fwd_dedup = jax.jit(every.apply), jax.jit(dedup.apply)
        t = _time_interleaved({v: lambda f=f, p=params, g=grouped: jax.block_until_ready(f(p, g))
                               for v, f in (("every", fwd_every), ("distinct", fwd_dedup))}, repeats)
        yield f"distinct_images/{k}", {"batch": b, "distinct_ads": k, "every_ms": 1e3 * t["every"]["median_s"],
                                       "distinct_ms": 1e3 * t["distinct"]["median_s"],
                                       "speedup": t["every"]["median_s"] / t["distinct"]["median_s"],
                                       "rounds": repeats, "load1": _load1()}


def scene_cases(smoke: bool, repeats: int):
    import jax.numpy as jnp
    import numpy as np

    from configs import dadnn as dadnn_config
    from jdjax.data import clicklog
    from jdjax.data.features import FeatureMap
    from jdjax.models.dadnn import MODELS
    from jdjax.tasks import ctr

    cfg = dadnn_config.get_config("smoke" if smoke else None)
    log = clicklog.generate_scenes("tiny" if smoke else "small", seed=0)["train"]
    b = cfg.batch_size
    fmap = FeatureMap.fit(clicklog.scene_features(cfg.data.embedding_dim), log)
    rows = np.resize(np.arange(len(log["label"])), b)
    enc = fmap.encode({k: log[k][rows] for k in ("user", "item", "cat", "scene")})
    batch = {**{k: jnp.asarray(v) for k, v in enc.items()}, "scene_index": jnp.asarray(log["scene"][rows], jnp.int32),
             "label": jnp.asarray(log["label"][rows])}
    calls = {}
    for name in MODELS:
        cfg.model.name = name
        calls[name] = _step_call(ctr.build_model(cfg.model, fmap, num_scenes=4), batch)
    times = _time_interleaved(calls, repeats)
    base, load1 = times["mixed"]["median_s"], _load1()
    for name, t in times.items():
        yield f"scenes/{name}", {"batch": b, "step_ms": 1e3 * t["median_s"], "examples_per_s": b / t["median_s"],
                                 "ratio_vs_mixed": t["median_s"] / base, "compile_s": t["first_s"] - t["median_s"],
                                 "rounds": repeats, "load1": load1}


def main(argv):
    del argv
    from benchmarks import harness

    for case, metrics in [*behaviour_cases(_SMOKE.value, _REPEATS.value), *scene_cases(_SMOKE.value, _REPEATS.value),
                          *image_cases(_SMOKE.value, _REPEATS.value)]:
        harness.record("ctr", case, metrics, smoke=_SMOKE.value)


if __name__ == "__main__":
    app.run(main)
