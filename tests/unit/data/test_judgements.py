"""Judged query sets: reading queries and TREC qrels (a bad line is named), writing them, shape query sets."""

import numpy as np
import pytest

from dual_encoder.data.judgements import QuerySet, QuerySetError, read_query_set, write_query_set
from dual_encoder.data.shape_queries import GROUPS, make_query_set, parse_query
from dual_encoder.data.synthetic import fits_scene, sample_scene


def _write(tmp_path, queries, qrels):
    (tmp_path / "queries.tsv").write_text(queries, encoding="utf-8")
    (tmp_path / "qrels.txt").write_text(qrels, encoding="utf-8")
    return tmp_path / "queries.tsv"


def test_reads_queries_groups_and_trec_qrels_with_three_or_four_fields(tmp_path):
    path = _write(
        tmp_path,
        "id\tgroup\tquery\nq1\tshape\ta star\nq2\tcolour\ta red shape\n",
        "# a comment\nq1 0 000001.png 1\nq1 0 000002.png 0\nq2 photos/cat.jpg 2\n",
    )
    query_set = read_query_set(path)
    assert query_set.queries == {"q1": "a star", "q2": "a red shape"}
    assert query_set.groups == {"q1": "shape", "q2": "colour"} and query_set.group_names() == ["shape", "colour"]
    assert query_set.qrels == {"q1": {"000001.png": 1, "000002.png": 0}, "q2": {"photos/cat.jpg": 2}}


def test_group_column_is_optional(tmp_path):
    query_set = read_query_set(_write(tmp_path, "query\tid\na dog\tq1\n", "q1 0 d 1\n"))
    assert query_set.groups == {"q1": "all"}


@pytest.mark.parametrize(
    "queries, qrels, message",
    [
        ("id\tquery\nq1\ta star\n", "q1 0 d1 1\nq1 d2\n", r"qrels.txt:2: expected 'query_id 0 doc_id relevance'"),
        ("id\tquery\nq1\ta star\n", "q1 0 d1 1\n\nq1 0 d2 high\n", r"qrels.txt:3: relevance 'high' is not an integer"),
        ("id\tquery\nq1\ta star\n", "q9 0 d1 1\n", r"qrels.txt:1: query id 'q9' is not in the queries file"),
        ("query\na star\n", "", r"queries.tsv:1: the header must name the columns 'id' and 'query'"),
        ("id\tquery\nq1\ta star\nq1\ta ring\n", "", r"queries.tsv:3: query id 'q1' appears twice"),
        ("id\tquery\nq1\ta star\textra\n", "", r"queries.tsv:2: expected 2 tab-separated columns, found 3"),
        ("id\tquery\n", "", r"queries.tsv: no queries"),
    ],
)
def test_a_bad_file_is_one_error_naming_the_line(tmp_path, queries, qrels, message):
    with pytest.raises(QuerySetError, match=message):
        read_query_set(_write(tmp_path, queries, qrels))


def test_missing_and_non_utf8_files_are_named(tmp_path):
    with pytest.raises(QuerySetError, match="queries file not found"):
        read_query_set(tmp_path / "nope.tsv")
    path = _write(tmp_path, "id\tquery\nq1\ta star\n", "")
    (tmp_path / "qrels.txt").write_bytes(b"q1 0 caf\xe9.png 1\n")
    with pytest.raises(QuerySetError, match="qrels.txt: not UTF-8"):
        read_query_set(path)


def test_write_then_read_round_trips(tmp_path):
    query_set = QuerySet({"a-1": "a star", "b-1": "a ring"}, {"a-1": "shape", "b-1": "shape"}, {"a-1": {"x.png": 1}, "b-1": {}})
    queries_path, qrels_path = write_query_set(query_set, tmp_path / "set")
    assert read_query_set(queries_path, qrels_path) == query_set


def test_shape_query_sets_judge_every_scene_by_what_it_holds():
    rng = np.random.default_rng(0)
    scenes = {f"{i:04d}.png": sample_scene(rng) for i in range(400)}
    query_set = make_query_set(scenes, min_relevant=5, seed=3)
    assert make_query_set(scenes, min_relevant=5, seed=3) == query_set  # deterministic
    assert set(query_set.groups.values()) == set(GROUPS)
    assert len(query_set.queries) > 150
    for query_id, text in query_set.queries.items():
        mentions = parse_query(text)
        relevant = set(query_set.qrels[query_id])
        assert len(relevant) >= 5
        # the judgements are exactly the scenes the query's words fit
        assert relevant == {doc for doc, scene in scenes.items() if fits_scene(mentions, scene)}, text


def test_shape_query_groups_read_as_people_type():
    rng = np.random.default_rng(1)
    scenes = {f"{i}.png": sample_scene(rng) for i in range(1000)}
    texts = {}
    query_set = make_query_set(scenes)
    for query_id, group in query_set.groups.items():
        texts.setdefault(group, []).append(query_set.queries[query_id])
    assert "a star" in texts["shape"] and "a red star" in texts["colour+shape"]
    assert "a small red star" in texts["size+colour+shape"] or "a large red star" in texts["size+colour+shape"]
    assert all(" and " in t for t in texts["two objects"])
    assert all(len(t.split()) <= 8 for group in texts.values() for t in group)
