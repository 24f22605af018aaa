"""Paired held-out comparison: the same checkpoint twice gives the identical result (same prompts, same seeds)."""

import json

from trainers.rl.heldout_compare import main


def test_same_checkpoint_twice_gives_identical_rates(tmp_path, capsys):
    out = tmp_path / "r.json"
    ck = "checkpoints/tiny-moe"
    main(
        [
            ck,
            ck,
            "--tasks",
            "chain_sum",
            "spell_backward",
            "--per-task",
            "3",
            "--seeds",
            "1",
            "--json",
            str(out),
        ]
    )
    a, b = json.loads(out.read_text())
    assert a["n"] == b["n"] == 6 and a["rate"] == b["rate"] and a["per_task"] == b["per_task"]
    assert a["tokens_per_forward"] == b["tokens_per_forward"] > 1.0  # the shipped drafter drafts
    assert "(+0.0 pts)" in capsys.readouterr().out
