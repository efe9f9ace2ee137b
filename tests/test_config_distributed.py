"""models.yaml's `distributed:` key: accepted shapes, and errors naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_gw.config import load_config
from tests.test_config import load_error, model_yaml, write_config


def test_distributed_defaults_to_ring_on_this_machine(tmp_path: Path) -> None:
    path = write_config(tmp_path, model_yaml("distributed: {ranks: 3}"))
    dist = load_config(path, env={"HOME": str(tmp_path)}).models["m1"].distributed
    assert (dist.ranks, dist.backend, dist.hosts) == (3, "ring", ("127.0.0.1",) * 3)
    path = write_config(tmp_path, model_yaml("distributed: {ranks: 2, backend: nccl, "
                                             "hosts: [localhost, 127.0.0.1]}"))
    dist = load_config(path, env={"HOME": str(tmp_path)}).models["m1"].distributed
    assert (dist.backend, dist.hosts) == ("nccl", ("localhost", "127.0.0.1"))
    path = write_config(tmp_path, model_yaml(""))
    assert load_config(path, env={"HOME": str(tmp_path)}).models["m1"].distributed is None


K = "models.m1.distributed"


@pytest.mark.parametrize(
    ("body", "key", "needle"),
    [
        ("distributed: 2", K, "mapping"),
        ("distributed: {}", f"{K}.ranks", "missing `ranks`"),
        ("distributed: {ranks: 1}", f"{K}.ranks", "out of range"),
        ("distributed: {ranks: two}", f"{K}.ranks", "whole number"),
        ("distributed: {rank: 2}", f"{K}.rank", "did you mean `ranks`"),
        ("distributed: {ranks: 2, backend: gloo}", f"{K}.backend", "ring, mpi, nccl"),
        ("distributed: {ranks: 2, backend: mpi}", f"{K}.backend", "mpirun"),
        ("distributed: {ranks: 2, hosts: [127.0.0.1]}", f"{K}.hosts", "1 hosts for 2 ranks"),
        ("distributed: {ranks: 2, hosts: 127.0.0.1}", f"{K}.hosts", "list of host names"),
        ("distributed: {ranks: 2, hosts: [10.0.0.2, 127.0.0.1]}", f"{K}.hosts",
         "not supported yet: 10.0.0.2"),
        ("distributed: {ranks: 2}\nprompt_cache: {disk: /tmp/x}", "models.m1.prompt_cache.disk",
         "disk tier"),
    ],
)
def test_bad_distributed_names_the_key(tmp_path: Path, body: str, key: str, needle: str) -> None:
    error = load_error(tmp_path, model_yaml(body))
    assert error.key == key
    assert needle in str(error)
    assert error.fix


def test_distributed_is_for_llm_models_only(tmp_path: Path) -> None:
    text = "models:\n  e:\n    type: embedding\n    path: org/repo\n    distributed: {ranks: 2}\n"
    error = load_error(tmp_path, text)
    assert error.key == "models.e.distributed" and "type llm" in str(error)
