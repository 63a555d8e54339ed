"""Dialogue data: the embedded chatterbot splits, the ParlAI/FbDialog/TSV readers, BM25 retrieval and its cache."""

from __future__ import annotations

import bm25s
import numpy as np
import pytest

from jdjax.data import dialogue as dl
from jdjax.data.dialogue import DialogueExample as Ex


@pytest.fixture(scope="module")
def chatterbot():
    return dl.chatterbot_dialogues(seed=0)


def test_chatterbot_splits_disjoint_deterministic_nonempty(chatterbot):
    conversations = {split: {ex.conversation for ex in exs} for split, exs in chatterbot.items()}
    assert set(chatterbot) == {"train", "val", "test"} and all(chatterbot.values())
    assert not conversations["train"] & conversations["val"]
    assert not conversations["train"] & conversations["test"]
    assert not conversations["val"] & conversations["test"]
    n = sum(map(len, conversations.values()))  # 2,025 conversations, 2,306 examples in chatterbot-corpus 1.3.3
    assert n > 2000 and sum(map(len, chatterbot.values())) > n
    assert 0.75 < len(conversations["train"]) / n < 0.85
    assert dl.chatterbot_dialogues(seed=0) == chatterbot
    # The corpus repeats opening questions across files: no context (so no opening turn) is in two splits.
    contexts = {split: {ex.context.lower() for ex in exs} for split, exs in chatterbot.items()}
    assert not contexts["train"] & (contexts["val"] | contexts["test"]) and not contexts["val"] & contexts["test"]
    assert dl.chatterbot_dialogues(seed=1)["test"] != chatterbot["test"]
    examples = [ex for exs in chatterbot.values() for ex in exs]
    assert all(ex.context.strip() and ex.response.strip() for ex in examples)
    # turn i >= 1 answers the i turns before it: within a conversation the contexts grow by one turn each
    by_conversation = {}
    for ex in examples:
        by_conversation.setdefault(ex.conversation, []).append(ex)
    multi = [exs for exs in by_conversation.values() if len(exs) > 1]
    assert multi
    for exs in multi:
        for i, ex in enumerate(exs):
            assert ex.context.count(dl.EOT_JOIN) == i
            if i:
                assert ex.context == dl.join_turns([exs[i - 1].context, exs[i - 1].response])
    with pytest.raises(ValueError, match="fractions"):
        dl.chatterbot_dialogues(fractions=(0.8, 0.3, 0.1))


def test_dialogue_texts_counts_each_turn_once():
    examples = [Ex("a", "b", 0), Ex("a __EOT__ b", "c", 0), Ex("x", "y", 1)]
    assert dl.dialogue_texts(examples) == ["a", "b", "c", "x", "y"]


# the examples of both ParlAI files below: a persona line and a greeting, then the history grows by each label
EPISODES = [
    Ex("your persona: i like cats. __EOT__ hi there", "hello! how are you?", 0),
    Ex(dl.join_turns(["your persona: i like cats.", "hi there", "hello! how are you?", "fine, and you?"]), "great", 0),
    Ex("what is ai?", "a field of science", 1),
]


def test_read_parlai_accumulates_history(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(
        "text:your persona: i like cats.\\nhi there\tlabels:hello! how are you?\n"
        "text:fine, and you?\tlabels:great|good\tepisode_done:True\n"
        "\n"
        "text:what is ai?\tlabels:a field of science\tepisode_done:True\n", encoding="utf-8")
    assert dl.read_parlai(path) == EPISODES


def test_read_fbdialog_episodes_by_message_id(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text(
        "1 your persona: i like cats.\n"
        "2 hi there\thello! how are you?\t\tfoo|bar\n"
        "3 fine, and you?\tgreat\n"
        "1 what is ai?\ta field of science\n", encoding="utf-8")
    assert dl.read_fbdialog(path) == EPISODES


def test_read_tsv_and_dir(tmp_path):
    for name, body in {"train.txt": "hi\thello\nhi __EOT__ hello\thow are you?\tfine\n",
                       "valid.txt": "a\tb\n", "test.txt": "c\td\n"}.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    assert dl.read_tsv(tmp_path / "train.txt") == [Ex("hi", "hello", 0),
                                                   Ex("hi __EOT__ hello __EOT__ how are you?", "fine", 1)]
    splits = dl.read_dialogue_dir(tmp_path, "tsv")
    assert splits["val"] == [Ex("a", "b", 0)] and splits["test"] == [Ex("c", "d", 0)]
    (tmp_path / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test.txt"):
        dl.read_dialogue_dir(tmp_path, "tsv")
    with pytest.raises(ValueError, match="format"):
        dl.read_dialogue_dir(tmp_path, "csv")


@pytest.mark.parametrize("reader, body, message", [
    (dl.read_tsv, "hi\thello\njust one field\n", "line 2"),
    (dl.read_parlai, "text:hi\tlabels:hello\nno colon here\n", "line 2"),
    (dl.read_parlai, "text:hi\tlabels:hello\tepisode_done:maybe\n", "line 1"),
    (dl.read_fbdialog, "1 hi\thello\n\nhi\thello\n", "line 3"),
    (dl.read_fbdialog, "1 hi\t\n", "line 1"),
])
def test_malformed_line_names_file_and_line(tmp_path, reader, body, message):
    path = tmp_path / "bad.txt"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        reader(path)
    assert f"{path}:{message.split()[1]}:" in str(info.value)


CONTEXTS = [
    "the cat sat on the mat",
    "a dog chased the cat",
    "stock markets fell sharply today",
    "the cat sat on the mat",  # duplicate of 0: one document, standing for example 0
    "markets rallied after the news",
    "my cat likes the warm mat",
    "rain is expected tomorrow",
    "quantum computers factor numbers",
]


def test_bm25_nearest_self_excluded_and_bottom_is_lowest():
    index = dl.RetrievalIndex(CONTEXTS)
    assert index.num_docs == 7 and list(index.doc_example) == [0, 1, 2, 4, 5, 6, 7]
    top, bottom = index.retrieve(CONTEXTS, k_top=3, k_bottom=2, exclude_self=True)
    assert top.shape == (8, 2) and bottom.shape == (8, 2) and top.dtype == np.int32
    assert top[0, 0] == 5 and top[2, 0] == 4  # the nearest context is the expected one
    assert 0 not in top[[0, 3]] and 0 not in bottom[[0, 3]]  # self excluded, also for its duplicate 3
    assert all(q not in top[q] and q not in bottom[q] for q in range(len(CONTEXTS)))
    # reference: scores of every training example from bm25s directly, self's document removed
    retriever = bm25s.BM25()
    retriever.index([dl.bm25_tokens(c) for c in np.asarray(CONTEXTS)[index.doc_example]], show_progress=False)
    for q, query in enumerate(CONTEXTS):
        scores = retriever.get_scores(dl.bm25_tokens(query))
        candidates = [d for d, e in enumerate(index.doc_example) if CONTEXTS[e] != query]
        ranked = sorted(scores[candidates])
        doc_of = {e: d for d, e in enumerate(index.doc_example)}
        np.testing.assert_allclose([scores[doc_of[e]] for e in top[q]], ranked[::-1][:2])
        np.testing.assert_allclose([scores[doc_of[e]] for e in bottom[q]], ranked[:2])
    # valid/test queries use the train index as it is: an identical context is its own best match
    top_val, _ = index.retrieve(["the cat sat on the mat"], k_top=2, k_bottom=1)
    assert top_val.shape == (1, 2) and top_val[0, 0] == 0
    with pytest.raises(ValueError, match="lower them"):
        index.retrieve(CONTEXTS[:1], k_top=8, exclude_self=True)


def test_bm25_ties_broken_by_seed():
    index = dl.RetrievalIndex([f"word{i}" for i in range(50)])  # every query scores 0 on every other document
    queries = ["unrelated"] * 20
    _, bottom = index.retrieve(queries, k_top=1, k_bottom=3, seed=0)
    assert len({tuple(row) for row in bottom}) > 1  # not the same three documents for every query
    np.testing.assert_array_equal(bottom, index.retrieve(queries, k_top=1, k_bottom=3, seed=0)[1])


def test_retrieval_cache_round_trip(tmp_path, monkeypatch):
    splits = {"train": [Ex(c, f"r{i}", i) for i, c in enumerate(CONTEXTS)],
              "val": [Ex("the cat on a mat", "x", 0), Ex("markets fell", "y", 1)]}
    first = dl.retrieval_cache(splits, tmp_path, k_top=3, k_bottom=2)
    assert first["train"]["top"].shape == (8, 2) and first["val"]["top"].shape == (2, 3)
    assert sorted(p.name for p in (tmp_path / "retrieval").iterdir()) == [
        "train.json", "train_bottom.npy", "train_top.npy", "val.json", "val_bottom.npy", "val_top.npy"]

    def no_index(*args, **kwargs):
        raise AssertionError("the cache should have been read, not recomputed")

    monkeypatch.setattr(dl, "RetrievalIndex", no_index)
    again = dl.retrieval_cache(splits, tmp_path, k_top=3, k_bottom=2)
    for split in splits:
        for k in ("top", "bottom"):
            np.testing.assert_array_equal(again[split][k], first[split][k])
    with pytest.raises(ValueError, match="other data or settings"):
        dl.retrieval_cache(splits, tmp_path, k_top=4, k_bottom=2)
