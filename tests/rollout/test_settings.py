"""The typed Ray boundary: engine and sampling settings are validated in the driver, naming the field, before any
actor exists; workers and the pool refuse untyped settings."""

import pytest
from pydantic import ValidationError

from common.config import ConfigError, load_config
from rollout.batch.config import RolloutJobConfig
from rollout.pool import RolloutPool
from rollout.settings import EngineSettings, WorkerSettings
from rollout.types import SamplingParams, with_eos
from rollout.worker import RolloutWorker


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"levels": [1, 2]}, "levels"),
        ({"sampler": "fast"}, "sampler"),
        ({"mix_weight": 2.0}, "mix_weight"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_engine_settings_name_the_bad_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        EngineSettings(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_job_config_errors_name_the_field_in_the_driver():
    with pytest.raises(ConfigError, match="levels"):
        load_config(RolloutJobConfig, "rollout", ["levels=[3]"])
    with pytest.raises(ConfigError, match="shard_timeout_s"):
        load_config(RolloutJobConfig, "rollout", ["shard_timeout_s=0"])


def test_jobs_split_out_the_typed_settings():
    cfg = load_config(RolloutJobConfig, "rollout", ["levels=[0, 2]", "workers=3"])
    assert cfg.engine_settings() == EngineSettings(
        sampler=cfg.sampler, levels=[0, 2], mix_weight=cfg.mix_weight, max_batch=cfg.max_batch
    )
    assert isinstance(cfg.worker_settings(), WorkerSettings) and cfg.worker_settings().workers == 3


def test_worker_and_pool_refuse_untyped_engine_settings():
    with pytest.raises(TypeError, match="EngineSettings"):
        RolloutWorker("unused", {"sampler": "lossless"})
    with pytest.raises(TypeError, match="EngineSettings"):
        RolloutPool("unused", {"sampler": "lossless"})


def test_worker_paths_stop_at_the_tokenizer_eos_unless_told_otherwise(tokenizer):
    """Shards built without an EOS still stop at the tokenizer's (as `generate()` does); an explicit one is kept."""
    assert with_eos(SamplingParams(), (tokenizer.eos_token_id,)).eos_token_id == (tokenizer.eos_token_id,)
    assert with_eos(SamplingParams(eos_token_id=7), (tokenizer.eos_token_id,)).eos_token_id == 7
    assert with_eos(SamplingParams(), ()).eos_token_id is None
