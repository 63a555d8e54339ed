"""Dialogue data for response generation: (context, response) examples, readers, BM25 retrieval.

    splits = chatterbot_dialogues(seed=0)              # {'train', 'val', 'test'}: [DialogueExample]
    splits = read_dialogue_dir("/data/PersonaChatExtend", "fbdialog")
    cache = retrieval_cache(splits, workdir)           # {'train': {'top', 'bottom'}, ...} int32 arrays

An example is one response with its full history: `context` is the turns before it joined by
" __EOT__ " (`EOT_JOIN`), `conversation` the index of its conversation (episode) in its source.

Embedded default (no download): the English YAML files shipped by the `chatterbot-corpus`
package (`chatterbot_corpus/data/english/*.yml`, key `conversations`: lists of turns): in
version 1.3.3, 2,025 conversations (most of them one question and one answer) giving 2,306
examples. Turn i >= 1 of a conversation is a response whose context is turns 0..i-1. Files are
read in sorted order with YAML's base loader, so every scalar stays the string written in the
file ("yes" is not True); a turn that is not a string (a list or mapping) or is blank is
dropped, and an entry that is not a list (trivia.yml has one, a mis-indented string) or has
fewer than two turns left is dropped. Conversations (not examples) are split train/val/test by a
seeded shuffle of the groups of conversations that share their opening turn, so that no context
text is in two splits (the corpus repeats many questions across its files).

Real data (the authors' releases; `read_dialogue_dir(data_dir, fmt)` reads `train.txt`,
`valid.txt` and `test.txt`, UTF-8, into 'train', 'val', 'test'):

* fmt="fbdialog": ParlAI's FbDialog text, the layout of the authors' PersonaChatExtend,
  OpenSubtitles and Douban directories (their tasks are `FbDialogTeacher`s):
  `ID TEXT<TAB>LABEL[<TAB>REWARD<TAB>CANDIDATES...]`, one message per line; ID counts from 1
  within an episode, and an ID not larger than the previous line's starts a new episode. A line
  without a TAB is text with no label (e.g. a persona line).
* fmt="parlai": ParlAI's dialog format, `text:TEXT<TAB>labels:LABEL<TAB>episode_done:True`, one
  message per line (fields `key:value` separated by TABs, any order; other fields ignored;
  `eval_labels` is read when `labels` is missing); `episode_done:True` ends the episode.
* fmt="tsv": `TURN<TAB>...<TAB>TURN<TAB>RESPONSE`, one example per line (its own conversation):
  every field but the last is a context turn (a field may itself hold several turns joined by
  " __EOT__ "), the last is the response. Douban's retrieval release, which starts each line
  with a 0/1 label, must have that column removed first.

In the two ParlAI formats TEXT may hold several lines (escaped as `\\n`); each is a turn. Within
an episode the history accumulates: each message's text lines, then its label, and the example
of a labelled message is (history so far, its label). Of several labels `a|b` the first is the
response. Blank lines are skipped. A line that cannot be read raises ValueError "path:line: ...".

BM25 (spec P4, group-wise dual sampling, step 1): `RetrievalIndex` indexes the distinct training
contexts (bm25s, Lucene BM25 with k1=1.5, b=0.75; contexts lower-cased and split on whitespace,
the `__EOT__` delimiter dropped; two contexts with the same tokens are one document, which stands
for the first training example with it). For each query context it returns the training
examples of the `k_top` best and the `k_bottom` worst documents; on train the query's own context
is excluded (so `k_top - 1` neighbours remain, the authors' 9 of 10), valid/test queries use the
train index as they are. Ties (most documents share no word with a query and score 0) are broken
by a seeded random order, so the bottom documents differ between queries. Cost: every query
scores every document (`get_scores`, O(D) memory and time per query, O(Q * D) in all; some
minutes for PersonaChat-sized splits), which the bottom list needs. `retrieval_cache` stores the
results in the workdir so that a resumed run reads them back.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import bm25s
import numpy as np
import yaml

from jdjax import io as jio
from jdjax.data.text import EOT

EOT_JOIN = f" {EOT} "
SPLIT_FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
RETRIEVAL_VERSION = 1


@dataclass(frozen=True)
class DialogueExample:
    context: str  # the turns before the response, joined by " __EOT__ "
    response: str
    conversation: int  # index of the conversation (episode) in its source


def join_turns(turns: Iterable[str]) -> str:
    """The context text of `turns`: joined by " __EOT__ "."""
    return EOT_JOIN.join(turns)


def conversation_examples(turns: Sequence[str], conversation: int) -> list[DialogueExample]:
    """One example per turn i >= 1: (turns 0..i-1, turn i)."""
    return [DialogueExample(join_turns(turns[:i]), turns[i], conversation) for i in range(1, len(turns))]


def dialogue_texts(examples: Iterable[DialogueExample]) -> list[str]:
    """The texts to build a vocabulary from: every turn once per conversation (the turns of its
    longest context, then that example's response), not once per example that repeats it."""
    longest: dict[int, DialogueExample] = {}
    for ex in examples:
        if ex.conversation not in longest or len(ex.context) > len(longest[ex.conversation].context):
            longest[ex.conversation] = ex
    return [t for ex in longest.values() for t in [*ex.context.split(EOT_JOIN), ex.response] if t]


def chatterbot_dialogues(seed: int = 0,
                         fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, list[DialogueExample]]:
    """The English chatterbot-corpus conversations as examples, split train/val/test by conversation,
    with every conversation that opens with the same turn (lower-cased, punctuation and spaces
    ignored) in the same split: the corpus repeats questions ("What is AI?") across files, mostly with
    the same answers, and a plain split by conversation puts more than half of the test contexts in
    train as well. The opening-turn groups are shuffled with `np.random.default_rng(seed)` and cut so
    that val and test get about `fractions` of the conversations (train the rest). Each split lists
    its examples in conversation order."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions are the train, val and test shares: three numbers >= 0 summing to 1, got "
                         f"{tuple(fractions)}.")
    english = importlib.resources.files("chatterbot_corpus").joinpath("data", "english")
    conversations = []
    for file in sorted((f for f in english.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name):
        for conv in yaml.load(file.read_text(encoding="utf-8"), Loader=yaml.BaseLoader).get("conversations") or []:
            turns = [t.strip() for t in conv if isinstance(t, str) and t.strip()] if isinstance(conv, list) else []
            if len(turns) >= 2:
                conversations.append(turns)
    groups: dict[str, list[int]] = {}
    for c, turns in enumerate(conversations):
        groups.setdefault(re.sub(r"\W+", "", turns[0].lower()), []).append(c)
    members = list(groups.values())
    order = np.random.default_rng(seed).permutation(len(members))
    n_val, n_test = (round(f * len(conversations)) for f in fractions[1:])
    cuts: dict[str, list[int]] = {"test": [], "val": [], "train": []}
    for g in order:  # fill test, then val, then train with whole groups
        split = "test" if len(cuts["test"]) < n_test else "val" if len(cuts["val"]) < n_val else "train"
        cuts[split] += members[g]
    return {split: [ex for c in sorted(cuts[split]) for ex in conversation_examples(conversations[c], c)]
            for split in ("train", "val", "test")}


def read_fbdialog(path) -> list[DialogueExample]:
    """Examples of a ParlAI FbDialog file (`ID TEXT<TAB>LABEL...` lines; see the module docstring)."""
    episodes, last_id = _Episodes(path), None
    for number, line in _lines(path):
        m = re.fullmatch(r"(\d+)(?: |(?=\t)|$)(.*)", line)
        if m is None:
            raise ValueError(f"{path}:{number}: an FbDialog line starts with an integer message id and a space "
                             f"(`1 hello<TAB>hi there`), got {line[:60]!r}.")
        message_id = int(m.group(1))
        if last_id is not None and message_id <= last_id:
            episodes.end()
        last_id = message_id
        text, tab, rest = m.group(2).partition("\t")
        episodes.add(number, text.replace("\\n", "\n"), rest.split("\t")[0].split("|")[0] if tab else None)
    return episodes.finish()


def read_parlai(path) -> list[DialogueExample]:
    """Examples of a ParlAI dialog-format file (`text:...<TAB>labels:...<TAB>episode_done:True` lines)."""
    episodes = _Episodes(path)
    for number, line in _lines(path):
        fields = {}
        for field in line.split("\t"):
            key, sep, value = field.partition(":")
            if not sep:
                raise ValueError(f"{path}:{number}: a ParlAI field is `key:value`, got {field[:60]!r}.")
            fields[key] = value
        done = fields.get("episode_done", "False")
        if done.lower() not in ("true", "false"):
            raise ValueError(f"{path}:{number}: episode_done must be True or False, got {done!r}.")
        labels = fields.get("labels", fields.get("eval_labels"))
        text = fields.get("text", "").replace("\\n", "\n").replace("\\t", "\t")
        episodes.add(number, text, None if labels is None else labels.split("|")[0].replace("__PIPE__", "|"))
        if done.lower() == "true":
            episodes.end()
    return episodes.finish()


def read_tsv(path) -> list[DialogueExample]:
    """Examples of a `TURN<TAB>...<TAB>RESPONSE` file, one example (and conversation) per line."""
    examples = []
    for number, line in _lines(path):
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 2 or not all(fields):
            raise ValueError(f"{path}:{number}: a line is context turns and a response, TAB-separated and non-empty "
                             f"(`hi<TAB>hello, how are you?`), got {line[:60]!r}.")
        examples.append(DialogueExample(join_turns(fields[:-1]), fields[-1], len(examples)))
    return _nonempty(examples, path)


READERS = {"fbdialog": read_fbdialog, "parlai": read_parlai, "tsv": read_tsv}


def read_dialogue_dir(data_dir, fmt: str) -> dict[str, list[DialogueExample]]:
    """{'train', 'val', 'test'} from `train.txt`, `valid.txt`, `test.txt` in `data_dir`, read as `fmt`
    ("fbdialog", "parlai" or "tsv"; see the module docstring)."""
    if fmt not in READERS:
        raise ValueError(f"dialogue format must be one of {sorted(READERS)}, got {fmt!r}.")
    paths = {split: jio.as_path(data_dir) / name for split, name in SPLIT_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"dialogue data {str(data_dir)!r} lacks {missing}; a data directory holds "
                                f"{sorted(SPLIT_FILES.values())} (see jdjax/data/dialogue.py for the layouts).")
    return {split: READERS[fmt](p) for split, p in paths.items()}


class RetrievalIndex:
    """BM25 over the distinct training contexts; results are indices into the training examples."""

    def __init__(self, contexts: Sequence[str]):
        self._doc_of: dict[str, int] = {}  # token key -> document
        first, docs = [], []
        for i, context in enumerate(contexts):
            tokens = bm25_tokens(context)
            key = " ".join(tokens)
            if key not in self._doc_of:
                self._doc_of[key] = len(docs)
                first.append(i)
                docs.append(tokens)
        if not docs:
            raise ValueError("a retrieval index needs at least one training context.")
        self.doc_example = np.asarray(first, np.int32)  # [D] the training example each document stands for
        self._bm25 = bm25s.BM25()
        self._bm25.index(docs, show_progress=False)

    @property
    def num_docs(self) -> int:
        return len(self.doc_example)

    def scores(self, query: str) -> np.ndarray:
        """float32 [D]: the BM25 score of every document for `query`."""
        tokens = bm25_tokens(query)
        return self._bm25.get_scores(tokens) if tokens else np.zeros(self.num_docs, np.float32)

    def retrieve(self, queries: Sequence[str], k_top: int = 10, k_bottom: int = 10, exclude_self: bool = False,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(top int32 [Q, k_top - exclude_self], bottom int32 [Q, k_bottom]): training-example indices
        of the best documents for each query (best first) and of the worst (worst first). With
        `exclude_self` (train queries) the query's own context is not a candidate and `k_top - 1`
        neighbours are returned. Ties are broken by a random order drawn from `seed`. The two lists
        may share documents when the index holds fewer than k_top + k_bottom of them."""
        n_top = k_top - int(exclude_self)
        available = self.num_docs - int(exclude_self)
        if n_top < 0 or k_bottom < 0 or max(n_top, k_bottom) > available:
            raise ValueError(f"k_top={k_top} and k_bottom={k_bottom} must be >= {int(exclude_self)} and 0 and leave "
                             f"at most the {available} documents {'other than the query ' * exclude_self}that the "
                             "index holds; lower them.")
        rng = np.random.default_rng(seed)
        top = np.zeros((len(queries), n_top), np.int32)  # [Q, k_top - exclude_self]
        bottom = np.zeros((len(queries), k_bottom), np.int32)  # [Q, k_bottom]
        for q, query in enumerate(queries):
            order = rng.permutation(self.num_docs)  # the tie-break
            own = self._doc_of.get(" ".join(bm25_tokens(query))) if exclude_self else None
            if own is not None:
                order = order[order != own]
            scores = self.scores(query)[order]
            top[q] = self.doc_example[order[_smallest(-scores, n_top)]]
            bottom[q] = self.doc_example[order[_smallest(scores, k_bottom)]]
        return top, bottom


def bm25_tokens(text: str) -> list[str]:
    """BM25's tokens: lower-cased whitespace-separated words, the `__EOT__` delimiter dropped."""
    return [t for t in text.lower().split() if t != EOT.lower()]


def retrieval_cache(examples_by_split: dict[str, Sequence[DialogueExample]], workdir, k_top: int = 10,
                    k_bottom: int = 10, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """{split: {'top', 'bottom'}} from `RetrievalIndex(train contexts).retrieve` (train with
    `exclude_self`), read from `workdir/retrieval/` when there, else computed and written there:
    `{split}_top.npy`, `{split}_bottom.npy`, then `{split}.json` (the settings and a hash of the
    contexts; written last, it marks the split complete). A cache made for other data or
    settings is an error."""
    if "train" not in examples_by_split:
        raise ValueError(f"retrieval needs the 'train' split (the index), got {sorted(examples_by_split)}.")
    cache_dir = jio.as_path(workdir) / "retrieval"
    cache_dir.mkdir(parents=True, exist_ok=True)
    train_hash = _contexts_hash(examples_by_split["train"])
    index, out = None, {}
    for split, examples in examples_by_split.items():
        meta = {"version": RETRIEVAL_VERSION, "k_top": k_top, "k_bottom": k_bottom, "seed": seed,
                "train_sha256": train_hash, "examples": len(examples), "sha256": _contexts_hash(examples)}
        meta_path = cache_dir / f"{split}.json"
        if meta_path.exists():
            if jio.read_json(meta_path) != meta:
                raise ValueError(f"the retrieval cache {str(meta_path)!r} was built for other data or settings "
                                 f"({jio.read_json(meta_path)}, this run: {meta}); delete {str(cache_dir)!r} to "
                                 "recompute it, or use a fresh workdir.")
            out[split] = {k: np.load(io.BytesIO((cache_dir / f"{split}_{k}.npy").read_bytes()))
                          for k in ("top", "bottom")}
            continue
        if index is None:
            index = RetrievalIndex([ex.context for ex in examples_by_split["train"]])
        top, bottom = index.retrieve([ex.context for ex in examples], k_top, k_bottom, exclude_self=split == "train",
                                     seed=seed)
        out[split] = {"top": top, "bottom": bottom}
        for k, array in out[split].items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            jio.write_bytes(cache_dir / f"{split}_{k}.npy", buffer.getvalue())
        jio.write_json(meta_path, meta)
    return out


def _smallest(key: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k smallest entries of `key` [N], smallest first, ties by position; O(N)."""
    if k == 0:
        return np.zeros(0, np.int64)
    kth = np.partition(key, k - 1)[k - 1]
    less = np.flatnonzero(key < kth)
    chosen = np.concatenate([less, np.flatnonzero(key == kth)[:k - len(less)]])
    return chosen[np.lexsort((chosen, key[chosen]))]


def _contexts_hash(examples: Sequence[DialogueExample]) -> str:
    return hashlib.sha256(json.dumps([ex.context for ex in examples]).encode()).hexdigest()


def _lines(path):
    """(1-based line number, line without its newline) for the non-blank lines of a UTF-8 file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 ({e}); the readers take UTF-8 text.") from e
            if line.strip():
                yield number, line


def _nonempty(examples: list[DialogueExample], path) -> list[DialogueExample]:
    if not examples:
        raise ValueError(f"{path}: holds no (context, response) example; is it the right file and format?")
    return examples


class _Episodes:
    """Accumulates ParlAI messages into examples: the history grows by each message's text lines
    and then its label; a labelled message gives (history so far, label)."""

    def __init__(self, path):
        self.path, self.examples, self.history, self.conversation = path, [], [], 0

    def add(self, number: int, text: str, label: str | None) -> None:
        self.history += [t.strip() for t in text.split("\n") if t.strip()]
        if label is None:
            return
        if not label.strip():
            raise ValueError(f"{self.path}:{number}: the label (response) is empty.")
        if not self.history:
            raise ValueError(f"{self.path}:{number}: a labelled message with no context (empty text at the start "
                             "of an episode); the response needs something to answer.")
        self.examples.append(DialogueExample(join_turns(self.history), label.strip(), self.conversation))
        self.history.append(label.strip())

    def end(self) -> None:
        if self.history:
            self.conversation += 1
        self.history = []

    def finish(self) -> list[DialogueExample]:
        return _nonempty(self.examples, self.path)
