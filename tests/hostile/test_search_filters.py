"""Hostile `fsclip search` filters and reads that race with writers."""

from __future__ import annotations

import os

import pytest
from _search_util import cli, one_error_line, photos, tiny_backend  # noqa: F401

from fsclip.search import ImageIndex

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def idx(tmp_path_factory, tiny_backend):  # noqa: F811
    root = tmp_path_factory.mktemp("filters")
    for i, p in enumerate(photos(root / "photos", 6)):
        os.utime(p, (1_600_000_000 + i, 1_600_000_000 + i))
    with ImageIndex.create(root / "p.idx", tiny_backend) as index:
        index.add([root / "photos"])
    return root / "p.idx"


@pytest.mark.parametrize("argv, message", [
    (["--after", "1e13"], "--after '1e13' is out of range"),
    (["--before=-1e300"], "--before '-1e300' is out of range"),
    (["--min-width", "99999999999999999999"], "min_width must be an integer from 0 to 2147483647"),
    (["--glob", "["], "invalid --glob '['"),
    (["--prefix", ""], "--prefix is empty"),
], ids=["after-1e13", "before-far-past", "min-width-huge", "glob-unclosed-bracket", "prefix-empty"])
def test_search_with_an_impossible_filter(idx, capsys, argv, message):
    rc, out, err = cli(capsys, "search", idx, "a red circle", *argv)
    assert rc == 2 and out == ""
    one_error_line(err, message)


@pytest.mark.parametrize("after, count", [("9999-12-31", 0), ("0001-01-01", 6)], ids=["year-9999", "year-1"])
def test_search_after_a_date_at_the_ends_of_the_calendar(idx, capsys, after, count):
    """Every date the documented format can write works: nothing is newer than 9999, everything newer than 1."""
    rc, out, err = cli(capsys, "search", idx, "a red circle", "--after", after, "-k", "10", "--format", "json")
    assert rc == 0 and "Traceback" not in err, err
    assert len(out.splitlines()) == count


def test_search_api_with_an_out_of_range_filter(idx, tiny_backend):  # noqa: F811
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fsclip.search.service import build_app

    with ImageIndex.open(idx, tiny_backend) as index:
        client = TestClient(build_app(index), base_url="http://127.0.0.1")
        for params, fragment in [({"after": "1e13"}, "out of range"), ({"before": "9e99"}, "out of range"),
                                 ({"min_width": "99999999999999999999"}, "min_width"),
                                 ({"glob": "[abc"}, "has no closing"), ({"prefix": ""}, "path_prefix")]:
            resp = client.get("/api/search", params={"q": "x", **params})
            assert resp.status_code == 400 and fragment in resp.json()["error"], (params, resp.text)
        assert client.get("/api/search", params={"q": "x", "after": "9999-12-31"}).json()["count"] == 0


def test_search_while_the_index_changes_answers_from_one_state(tmp_path, tiny_backend):  # noqa: F811
    """A reader holding a snapshot gets lookups, example vectors and results from that one state, even
    after a writer has removed the example and published a new generation (what the service does per request)."""
    paths = photos(tmp_path / "photos", 8)
    writer = ImageIndex.create(tmp_path / "p.idx", tiny_backend)
    writer.add([tmp_path / "photos"])
    reader = ImageIndex.open(writer.path, tiny_backend)
    snap = reader.snapshot()
    example = str(paths[0])
    assert reader.lookup(example, snap) is not None
    paths[0].unlink()
    paths[1].unlink()
    writer.update()
    hits = reader.search(image=example, k=8, snapshot=snap)  # removed meanwhile: still its stored vector
    assert [h.path for h in hits][0] == example and len(hits) == 8
    assert {h.path for h in reader.search(text="x", k=8)} == {str(p) for p in paths[2:]}  # the new state
    assert reader.lookup(example) is None and len(reader) == 6
