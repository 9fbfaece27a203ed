"""Bad flag values: one line, exit 2, before any model or folder is touched (issue 9, item 12)."""

from __future__ import annotations

import pytest

from fsclip.cli import main

# a model that cannot load: if the flag were checked after loading, the error would name the model instead
NO_MODEL = "/no/such/model"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fsclip: error:"), err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["classify", ".", "--labels", "a,b", "--batch-size", "0"], "--batch-size"),
        (["classify", ".", "--labels", "a,b", "--batch-size", "-1"], "--batch-size"),
        (["classify", ".", "--labels", "a,b", "--top-k", "0"], "--top-k"),
        (["classify", ".", "--labels", "a,b", "--threshold", "2"], "--threshold"),
        (["classify", ".", "--labels", "a,b", "--threshold", "nan"], "--threshold"),
        (["predict", ".", "--adapter", "x", "--batch-size", "0"], "--batch-size"),
        (["predict", ".", "--adapter", "x", "--batch-size", "-1"], "--batch-size"),
        (["fit", ".", "--out", "x", "--shots", "0"], "--shots"),
        (["fit", ".", "--out", "x", "--lr", "-1e-3"], "--lr"),
        (["fit", ".", "--out", "x", "--epochs", "0"], "--epochs"),
        (["eval", "fewshot", "--dataset", "dtd", "--shots", "0"], "--shots"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_user_passes_an_impossible_flag_value(argv, flag, capsys):
    code = main([*argv, "--model", NO_MODEL])
    line = _one_error_line(capsys)
    assert code == 2
    assert flag in line and NO_MODEL not in line


def test_user_misspells_a_flag_and_gets_one_line(capsys):
    assert main(["classify", ".", "--labels", "a,b", "--top-kk", "3"]) == 2
    assert "--top-kk" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["search", "idx", "--like", "x.png"], "fsclip search"),
        (["index", "build", "photos", "--index", "idx", "--bogus"], "fsclip index build"),
        (["fit", "train", "--out", "x", "extra-folder"], "fsclip fit"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_unknown_flag_points_at_the_commands_own_help(argv, command, capsys):
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "unrecognized arguments" in line and line.endswith(f"(see '{command} --help')"), line


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["fit", "train", "--out", "x"], False),
        (["fit", "train", "--out", "x", "-v"], True),
        (["-v", "fit", "train", "--out", "x"], True),
        (["index", "info", "idx", "--verbose"], True),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_verbose_is_taken_before_or_after_the_command(argv, verbose):
    from fsclip.cli import build_parser

    assert build_parser().parse_args(argv).verbose is verbose
