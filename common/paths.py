"""Where blockrl's shipped files are, wherever it is installed or run from.

The presets (`configs/*.yaml`), the shipped checkpoint (`checkpoints/tiny-moe`) and the regress baseline are package
data: they sit beside the packages in a checkout, an editable install and a wheel alike. A relative path that does
not exist from the working directory is looked up there, so `checkpoint: checkpoints/tiny-moe` in a preset works from
any directory.
"""

from __future__ import annotations

from pathlib import Path

INSTALL_ROOT = Path(__file__).resolve().parents[1]  # the folder holding common/, configs/, checkpoints/
CONFIG_DIR = INSTALL_ROOT / "configs"
SHIPPED_CHECKPOINT = INSTALL_ROOT / "checkpoints" / "tiny-moe"
SHIPPED_BPE_CHECKPOINT = INSTALL_ROOT / "checkpoints" / "tiny-moe-bpe"  # byte-level BPE, ChatML, no BOS


def resolve_shipped(path: str) -> str:
    """`path` itself when it exists (or is absolute); else the shipped file of that relative path, if there is one."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return path
    shipped = INSTALL_ROOT / p
    return str(shipped) if shipped.exists() else path
