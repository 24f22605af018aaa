"""Config loading: presets, overrides, and errors that name the field path (exit code 2 from the CLI)."""

import pytest

from common.config import ConfigError, load_config
from trainers.cli import main
from trainers.lm.train import ConvertConfig, PretrainConfig


def test_presets_load():
    cfg = load_config(PretrainConfig, "tiny_pretrain")
    assert cfg.model.num_experts == 8
    conv = load_config(ConvertConfig, "convert_tiny_moe")
    assert conv.tidar.train_block_size == conv.tidar.block_size + 1


def test_override_applies_with_yaml_types():
    cfg = load_config(PretrainConfig, "tiny_pretrain", ["optim.lr=0.01", "data.tasks=[chain_sum]", "seed=7"])
    assert cfg.optim.lr == 0.01 and cfg.data.tasks == ["chain_sum"] and cfg.seed == 7
    # YAML 1.1 reads 1e-4 (no dot) as a string; configs read it as the number everyone means
    assert load_config(PretrainConfig, "tiny_pretrain", ["optim.lr=3e-4"]).optim.lr == 3e-4


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lrr=0.1", "optim.lrr: unknown field"),
        ("optim.lr=fast", "optim.lr:"),
        ("optim.steps=-3", "optim.steps:"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio:"),
        ("model.arch=gpt9", "model.arch:"),
        ("data.tasks=[chain_sum,nope]", "data.tasks.1:"),
        ("threads=1.5", "threads:"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(PretrainConfig, "tiny_pretrain", [override])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(PretrainConfig, None, ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, "no_such_preset.yaml")


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(PretrainConfig, bad)


def test_cli_exits_2_with_field_path(capsys):
    code = main(["pretrain", "--config", "tiny_pretrain", "--set", "optim.batch_size=zero"])
    assert code == 2
    assert "optim.batch_size" in capsys.readouterr().err


def test_convert_without_init_is_a_config_error(tmp_path, capsys):
    code = main(["convert", "--set", f"run_dir={tmp_path}", "--set", f"init={tmp_path / 'missing'}"])
    assert code == 2
    assert "init:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("optim.lrr=0.1", "optim.lrr: unknown field (did you mean optim.lr?)"),
        ("sede=3", "sede: unknown field (did you mean seed?)"),
        ("model.hiden_size=64", "model.hiden_size: unknown field (did you mean model.hidden_size?)"),
    ],
)
def test_an_unknown_field_names_the_closest_valid_one(override, hint):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, "tiny_pretrain", [override])
    assert hint in str(err.value)


def test_an_unknown_field_with_no_near_name_gets_no_guess():
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, "tiny_pretrain", ["zzzzzz=1"])
    assert "zzzzzz: unknown field (got 1)" in str(err.value) and "did you mean" not in str(err.value)
