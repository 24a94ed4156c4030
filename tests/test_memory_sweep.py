"""The sanitizer sweep's case lists (cupyflash/memory_sweep.py), without a GPU: each sanitized
process is handed one case id, so every id of the sweep and of its small set must name one case."""

from __future__ import annotations

from cupyflash import memory_sweep


def test_every_case_id_is_unique_and_found() -> None:
    for small in (False, True):
        ids = [c.id for c in memory_sweep.cases(small=small)]
        assert len(ids) == len(set(ids)), "duplicate case ids"
        for case in memory_sweep.cases(small=small):
            assert memory_sweep.by_id(case.id) == case  # racecheck's own cases too (2026-12-07: d32)


def test_the_small_set_races_the_builds_the_defaults_lack() -> None:
    small = {c.id for c in memory_sweep.cases(small=True)}
    assert any(i.startswith("wgmma-dkdv-") and "-d32-" in i for i in small)
    assert any(i.startswith("wgmma-dkdv-") and "-d160-" in i for i in small)
    assert sum(i.endswith("-det") for i in small) == len(memory_sweep.DETERMINISTIC_SMALL_HEAD_DIMS)
