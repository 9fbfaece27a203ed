"""A damaged index folder: one line saying what is wrong and how to recover, never a traceback or a wrong answer."""

from __future__ import annotations

import shutil
import sqlite3

import pytest
from _search_util import cli, one_error_line, photos, tiny_backend  # noqa: F401

from fsclip.search import ImageIndex

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_backend):  # noqa: F811
    """A 10-image index and a 30-image one built with the same model."""
    root = tmp_path_factory.mktemp("damage")
    photos(root / "photos", 10)
    photos(root / "other", 30, seed=1)
    for name, folder in (("p.idx", "photos"), ("other.idx", "other")):
        with ImageIndex.create(root / name, tiny_backend) as index:
            index.add([root / folder])
    return root


@pytest.fixture
def idx(pristine, tmp_path):
    shutil.copytree(pristine / "p.idx", tmp_path / "p.idx")
    return tmp_path / "p.idx"


def _faiss_file(idx):
    (f,) = idx.glob("vectors-*.faiss")
    return f


def _sql(idx, statement: str) -> None:
    con = sqlite3.connect(idx / "meta.sqlite")
    con.execute(statement)
    con.commit()
    con.close()


@pytest.mark.parametrize("table", ["files", "errors"])
def test_index_with_a_dropped_sqlite_table(idx, capsys, table):
    _sql(idx, f"DROP TABLE {table}")
    for argv in (["index", "info", idx], ["search", idx, "x"], ["index", "update", idx, "--device", "cpu"]):
        rc, _, err = cli(capsys, *argv)
        assert rc == 2
        one_error_line(err, f"index damaged: meta.sqlite has no table '{table}'; rebuild it with `fsclip index build")


@pytest.mark.parametrize("value", ["abc", "-3", ""])
def test_index_with_a_bad_generation_value(idx, capsys, value):
    _sql(idx, f"UPDATE info SET value = '{value}' WHERE key = 'generation'")
    rc, _, err = cli(capsys, "search", idx, "x")
    assert rc == 2
    one_error_line(err, f"index damaged: meta.sqlite records generation = '{value}', not an integer >= 0")


def test_index_with_its_faiss_file_deleted(idx, capsys):
    """Not "try again": the file is gone for good, and `index update` rebuilds it from meta.sqlite."""
    name = _faiss_file(idx).name
    _faiss_file(idx).unlink()
    rc, _, err = cli(capsys, "search", idx, "x")
    assert rc == 2
    one_error_line(err, f"index damaged: {name} is missing; run `fsclip index update {idx}`")
    rc, out, _ = cli(capsys, "index", "info", idx)
    assert rc == 0 and f"damaged:          {name} is missing" in out
    rc, _, err = cli(capsys, "index", "update", idx, "--device", "cpu", "-q")
    assert rc == 0, err
    rc, out, err = cli(capsys, "search", idx, "x", "-k", "20", "--format", "json")
    assert rc == 0 and len(out.splitlines()) == 10, err


def test_index_with_a_faiss_file_copied_from_another_index(idx, pristine, capsys):
    """The other index's file has more vectors and other ids: refused, not searched, not counted."""
    shutil.copy(_faiss_file(pristine / "other.idx"), _faiss_file(idx))
    rc, _, err = cli(capsys, "search", idx, "x")
    assert rc == 2
    one_error_line(err, "is not the file meta.sqlite recorded (checksum")
    rc, out, _ = cli(capsys, "index", "info", idx, "--format", "json")
    assert rc == 0 and '"images": 10' in out and "is not the file meta.sqlite recorded" in out


def test_index_with_a_truncated_faiss_file(idx, capsys):
    f = _faiss_file(idx)
    f.write_bytes(f.read_bytes()[:100])
    rc, _, err = cli(capsys, "search", idx, "x")
    assert rc == 2
    one_error_line(err, f"index damaged: {f.name} is not a readable FAISS file")
