"""`blockrl CMD --help` lists every field of CMD's config with its type, default and docstring."""

import importlib

import pytest

from trainers.cli import COMMANDS, main


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.config], ids=lambda c: c.name)
def test_help_lists_every_config_field(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command.name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    module, cls = command.config.split(":")
    config = getattr(importlib.import_module(module), cls)
    assert f"config fields ({cls};" in out
    for name, field in config.model_fields.items():
        assert f"  {name}" in out, f"{command.name} --help lacks {name}"
        if field.description:  # the docstring's first words follow the field's line
            assert " ".join(field.description.split()[:4]) in " ".join(out.split())


def test_help_names_types_defaults_and_nested_sections(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "  steps: int = 20" in out
    assert "  rollout.sampler: ar | lossless | logit_mix | auto = 'lossless'" in out
    assert "  rollout.history.max_tokens: int = 1000000" in out
    assert "configs/grpo_tiny.yaml" in out  # the preset sets some of them
