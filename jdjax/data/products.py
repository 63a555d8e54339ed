"""Product-description generation data: products, the embedded generated corpus, JSONL readers and the
copy-aware encoding (posterior-distillation PDG, spec `experiments_ads_text.md` §P3).

    splits = product_splits({"train": 8000, "val": 1000, "test": 1000}, seed=0)  # {split: [Product]}
    splits = read_products_dir("/data/jd_pdg")                                  # train/valid/test.jsonl
    vocab = build_vocab("word", vocab_texts(splits["train"]), workdir + "/vocab.json", min_count=2)
    batch = encode_products(vocab, splits["train"][:32], max_title=16, max_attr=32, max_reviews=10,
                            max_review_len=32, max_target=48)
    decode_extended(vocab, batch["target_ext"][0], batch["oov_words"][0])       # the reference back

A `Product` is a title, (key, value) attributes, customer reviews and the reference description;
generated products also carry their `product_type` and the user-cared `aspects` the description
mentions (`ASPECT_PHRASES` maps every aspect to the phrases that count as mentioning it, the lexicon
of `jdjax.metrics.generation.aspect_coverage`). Real data has neither (empty values).

Embedded default (no download): `generated_products(n, seed)`, lower-case English with this planted
structure (the tables `PRODUCT_TYPES` and `ASPECTS` below hold every word):

* 7 product types (phone, sneaker, jacket, kettle, headset, backpack, blender), each with 4-5
  brands, 4-5 attribute keys (colour always present, the others each with probability 0.85) with
  3-6 values each, and 5 user-cared aspects with a type prior (e.g. sneaker: comfort .35, grip .2,
  durability .2, fit .15, lightweight .1). Some aspects are shared (comfort, durability, noise, ...).
* Every product gets a model token: the brand's two letters and a number in 100..99999, plus a
  suffix letter one time in three ("st48213", "vo907x"): one word token that nearly never repeats
  (14 of 10k products share theirs with another), so a vocabulary built from `vocab_texts` with
  `min_count=2` leaves it out and only copying from the title can produce it.
* 1-3 true aspects per product (1: 30 %, 2: 45 %, 3: 25 %), drawn without replacement from the
  type prior.
* Title (6-12 words): brand, model token, type word, 2-5 attribute values (in random order, size
  as "size 42"), then 0-2 fillers ("new", "hot sale", ...), more while under 6 words.
* Reviews: a long tail, 0 (30 %), 1 (20 %), 2..10 (50 %, geometric-like, weight 0.75**(k-2)),
  8-25 words each. One review in five is pure noise (delivery, packaging, gifts); the others praise
  one or two of the product's true aspects (never another one), 60 % in words of the aspect's
  lexicon ("grip is excellent on wet tiles") and 40 % indirectly ("never slid once on the icy
  sidewalk"), with an optional opener and noise sentence. So with reviews the aspects are
  recoverable from them; with none only the type prior can guess them.
* Description (20-40 words): an opener naming type, brand, model token and 2-3 of the attributes
  (fewer if the text would pass 40 words; "meet the stride st48213 sneaker, in white, made of mesh
  and in size 42."), one sentence per true aspect from the aspect's templates (each holds a lexicon
  phrase), and closing sentences ("order yours today.") while under 20 words. It mentions exactly its true aspects: no lexicon phrase of another aspect occurs in it.

`product_splits` draws test, then val, then train from one stream, so val and test stay the same
when only the train size changes. 10k products take about 0.6 s of CPU.

Real data: `read_products_jsonl(path)` reads one JSON object per line,
`{"title": str, "attributes": {key: value} | [[key, value], ...], "reviews": [str, ...],
"description": str}`, optionally with "aspects" ([str]) and "product_type" (str); other fields are
ignored, blank reviews dropped, blank lines skipped. A bad line raises ValueError "path:line: ...".
`read_products_dir(data_dir)` reads `train.jsonl`, `valid.jsonl`, `test.jsonl`.

Encoding (`encode_product`, int32, padded with 0): the source is the title's tokens (segment 1),
then for each attribute its key's tokens (segment 2) and its value's tokens (segment 3); 0 marks
padding (`NUM_SEGMENTS` = 4). Reviews are rows of their own; the decoder copies from the source only.
Copy (pointer-generator) ids: source words outside the vocabulary get ids V, V+1, ... (V = vocab
size) in order of first appearance in the (cut) source; `target_ext` is `target_out` with every
out-of-vocabulary target word that is one of them replaced by its extended id (others stay unk).
`num_oov <= len(source)`, so V + max_title + max_attr bounds the extended vocabulary statically.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from jdjax import io as jio
from jdjax.data.text import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocab, WordVocab, pad_batch

SPLIT_FILES = {"train": "train.jsonl", "val": "valid.jsonl", "test": "test.jsonl"}
TITLE_SEGMENT, KEY_SEGMENT, VALUE_SEGMENT = 1, 2, 3
NUM_SEGMENTS = 4  # 0 = padding


@dataclass(frozen=True)
class Product:
    title: str
    attributes: tuple[tuple[str, str], ...]  # (key, value)
    reviews: tuple[str, ...]
    description: str  # the reference
    aspects: tuple[str, ...] = ()  # user-cared aspects the reference mentions (generated data)
    product_type: str = ""


@dataclass(frozen=True)
class Aspect:
    lexicon: tuple[str, ...]  # phrases that mention the aspect (whole lower-case tokens)
    describe: tuple[str, ...]  # description sentences, each holding a lexicon phrase
    direct: tuple[str, ...]  # review phrasings holding a lexicon phrase
    indirect: tuple[str, ...]  # review phrasings without one


@dataclass(frozen=True)
class ProductType:
    brands: dict[str, str]  # brand -> its model-token letters
    attributes: dict[str, tuple[str, tuple[str, ...]]]  # key -> (description phrase with {v}, values)
    aspects: dict[str, float]  # aspect -> prior weight
    title_forms: dict[str, str] = field(default_factory=dict)  # key -> title form with {v} (default "{v}")


ASPECTS = {
    "battery life": Aspect(
        ("battery life", "battery lasts"),
        ("the battery lasts a full day and more.", "expect a long battery life.",
         "its battery life easily covers two days."),
        ("battery life is amazing, two days easily.", "the battery lasts forever.", "great battery life."),
        ("i only charge it every other night.", "made it through a whole trip without a charger.")),
    "camera": Aspect(
        ("camera", "sharp photos"),
        ("the camera takes sharp photos even at night.", "a great camera for every moment."),
        ("the camera is superb.", "takes really sharp photos."),
        ("my night shots look like daylight.", "everyone asks what i shoot with.")),
    "performance": Aspect(
        ("smoothly", "performance", "no lag"),
        ("apps and games run smoothly.", "performance stays fast with no lag."),
        ("no lag at all, even with games.", "performance is great for the price."),
        ("switching between twenty apps is instant.", "it never stutters, even after updates.")),
    "display": Aspect(
        ("display",),
        ("the display is bright and crisp.", "a crisp display that stays readable outdoors."),
        ("the display is gorgeous.", "display is super bright."),
        ("i can read it in full sun.", "videos look stunning on it.")),
    "charging": Aspect(
        ("charging", "charges"),
        ("it charges to full in under an hour.", "fast charging gets you going in minutes."),
        ("fast charging is a lifesaver.", "it charges super quick."),
        ("plug it in during breakfast and it is full.", "ten minutes on the cable gives me half a day.")),
    "comfort": Aspect(
        ("comfortable", "comfort"),
        ("it stays comfortable all day long.", "built for all-day comfort."),
        ("so comfortable!", "the most comfortable one i own."),
        ("wore it for ten hours with zero complaints.", "i forget i even have it on.")),
    "grip": Aspect(
        ("grip",),
        ("the sole offers strong grip on wet ground.", "reliable grip on every surface."),
        ("grip is excellent on wet tiles.", "great grip on muddy trails."),
        ("never slid once on the icy sidewalk.", "feels planted even on wet stairs.")),
    "durability": Aspect(
        ("durable", "built to last"),
        ("it is durable and built to last.", "durable stitching holds up for years."),
        ("very durable, a year in and no wear.", "seems built to last."),
        ("a year of daily use and it still looks new.", "the seams have not budged after months.")),
    "fit": Aspect(
        ("fit", "true to size"),
        ("it runs true to size.", "expect a snug fit."),
        ("the fit is perfect.", "true to size for me."),
        ("ordered my usual size and it was spot on.", "no need to size up or down.")),
    "lightweight": Aspect(
        ("lightweight",),
        ("it is lightweight enough for long days.", "a lightweight build you barely notice."),
        ("super lightweight.", "so lightweight compared to my old one."),
        ("feels like carrying nothing at all.", "my arms never get tired holding it.")),
    "warmth": Aspect(
        ("warm", "warmth"),
        ("it keeps you warm in freezing weather.", "real warmth without the bulk."),
        ("super warm.", "warm enough for the coldest mornings."),
        ("survived minus fifteen without shivering.", "i wear just a t-shirt under it in january.")),
    "waterproof": Aspect(
        ("waterproof",),
        ("sealed seams make it fully waterproof.", "waterproof in heavy rain."),
        ("truly waterproof.", "waterproof as promised."),
        ("walked an hour in a downpour and stayed dry.", "the storm last week did not get through.")),
    "pockets": Aspect(
        ("pockets",),
        ("plenty of pockets for keys and cards.", "deep pockets keep essentials close."),
        ("love the deep pockets.", "so many pockets!"),
        ("my wallet, keys and a paperback all go inside.", "i never need a bag with it.")),
    "boil speed": Aspect(
        ("boils quickly", "boils fast"),
        ("it boils quickly, a full pot in minutes.", "it boils fast for a busy morning."),
        ("boils fast!", "it boils quickly, even when full."),
        ("the water is ready before i find a mug.", "tea is on the table in three minutes.")),
    "noise": Aspect(
        ("quiet", "quietly"),
        ("it runs quietly.", "quiet enough for early mornings."),
        ("very quiet.", "surprisingly quiet for the power."),
        ("does not wake the kids anymore.", "i can still hear the radio while it runs.")),
    "temperature control": Aspect(
        ("temperature",),
        ("precise temperature settings suit tea and coffee.", "pick the exact temperature you need."),
        ("the temperature settings are spot on.", "love choosing the temperature."),
        ("perfect for my green tea at eighty degrees.", "my pour over tastes better now.")),
    "safety": Aspect(
        ("auto shut off", "safety"),
        ("auto shut off adds peace of mind.", "safety features guard against boiling dry."),
        ("love the auto shut off.", "the safety lock gives me peace of mind."),
        ("it turns itself off when it runs dry.", "the kids can be around it without worry.")),
    "cleaning": Aspect(
        ("easy to clean",),
        ("the wide opening makes it easy to clean.", "easy to clean after every use."),
        ("so easy to clean.", "easy to clean, just rinse it."),
        ("a quick rinse and it is spotless.", "nothing ever sticks inside.")),
    "sound quality": Aspect(
        ("sound", "bass"),
        ("rich sound with deep bass.", "clear sound at any volume."),
        ("the sound is incredible.", "the bass is punchy."),
        ("i hear details in songs i never noticed.", "my old records feel brand new.")),
    "noise cancelling": Aspect(
        ("noise cancelling", "blocks out"),
        ("noise cancelling blocks out the commute.", "strong noise cancelling for flights."),
        ("the noise cancelling is great.", "it blocks out the office chatter."),
        ("i cannot hear the train anymore.", "open office, zero distractions.")),
    "connection": Aspect(
        ("connection", "pairs instantly"),
        ("it pairs instantly and the connection stays stable.", "a stable connection across the room."),
        ("the connection never drops.", "pairs instantly with my laptop."),
        ("works from the other room.", "switching between my devices takes a second.")),
    "organisation": Aspect(
        ("compartments", "organised"),
        ("smart compartments keep everything organised.", "several compartments keep things organised."),
        ("lots of compartments.", "keeps me organised."),
        ("everything has its own place.", "i find my charger without digging.")),
    "blending power": Aspect(
        ("crushes ice", "powerful"),
        ("a powerful motor crushes ice in seconds.", "powerful enough for frozen fruit."),
        ("powerful motor, it crushes ice easily.", "really powerful."),
        ("frozen berries turn smooth in seconds.", "my smoothies have no chunks now.")),
}
ASPECT_PHRASES: dict[str, tuple[str, ...]] = {name: a.lexicon for name, a in ASPECTS.items()}

PRODUCT_TYPES = {
    "phone": ProductType(
        {"voltra": "vo", "kinetix": "kx", "lumo": "lu", "orbix": "ob", "nexa": "nx"},
        {"colour": ("in {v}", ("black", "silver", "ocean blue", "rose gold", "graphite")),
         "storage": ("with {v} of storage", ("64gb", "128gb", "256gb", "512gb")),
         "screen": ("with an {v} screen", ("oled", "lcd", "amoled")),
         "ram": ("with {v} of ram", ("4gb", "6gb", "8gb", "12gb")),
         "network": ("with {v} support", ("4g", "5g"))},
        {"battery life": .35, "camera": .25, "performance": .2, "display": .1, "charging": .1}),
    "sneaker": ProductType(
        {"stride": "st", "axon": "ax", "pacer": "pc", "tern": "tn", "rivo": "rv"},
        {"colour": ("in {v}", ("white", "black", "grey", "navy", "red")),
         "material": ("made of {v}", ("mesh", "leather", "knit", "suede")),
         "size": ("in size {v}", tuple(str(s) for s in range(38, 47))),
         "sole": ("with a {v} sole", ("rubber", "foam", "eva"))},
        {"comfort": .35, "grip": .2, "durability": .2, "fit": .15, "lightweight": .1},
        {"size": "size {v}"}),
    "jacket": ProductType(
        {"northpeak": "np", "alder": "al", "fjell": "fj", "corvo": "cv"},
        {"colour": ("in {v}", ("black", "olive", "navy", "sand", "burgundy")),
         "material": ("made of {v}", ("nylon", "wool", "down", "polyester")),
         "size": ("in size {v}", ("s", "m", "l", "xl", "xxl")),
         "hood": ("with a {v}", ("detachable hood", "fixed hood", "packable hood"))},
        {"warmth": .35, "waterproof": .25, "fit": .15, "durability": .15, "pockets": .1},
        {"size": "size {v}"}),
    "kettle": ProductType(
        {"brewell": "bw", "calda": "cd", "aquari": "aq", "hestia": "hs"},
        {"colour": ("in {v}", ("white", "black", "steel grey", "cream")),
         "material": ("made of {v}", ("stainless steel", "glass", "ceramic")),
         "capacity": ("holding {v}", ("1 litre", "1.5 litres", "1.7 litres")),
         "power": ("rated at {v}", ("1500 w", "2000 w", "2200 w"))},
        {"boil speed": .35, "noise": .25, "temperature control": .15, "safety": .15, "cleaning": .1}),
    "headset": ProductType(
        {"sonik": "sk", "aural": "au", "bassline": "bl", "mavu": "mv"},
        {"colour": ("in {v}", ("black", "white", "midnight blue", "silver")),
         "style": ("with an {v} design", ("over-ear", "on-ear", "in-ear")),
         "link": ("with {v}", ("bluetooth 5.3", "bluetooth 5.0", "a usb-c cable")),
         "playtime": ("with {v} of playback", ("20 hours", "30 hours", "40 hours", "60 hours"))},
        {"sound quality": .35, "noise cancelling": .2, "comfort": .2, "battery life": .15, "connection": .1}),
    "backpack": ProductType(
        {"trekko": "tk", "urbo": "ub", "haulr": "hr", "kestrel": "ks"},
        {"colour": ("in {v}", ("black", "grey", "olive", "navy", "sand")),
         "material": ("made of {v}", ("canvas", "nylon", "polyester", "leather")),
         "volume": ("with {v} of space", ("20 l", "25 l", "30 l", "40 l")),
         "laptop": ("fitting a {v} laptop", ("13 inch", "15 inch", "17 inch"))},
        {"durability": .3, "comfort": .25, "organisation": .2, "waterproof": .15, "lightweight": .1}),
    "blender": ProductType(
        {"vortix": "vx", "mixa": "mx", "pulvo": "pv", "zestro": "zs"},
        {"colour": ("in {v}", ("black", "white", "red", "silver")),
         "jar": ("with a {v} jar", ("glass", "tritan", "steel")),
         "volume": ("holding {v}", ("1 litre", "1.5 litres", "2 litres")),
         "power": ("rated at {v}", ("600 w", "1000 w", "1200 w"))},
        {"blending power": .35, "noise": .25, "cleaning": .2, "durability": .1, "safety": .1}),
}

_OPENERS = ("meet the {brand} {model} {type}, {attrs}.", "the {brand} {model} {type} comes {attrs}.",
            "this {type} from {brand}, model {model}, arrives {attrs}.",
            "introducing the {brand} {model} {type}, {attrs}.")
_CLOSINGS = ("a solid pick for everyday use.", "order yours today.", "backed by a one year warranty.",
             "a smart choice at this price.")
_FILLERS = ("new", "official", "2024", "genuine", "hot sale", "free shipping")
_REVIEW_OPENERS = ("honestly,", "update after a month:", "five stars.", "love it!", "ok so", "well,", "")
_NOISE = ("arrived two days late but the box was fine.", "bought this as a gift for my brother.",
          "the seller answered my questions within an hour.", "packaging was simple, nothing fancy.",
          "price was ok during the sale.", "second one i ordered from this shop.", "the courier was friendly.",
          "not sure yet, will update later.", "my wife picked the colour.", "took a while to ship.",
          "came with a small manual in english.", "third purchase from this store this year.")
_REVIEW_COUNT_CDF = list(itertools.accumulate([0.3, 0.2, *(0.5 * 0.75 ** k / sum(0.75 ** j for j in range(9))
                                                              for k in range(9))]))  # P(0..10 reviews)
_NUM_ASPECTS_CDF = list(itertools.accumulate([0.3, 0.45, 0.25]))  # P(1..3 true aspects)


def _uniform_stream(seed: int):
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.random(1 << 16).tolist()


class _Draws:
    """Draws from uniforms pre-generated in blocks (numpy's one-at-a-time draws are slow in Python)."""

    def __init__(self, seed: int):
        self.uniform = functools.partial(next, _uniform_stream(seed))  # () -> float in [0, 1)

    def below(self, n: int) -> int:
        return int(self.uniform() * n)  # u <= 1 - 2**-53 rounds u * n below n

    def pick(self, options: Sequence):
        return options[self.below(len(options))]

    def weighted(self, cumulative: Sequence[float]) -> int:
        """Index i with probability cumulative[i] - cumulative[i - 1] (`cumulative` ends at the total)."""
        return min(bisect.bisect_right(cumulative, self.uniform() * cumulative[-1]), len(cumulative) - 1)

    def sample(self, options: Sequence, k: int) -> list:
        """k distinct options in random order."""
        pool = list(options)
        return [pool.pop(self.below(len(pool))) for _ in range(k)]


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _words(text: str) -> int:
    return len(text.split())


def _review(d: _Draws, aspects: Sequence[str]) -> str:
    """8-25 words: noise only (one in five), or an optional opener, one or two true aspects and noise."""
    if d.uniform() < 0.2:
        return " ".join(d.sample(_NOISE, 2))
    said = [d.pick(ASPECTS[a].direct if d.uniform() < 0.6 else ASPECTS[a].indirect)
            for a in d.sample(aspects, 1 if len(aspects) == 1 or d.uniform() < 0.7 else 2)]
    opener, noise = d.pick(_REVIEW_OPENERS), d.sample(_NOISE, 3)
    sentences = ([opener] if opener else []) + said
    if d.uniform() < 0.5:
        sentences.append(noise.pop())
    while _words(" ".join(sentences)) < 8:
        sentences.append(noise.pop())
    while _words(" ".join(sentences)) > 25:  # drop the noise, then the opener
        sentences.remove(next(s for s in sentences[::-1] if s in _NOISE or s == opener))
    return " ".join(sentences)


def _product(d: _Draws) -> Product:
    type_name = d.pick(list(PRODUCT_TYPES))
    pt = PRODUCT_TYPES[type_name]
    brand = d.pick(list(pt.brands))
    model = f"{pt.brands[brand]}{100 + d.below(99900)}" + ("" if d.uniform() < 2 / 3 else d.pick("sxp"))
    attributes = tuple((k, d.pick(values)) for k, (_, values) in pt.attributes.items()
                       if k == "colour" or d.uniform() < 0.85)
    aspects: list[str] = []
    for _ in range(1 + d.weighted(_NUM_ASPECTS_CDF)):  # without replacement, by the type prior
        left = [a for a in pt.aspects if a not in aspects]
        aspects.append(left[d.weighted(list(itertools.accumulate(pt.aspects[a] for a in left)))])

    shown = d.sample(attributes, min(len(attributes), 2 + d.below(4)))
    title_words = [brand, model, type_name, *(pt.title_forms.get(k, "{v}").format(v=v) for k, v in shown)]
    fillers = d.sample(_FILLERS, 3)
    title_words += fillers[:d.below(3)]
    for filler in fillers:
        if _words(" ".join(title_words)) < 6 and filler not in title_words:
            title_words.append(filler)
    while _words(" ".join(title_words)) > 12:
        title_words.pop(3)
    title = " ".join(title_words)

    reviews = tuple(_review(d, aspects) for _ in range(d.weighted(_REVIEW_COUNT_CDF)))

    described = d.sample(attributes, min(len(attributes), 2 + d.below(2)))
    opener = d.pick(_OPENERS)
    aspect_sentences = [d.pick(ASPECTS[a].describe) for a in aspects]
    closings = d.sample(_CLOSINGS, 2)
    for n_attr in range(len(described), 0, -1):
        attrs = _join([pt.attributes[k][0].format(v=v) for k, v in described[:n_attr]])
        description = " ".join([opener.format(brand=brand, model=model, type=type_name, attrs=attrs),
                                *aspect_sentences])
        for closing in closings:
            if _words(description) < 20:
                description += " " + closing
        if _words(description) <= 40:
            break
    return Product(title, attributes, reviews, description, tuple(aspects), type_name)


def generated_products(num_products: int, seed: int = 0) -> list[Product]:
    """`num_products` products of the planted structure (module docstring), deterministic in `seed`."""
    if num_products < 0:
        raise ValueError(f"num_products must be >= 0, got {num_products}.")
    d = _Draws(seed)
    return [_product(d) for _ in range(num_products)]


def product_splits(sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, list[Product]]:
    """{split: products} of `sizes` (default train 8000, val 1000, test 1000), drawn from one stream in
    the order test, val, then the other splits in sorted order: val and test do not change when
    only the train size does."""
    sizes = {"train": 8000, "val": 1000, "test": 1000} if sizes is None else dict(sizes)
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}.")
    order = [s for s in ("test", "val") if s in sizes] + sorted(set(sizes) - {"test", "val"})
    products = generated_products(sum(sizes.values()), seed)
    out, start = {}, 0
    for split in order:
        out[split], start = products[start:start + sizes[split]], start + sizes[split]
    return {split: out[split] for split in sizes}


def product_texts(products: Iterable[Product]) -> list[str]:
    """Every text of the products (title, "key value" per attribute, reviews, description): what a
    SentencePiece vocabulary trains on."""
    return [t for p in products
            for t in (p.title, *(f"{k} {v}" for k, v in p.attributes), *p.reviews, p.description)]


def vocab_texts(products: Iterable[Product], vocab: WordVocab | None = None) -> list[str]:
    """One text per product: the distinct tokens of all its texts (tokenised by `vocab`'s tokeniser,
    default `WordVocab`'s English one), joined by spaces. `WordVocab.build(vocab_texts(...),
    min_count=k)` then keeps the tokens used by at least k products: a model token that a product
    repeats in its title and description still counts once. Exact for the regex tokenisers; jieba
    (`chinese="words"`) re-segments the joined tokens and may differ slightly."""
    tokenize = (vocab or WordVocab(SPECIALS)).tokenize
    return [" ".join(dict.fromkeys(t for text in product_texts([p]) for t in tokenize(text))) for p in products]


def _fail(path, number: int, message: str):
    raise ValueError(f"{path}:{number}: {message}")


def _strings(value, name: str, path, number: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        _fail(path, number, f'"{name}" must be a list of strings, got {json.dumps(value)[:80]}.')
    return tuple(value)


def _parse(obj, path, number: int) -> Product:
    if not isinstance(obj, dict):
        _fail(path, number, f"a line is a JSON object, got {type(obj).__name__}.")
    missing = [k for k in ("title", "attributes", "reviews", "description") if k not in obj]
    if missing:
        _fail(path, number, f"missing field(s) {missing}; a product has title, attributes, reviews, description.")
    for key in ("title", "description"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            _fail(path, number, f'"{key}" must be a non-empty string, got {json.dumps(obj[key])[:80]}.')
    attrs = obj["attributes"]
    if isinstance(attrs, dict):
        attrs = list(attrs.items())
    if not isinstance(attrs, list) or not all(
            isinstance(kv, (list, tuple)) and len(kv) == 2 and all(isinstance(s, str) for s in kv) for kv in attrs):
        _fail(path, number, '"attributes" must be {"key": "value", ...} or [["key", "value"], ...] with string '
                            f"keys and values, got {json.dumps(obj['attributes'])[:80]}.")
    product_type = obj.get("product_type", "")
    if not isinstance(product_type, str):
        _fail(path, number, f'"product_type" must be a string, got {json.dumps(product_type)[:80]}.')
    return Product(obj["title"].strip(), tuple((k.strip(), v.strip()) for k, v in attrs),
                   tuple(r.strip() for r in _strings(obj["reviews"], "reviews", path, number) if r.strip()),
                   obj["description"].strip(), _strings(obj.get("aspects", []), "aspects", path, number), product_type)


def read_products_jsonl(path) -> list[Product]:
    """The products of a JSONL file, one JSON object per line (format in the module docstring)."""
    products = []
    with jio.as_path(path).open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _fail(path, number, f"not UTF-8 ({e}); product files are UTF-8 JSON lines.")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _fail(path, number, f"not valid JSON ({e}); each line is one product object.")
            products.append(_parse(obj, path, number))
    if not products:
        raise ValueError(f"{path}: holds no product; is it the right file?")
    return products


def write_products_jsonl(path, products: Iterable[Product]) -> None:
    """Writes `products` in the format `read_products_jsonl` reads (atomically; local or gs://)."""
    lines = [json.dumps({"title": p.title, "attributes": [list(kv) for kv in p.attributes], "reviews": list(p.reviews),
                         "description": p.description, "aspects": list(p.aspects), "product_type": p.product_type},
                        ensure_ascii=False) for p in products]
    jio.write_text(path, "".join(line + "\n" for line in lines))


def read_products_dir(data_dir) -> dict[str, list[Product]]:
    """{'train', 'val', 'test'} from `train.jsonl`, `valid.jsonl`, `test.jsonl` in `data_dir`."""
    paths = {split: jio.as_path(data_dir) / name for split, name in SPLIT_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"product data {str(data_dir)!r} lacks {missing}; a data directory holds "
                                f"{sorted(SPLIT_FILES.values())} (see jdjax/data/products.py for the format).")
    return {split: read_products_jsonl(p) for split, p in paths.items()}


def _tokens_ids(vocab: Vocab, text: str) -> list[tuple[str, int]]:
    return list(zip(vocab.tokenize(text), vocab.encode(text), strict=True))


def encode_product(vocab: Vocab, product: Product, max_title: int, max_attr: int, max_reviews: int,
                   max_review_len: int, max_target: int) -> dict:
    """One product's arrays (int32, padded with 0; Ls = max_title + max_attr):

      source      [Ls]              title ids (cut to max_title), then attribute key and value ids
                                    (all attributes' tokens together cut to max_attr), no gap between;
      segment     [Ls]              1 title, 2 attribute key, 3 attribute value, 0 padding;
      reviews     [M, Lrev]         the first M = max_reviews reviews, each cut to Lrev; zero rows after;
      target_in   [Lt]              __start__ + description ids (cut to max_target - 1);
      target_out  [Lt]              description ids + __end__;
      source_ext  [Ls]              source with its out-of-vocabulary words as V, V+1, ... (first appearance);
      target_ext  [Lt]              target_out with the OOV words found in the source as their extended ids;
      num_oov     int               number of extended ids (<= Ls);
      oov_words   list[str]         the words of ids V, V+1, ...
    """
    if min(max_title, max_attr, max_reviews, max_review_len, max_target) < 1:
        raise ValueError("max_title, max_attr, max_reviews, max_review_len and max_target must be >= 1, got "
                         f"{(max_title, max_attr, max_reviews, max_review_len, max_target)}.")
    title = _tokens_ids(vocab, product.title)[:max_title]
    attrs = [(tok_id, seg) for k, v in product.attributes  # ((token, id), segment)
             for seg, text in ((KEY_SEGMENT, k), (VALUE_SEGMENT, v)) for tok_id in _tokens_ids(vocab, text)][:max_attr]
    src = title + [tok_id for tok_id, _ in attrs]  # (token, id)
    segments = [TITLE_SEGMENT] * len(title) + [seg for _, seg in attrs]
    oov: dict[str, int] = {}
    for tok, i in src:
        if i == UNK_ID:
            oov.setdefault(tok, vocab.size + len(oov))
    src_ext = [oov[tok] if i == UNK_ID else i for tok, i in src]
    target = _tokens_ids(vocab, product.description)[:max_target - 1]
    target_ext = [oov.get(tok, UNK_ID) if i == UNK_ID else i for tok, i in target]
    reviews = np.zeros((max_reviews, max_review_len), np.int32)  # [M, Lrev]
    if product.reviews[:max_reviews]:
        reviews[:len(product.reviews[:max_reviews])] = pad_batch(
            [vocab.encode(r) for r in product.reviews[:max_reviews]], max_review_len, truncate="right")
    ls = max_title + max_attr

    def pad(seq: list[int], n: int) -> np.ndarray:
        return pad_batch([seq], n, truncate="right")[0]

    return {
        "source": pad([i for _, i in src], ls),
        "segment": pad(segments, ls),
        "reviews": reviews,
        "target_in": pad([BOS_ID, *(i for _, i in target)], max_target),
        "target_out": pad([*(i for _, i in target), EOS_ID], max_target),
        "source_ext": pad(src_ext, ls),
        "target_ext": pad([*target_ext, EOS_ID], max_target),
        "num_oov": len(oov),
        "oov_words": list(oov),
    }


def encode_products(vocab: Vocab, products: Sequence[Product], max_title: int, max_attr: int, max_reviews: int,
                    max_review_len: int, max_target: int) -> dict:
    """`encode_product` of each product stacked: arrays gain a leading [B] (`num_oov` int32 [B]);
    `oov_words` is a list of B word lists."""
    if not products:
        raise ValueError("encode_products needs at least one product.")
    rows = [encode_product(vocab, p, max_title, max_attr, max_reviews, max_review_len, max_target) for p in products]
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in ("num_oov", "oov_words")}
    out["num_oov"] = np.array([r["num_oov"] for r in rows], np.int32)  # [B]
    out["oov_words"] = [r["oov_words"] for r in rows]
    return out


def decode_extended(vocab: Vocab, ids: Iterable[int], oov_words: Sequence[str]) -> str:
    """The text of extended-vocabulary `ids` up to the first `__end__`: ids < V through `vocab.decode`
    (dropping padding and `__start__`), ids V + j as `oov_words[j]`, the pieces joined by spaces."""
    parts, run = [], []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i < vocab.size:
            if i != PAD_ID:
                run.append(i)
            continue
        if not 0 <= i - vocab.size < len(oov_words):
            raise ValueError(f"extended id {i} has no word: the vocabulary has {vocab.size} ids and the example "
                             f"{len(oov_words)} source OOV words; mask extended ids past num_oov when decoding.")
        parts += [vocab.decode(run), oov_words[i - vocab.size]]
        run = []
    parts.append(vocab.decode(run))
    return " ".join(p for p in parts if p)
