"""The `dense` command: every subcommand exists; models and predict classify work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dense.cli import build_parser, main


def dense(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dense", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", ["models", "predict", "train", "eval", "convert", "bench",
                                     "export"])
def test_every_subcommand_has_help(command: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0


def test_models_json_lists_the_bundled_zoo(capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "--json"]) == 0
    models = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    assert {"efficientnet-lite0", "selfie-seg", "realesrgan-x4plus"} <= set(models)
    assert all(m["location"] == "bundled" for m in models.values())


def test_predict_classify_names_the_uniform_and_fails_cleanly_on_bad_files(tmp_path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    result = dense("predict", "classify", "examples/grace_hopper.jpg", str(bad), "--device", "cpu")
    assert result.returncode == 1
    line = json.loads(result.stdout.strip().splitlines()[0])
    assert line["top"][0]["label"] == "military uniform"
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_is_one_clear_line() -> None:
    result = dense("predict", "classify", "examples/rocket.jpg", "--model", "nope")
    assert result.returncode == 2
    assert result.stderr.startswith("error: Unknown model 'nope'")
