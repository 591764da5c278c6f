"""Harmful tasks that are not mislabeled (tasks/harmful.py): duplicate and off-distribution kinds,
their recorded truth, files and refusals, and the detection experiment with kind = off-distribution."""

from __future__ import annotations

import json

import pytest
import torch

import metainfluence.tasks.pool as pool_mod
from metainfluence.data import load_digits
from metainfluence.errors import PoolError, SettingsError
from metainfluence.meta.checkpoint import pool_fingerprint
from metainfluence.tasks import TaskPool, build_pool, corrupt_labels, corrupt_tasks, duplicate_tasks, off_distribution_tasks

KINDS = {
    "duplicate": lambda p, seed=3: duplicate_tasks(p, 0.3, seed=seed, n_sources=2),
    "invert": lambda p, seed=3: off_distribution_tasks(p, 0.3, seed=seed),
    "noise": lambda p, seed=3: off_distribution_tasks(p, 0.3, seed=seed, transform="noise", noise=0.5),
}


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def pool(digits):
    return build_pool(digits, "train", 5, 1, 3, 25, seed=0)


def _all_arrays(p: TaskPool) -> dict:
    return p._arrays()


@pytest.mark.parametrize("name", list(KINDS))
def test_kind_counts_truth_labels_and_untouched_tasks(digits, pool, name):
    c = KINDS[name](pool)
    flags = c.corrupted_tasks
    assert int(flags.sum()) == round(0.3 * 25) == 8  # round half up of 7.5
    # labels stay correct: nothing flipped, masks empty, true labels = labels
    assert not c.support_corrupted.any() and not c.query_corrupted.any()
    assert torch.equal(c.support_y, c.support_true_y) and torch.equal(c.query_y, c.query_true_y)
    c.check_dataset(digits)  # every example is still of the class its label names
    t, t0 = c.tensors(digits), pool.tensors(digits)
    # uncorrupted tasks are byte-identical, in the index arrays and in the tensors
    for k in ("classes", "support_ids", "query_ids", "support_y", "query_y"):
        assert torch.equal(getattr(c, k)[~flags], getattr(pool, k)[~flags]), k
    for k in ("support_x", "query_x", "support_y", "query_y"):
        assert torch.equal(getattr(t, k)[~flags], getattr(t0, k)[~flags]), k
    assert ((t.support_x[flags] - t0.support_x[flags]).abs().flatten(1).max(1).values > 0).all()
    assert t.support_x.min() >= 0 and t.support_x.max() <= 1
    if name == "duplicate":
        src = c.duplicate_of[flags]
        assert set(src.tolist()) == set(c.corruption["sources"]) and len(c.corruption["sources"]) == 2
        assert not flags[src].any() and (c.duplicate_of[~flags] == -1).all()
        for k in ("classes", "support_ids", "query_ids"):
            assert torch.equal(getattr(c, k)[flags], getattr(pool, k)[src])
        near = (t.support_x[flags] - t0.support_x[src]).abs().mean()
        assert 0 < near < 0.06  # a near-copy: only the small noise differs
        assert len(set(c.input_seed[flags].tolist())) == 8  # each copy its own noise
    else:
        assert (c.duplicate_of == -1).all()
        for k in ("classes", "support_ids", "query_ids"):
            assert torch.equal(getattr(c, k), getattr(pool, k))
        if name == "invert":
            assert torch.allclose(t.support_x[flags], 1 - t0.support_x[flags])


@pytest.mark.parametrize("name", list(KINDS))
def test_kind_is_seeded_and_survives_save_load_and_subset(digits, pool, name, tmp_path):
    a, b, other = KINDS[name](pool), KINDS[name](pool), KINDS[name](pool, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(_all_arrays(a).values(), _all_arrays(b).values()))
    assert torch.equal(a.tensors(digits).query_x, b.tensors(digits).query_x)
    assert not torch.equal(a.corrupted_tasks, other.corrupted_tasks)
    a.save(tmp_path / "p")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["corruption"]["kind"] == a.corruption_kind and doc["corrupted_task_ids"] == a.task_ids[a.corrupted_tasks].tolist()
    back = TaskPool.load(tmp_path / "p", dataset=digits)
    assert back.corruption == a.corruption and all(torch.equal(x, y) for x, y in zip(_all_arrays(a).values(), _all_arrays(back).values()))
    assert torch.equal(back.tensors(digits).support_x, a.tensors(digits).support_x)
    assert pool_fingerprint(back) == pool_fingerprint(a) != pool_fingerprint(pool)  # never mistaken for the clean pool
    # a subset keeps each task's recipe, so its inputs are those of the full pool
    ids = a.task_ids[a.corrupted_tasks][:3]
    sub = a.subset(ids)
    assert sub.corrupted_tasks.all() and torch.equal(sub.tensors(digits).support_x, a.tensors(digits).support_x[ids])


def test_input_corruption_refusals(digits, pool, tmp_path):
    c = off_distribution_tasks(pool, 0.3, seed=0)
    c.save(tmp_path / "c")
    # an edited recipe or record is refused by the checksum, like an edited label file
    doc = json.loads((tmp_path / "c.json").read_text())
    doc["corruption"]["transform"] = "noise"
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(PoolError, match="does not match"):
        TaskPool.load(tmp_path / "c")
    # inconsistent truth is refused in memory as well
    bad = [
        (dict(corrupted_tasks=~c.corrupted_tasks), "flags disagree"),
        (dict(input_noise=None), "only part of the input recipe"),
        (dict(corruption=None), "does not match its input recipe"),
        (dict(input_transform=torch.full((25,), 7)), "flags disagree|unknown transform"),
    ]
    import dataclasses

    for change, msg in bad:
        with pytest.raises(PoolError, match=msg):
            dataclasses.replace(c, **change)._check_shapes()
    with pytest.raises(PoolError, match="already corrupted"):
        duplicate_tasks(corrupt_labels(pool, 0.2, 0.5), 0.2)
    with pytest.raises(PoolError, match="already corrupted"):
        corrupt_labels(c, 0.2, 0.5)
    for call, msg in [
        (lambda: duplicate_tasks(pool, 1.5), r"rho_task=1.5 is outside"),
        (lambda: duplicate_tasks(pool, 0.96, n_sources=2), "fewer than n_sources"),
        (lambda: duplicate_tasks(pool, 0.2, noise=0), "noise=0"),
        (lambda: off_distribution_tasks(pool, 0.2, transform="blur"), "transform='blur' is invalid"),
        (lambda: off_distribution_tasks(pool, 0.01), "rounds to 0 tasks"),
        (lambda: corrupt_tasks(pool, "mixup"), "kind='mixup' is invalid"),
    ]:
        with pytest.raises(PoolError, match=msg):
            call()
    # the labels kind is today's corruption, unchanged (no 'kind' key, no recipe, same fingerprint)
    lab = corrupt_tasks(pool, "labels", 0.2, seed=1, rho_label=0.5)
    ref = corrupt_labels(pool, 0.2, 0.5, seed=1)
    assert lab.input_transform is None and "kind" not in lab.corruption and pool_fingerprint(lab) == pool_fingerprint(ref)
    assert set(pool_mod._ARRAYS) == set(lab._arrays())


def test_detection_settings_refuse_unknown_kind(tmp_path):
    from metainfluence.experiments import load_experiment_settings

    cfg = tmp_path / "d.toml"
    cfg.write_text('[detection]\nkind = "mislabeled"\n')
    with pytest.raises(SettingsError, match="kind = 'mislabeled' is unknown"):
        load_experiment_settings("detection", str(cfg), quick=True)
    cfg.write_text('[detection]\nkind = "off-distribution"\noffdist_transform = "blur"\n')
    with pytest.raises(SettingsError, match="offdist_transform = 'blur'"):
        load_experiment_settings("detection", str(cfg), quick=True)


@pytest.mark.slow
def test_detection_quick_off_distribution(tmp_path):
    from metainfluence.experiments import run_experiment

    cfg = tmp_path / "off.toml"
    cfg.write_text('[detection]\nkind = "off-distribution"\nmethods = ["task-if", "loss", "random"]\nedit_fractions = [0.25]\nself_influence = false\n'
                   'edit_max_iter = 50\n')  # the edits are checked elsewhere; short solves keep this test short (no timed assertion: load varies)
    res = run_experiment("detection", str(cfg), True, str(tmp_path / "out"), log=lambda s: None)
    assert res["corruption_kind"] == "off-distribution" and res["corruption"]["transform"] == "invert"
    assert res["n_corrupted"] == round(0.2 * res["n_tasks"]) and {r["method"] for r in res["detection"]} == {"task-if", "loss", "random"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["settings"]["detection"]["kind"] == "off-distribution" and "inverted" in saved["kind_description"]
    back = TaskPool.load(tmp_path / "out" / "pools" / "train")
    assert back.corruption_kind == "off-distribution" and int(back.corrupted_tasks.sum()) == res["n_corrupted"]
