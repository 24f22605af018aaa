"""Checkpoint paths: a missing directory is named with its field, and a Hub id says how to download it first (the
CLI runs with the Hub offline). RNG states: the format always has a "cuda" entry, and older or other-GPU-count
checkpoints still restore."""

import random

import numpy as np
import pytest
import torch

from common.checkpoint import STATE_FILE, load_trainer_state, require_checkpoint, rng_state, set_rng_state
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


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_has_a_cuda_entry_per_visible_gpu():
    state = rng_state()
    assert set(state) == {"torch", "cuda", "numpy", "python"}
    assert isinstance(state["cuda"], list) and len(state["cuda"]) <= torch.cuda.device_count()


def test_a_state_saved_without_cuda_states_resumes_exactly(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = rng_state()
    del state["cuda"]  # the format before CUDA states were saved
    torch.save({"rng": state, "step": 7}, tmp_path / STATE_FILE)
    expected = _draws()
    _draws()  # move every generator on
    assert load_trainer_state(tmp_path) == {"step": 7}
    assert _draws() == expected


def test_cuda_states_for_more_gpus_than_present_restore_what_matches():
    state = rng_state()
    expected = _draws()
    extra = torch.zeros(16, dtype=torch.uint8)  # never applied: no GPU here has this index
    set_rng_state({**state, "cuda": state["cuda"] + [extra] * (torch.cuda.device_count() + 1)})
    assert _draws() == expected
