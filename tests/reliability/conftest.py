"""Repos with something wrong in them, published once for the reliability suite."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.model_factory import build_model_dir


def _bad_header_safetensors(path: Path) -> None:
    """A safetensors file whose header parses as JSON but declares a negative dimension."""
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [-1, 32], "data_offsets": [0, 0]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.fixture(scope="session")
def bad_repos(hub, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-repos")
    repos = {}

    star = build_model_dir("llama", root / "star", seed=21)
    (star / "*.model").write_bytes(b"a file literally named *.model")  # selected (tokenizer pattern) by exact name
    (star / "original").mkdir()
    (star / "original" / "huge.model").write_bytes(b"\0" * (3 << 20))  # 3 MB never selected
    repos["star"] = "reliability/star-model"

    negative = build_model_dir("llama", root / "negative", seed=22)
    _bad_header_safetensors(negative / "model.safetensors")
    repos["negative"] = "reliability/negative-dim"

    deep = build_model_dir("llama", root / "deep", seed=23)
    (deep / "config.json").write_text('{"a": ' * 200_000 + "1" + "}" * 200_000)
    repos["deep"] = "reliability/deep-config"

    for key, src in (("star", star), ("negative", negative), ("deep", deep)):
        hub.publish(repos[key], src)
    return repos
