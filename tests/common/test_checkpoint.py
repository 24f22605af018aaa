"""Checkpoint paths: a missing directory is named with its field, and a Hub id says how to download it first (the
CLI runs with the Hub offline)."""

import pytest

from common.checkpoint import require_checkpoint
from common.config import ConfigError
from trainers.cli import main


def test_a_hub_id_says_how_to_download_it(tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"init: Qwen/Qwen3-0\.6B is not a checkpoint directory .*Hub id.*offline"
    ):
        require_checkpoint("Qwen/Qwen3-0.6B", "init")
    assert main(["train", "--set", "checkpoint=Qwen/Qwen3-0.6B", "--set", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "hf download Qwen/Qwen3-0.6B --local-dir models/Qwen3-0.6B" in err


def test_a_missing_directory_gets_no_hub_hint(tmp_path):
    with pytest.raises(ConfigError) as e:
        require_checkpoint(tmp_path / "nope")
    assert "not a checkpoint directory" in str(e.value) and "Hub" not in str(e.value)
    (tmp_path / "org").mkdir()
    with pytest.raises(ConfigError) as e:  # an existing local folder is not taken for a Hub id
        require_checkpoint(tmp_path / "org")
    assert "Hub" not in str(e.value)
