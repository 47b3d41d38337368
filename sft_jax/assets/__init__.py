"""Small files bundled with the package: the stories260K model (MIT) and the demo dataset."""

import pathlib

ASSETS_DIR = pathlib.Path(__file__).resolve().parent


def asset_path(name: str) -> str:
    """Absolute path of a bundled asset (for example "stories260K" or "demo/train.jsonl")."""
    return str(ASSETS_DIR / name)
