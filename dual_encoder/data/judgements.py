"""Judged query sets: a queries file plus TREC-style relevance judgements (qrels), read and written.

Files:
    queries.tsv   tab-separated with a header row: `id`, `query` and optionally `group` (e.g. "colour+shape").
    qrels.txt     TREC qrels, one judgement a line: `query_id 0 doc_id relevance` (or `query_id doc_id relevance`);
                  whitespace-separated; a doc id is an image id or an image path relative to the gallery
                  (`000123.png`, `photos/cat.jpg`); relevance is an integer (0 = judged not relevant).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Optional

from dual_encoder.errors import DualEncoderError

QUERIES_FILE = "queries.tsv"
QRELS_FILE = "qrels.txt"
DEFAULT_GROUP = "all"


class QuerySetError(DualEncoderError, ValueError):
    """A queries or qrels file that cannot be read; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class QuerySet:
    """Queries with their groups and relevance judgements.

    Args:
        queries: query id -> query text, in file order.
        groups: query id -> group name (`DEFAULT_GROUP` when the file has none).
        qrels: query id -> {doc id -> relevance}.
    """

    queries: dict[str, str]
    groups: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def group_names(self) -> list[str]:
        """Groups in the order their first query appears."""
        return list(dict.fromkeys(self.groups.values()))


def read_query_set(queries_path: str | Path, qrels_path: Optional[str | Path] = None) -> QuerySet:
    """Read `queries.tsv` and its qrels (default: `qrels.txt` beside it); bad lines raise `QuerySetError`."""
    queries_path = Path(queries_path)
    qrels_path = Path(qrels_path) if qrels_path is not None else queries_path.parent / QRELS_FILE
    queries, groups = _read_queries(queries_path)
    qrels = _read_qrels(qrels_path, queries)
    return QuerySet(queries, groups, qrels)


def write_query_set(query_set: QuerySet, directory: str | Path) -> tuple[Path, Path]:
    """Write `queries.tsv` and `qrels.txt` (relevant judgements only, sorted) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    queries_path, qrels_path = directory / QUERIES_FILE, directory / QRELS_FILE
    with open(queries_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "group", "query"])
        for query_id, text in query_set.queries.items():
            writer.writerow([query_id, query_set.groups[query_id], text])
    with open(qrels_path, "w", encoding="utf-8") as handle:
        for query_id, judged in query_set.qrels.items():
            for doc_id in sorted(judged):
                handle.write(f"{query_id} 0 {doc_id} {judged[doc_id]}\n")
    return queries_path, qrels_path


def _open(path: Path, what: str):
    if not path.is_file():
        raise QuerySetError(f"{what} file not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise QuerySetError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _read_queries(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    lines = _open(path, "queries")
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or not {"id", "query"} <= set(rows[0]):
        raise QuerySetError(f"{path}:1: the header must name the columns 'id' and 'query' (and optionally 'group')")
    header = rows[0]
    queries, groups = {}, {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise QuerySetError(f"{path}:{number}: expected {len(header)} tab-separated columns, found {len(row)}")
        values = dict(zip(header, (cell.strip() for cell in row)))
        query_id, text = values["id"], values["query"]
        if not query_id or not text:
            raise QuerySetError(f"{path}:{number}: empty query id or query text")
        if query_id in queries:
            raise QuerySetError(f"{path}:{number}: query id '{query_id}' appears twice")
        queries[query_id], groups[query_id] = text, values.get("group") or DEFAULT_GROUP
    if not queries:
        raise QuerySetError(f"{path}: no queries")
    return queries, groups


def _read_qrels(path: Path, queries: dict[str, str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {query_id: {} for query_id in queries}
    for number, line in enumerate(_open(path, "qrels"), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (3, 4):
            raise QuerySetError(
                f"{path}:{number}: expected 'query_id 0 doc_id relevance' (4 fields), found {len(fields)} fields"
            )
        query_id, doc_id, relevance = fields[0], fields[-2], fields[-1]
        if query_id not in queries:
            raise QuerySetError(f"{path}:{number}: query id '{query_id}' is not in the queries file")
        try:
            qrels[query_id][doc_id] = int(relevance)
        except ValueError:
            raise QuerySetError(
                f"{path}:{number}: relevance '{relevance}' is not an integer (a line is 'query_id 0 doc_id relevance')"
            ) from None
    return qrels
