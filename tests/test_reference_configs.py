"""The reference configs that reproduce the paper load with their cluster layout, and say what
they should reach and what they cost."""

from __future__ import annotations

import pytest

from glotok.jobs import load_job_config
from tests.test_config import paper_files

# (config, global batch of the paper's recipe, numbers from GLOTOK.md its header must state)
REFERENCE = [
    ("tokenizer/glotok-b", 240, ["rFID 0.92", "PSNR 22.4", "1.21", "1.27", "1.43"]),
    ("tokenizer/glotok-2x", 240, ["rFID 0.83", "PSNR 22.7"]),
    ("ar/far-b", 256, ["gFID 3.13", "IS 280.7"]),
    ("ar/far-l", 256, ["gFID 2.98", "IS 285.3"]),
]


def per_rank_batch(cfg) -> int:
    if "global_batch_size" in cfg.data:
        return cfg.data.global_batch_size // cfg.cluster.num_workers
    return cfg.data.batch_size


@pytest.mark.parametrize("name,global_batch,numbers", REFERENCE)
def test_reference_config_loads_with_a_gpu_layout_that_keeps_the_paper_batch(
        repo, tmp_path, name, global_batch, numbers):
    overrides = paper_files(tmp_path) if name.startswith("tokenizer/") else []
    cfg = load_job_config(repo / f"configs/{name}.yaml", overrides)
    c = cfg.cluster
    assert c.use_gpu == "true" and c.gpus_per_worker == 1 and c.num_workers == 8
    assert c.max_failures >= 1 and c.cpus_per_worker > cfg.data.num_workers
    assert per_rank_batch(cfg) * c.num_workers == global_batch


@pytest.mark.parametrize("name,global_batch,numbers", REFERENCE)
def test_reference_config_states_its_expected_numbers_and_gpu_hours(repo, name, global_batch,
                                                                    numbers):
    header = (repo / f"configs/{name}.yaml").read_text().split("\nrun:")[0]
    for n in numbers:
        assert n in header, f"configs/{name}.yaml does not state {n}"
    assert "GPU-hours, an ESTIMATE" in header and "A100" in header and "H100" in header
    assert "GPUs" in header
