"""Task pools, their files, label corruption, and sinusoid pools."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import metainfluence.tasks.pool as pool_mod
import metainfluence.tasks.storage as storage_mod
from fixtures import make_omniglot
from metainfluence.data import load_dataset, load_digits, load_omniglot
from metainfluence.errors import MetaInfluenceError, PoolError
from metainfluence.tasks import SinusoidPool, TaskPool, TaskTensors, build_pool, corrupt_labels, load_pool, sinusoid_pool

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    make_omniglot(root, drawers=6, background={"A": 4, "B": 4, "C": 4}, evaluation={"D": 4, "E": 4})
    return load_omniglot(root, image_size=10, cache_dir=root / "cache")  # 20 chars -> 12/1/5 (x4 rotations)


def _arrays(p: TaskPool) -> dict:
    return {k: getattr(p, k) for k in pool_mod._ARRAYS}


def _same(a: TaskPool, b: TaskPool) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_arrays(a).values(), _arrays(b).values()))


# =========================================================================== building
def test_task_structure(omni):
    p = build_pool(omni, "train", n_way=5, k_shot=2, q_query=3, n_tasks=30, seed=4)
    assert len(p) == 30 and p.classes.shape == (30, 5) and p.support_ids.shape == (30, 10) and p.query_ids.shape == (30, 15)
    assert torch.equal(p.task_ids, torch.arange(30))
    assert torch.equal(p.support_y[0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))  # class-major
    assert torch.equal(p.query_y[7], torch.arange(5).repeat_interleave(3))
    train = set(omni.classes("train"))
    for t in range(30):
        assert len(set(p.classes[t].tolist())) == 5 and set(p.classes[t].tolist()) <= train
        # every example is of the class its label names, and no example repeats within a task
        assert torch.equal(omni.targets[p.support_ids[t]], p.classes[t][p.support_y[t]])
        assert torch.equal(omni.targets[p.query_ids[t]], p.classes[t][p.query_y[t]])
        ids = torch.cat([p.support_ids[t], p.query_ids[t]]).tolist()
        assert len(set(ids)) == len(ids)
    # tasks differ from each other
    assert len({tuple(c) for c in p.classes.tolist()}) > 20


def test_determinism(omni, digits):
    for ds in (omni, digits):
        a = build_pool(ds, "train", 5, 1, 2, 25, seed=0)
        b = build_pool(ds, "train", 5, 1, 2, 25, seed=0)
        c = build_pool(ds, "train", 5, 1, 2, 25, seed=1)
        assert _same(a, b)
        assert not torch.equal(a.support_ids, c.support_ids)
        longer = build_pool(ds, "train", 5, 1, 2, 40, seed=0)  # a prefix of a longer pool
        assert _same(a, longer.subset(range(25)))
        other_q = build_pool(ds, "train", 5, 1, 3, 25, seed=0)
        assert not torch.equal(a.support_ids, other_q.support_ids)
    # same definition on a dataset with another fingerprint (other split) gives other tasks
    d2 = load_digits(split_seed=1)
    assert not torch.equal(build_pool(d2, "train", 5, 1, 2, 25, 0).support_ids, build_pool(digits, "train", 5, 1, 2, 25, 0).support_ids)


def test_global_rng_not_used(digits):
    np.random.seed(1)
    torch.manual_seed(1)
    a = build_pool(digits, "val", 3, 2, 2, 10, seed=5)
    np.random.seed(2)
    torch.manual_seed(2)
    b = build_pool(digits, "val", 3, 2, 2, 10, seed=5)
    assert _same(a, b)


def test_class_disjoint_splits(omni):
    pools = {s: build_pool(omni, s, 3, 1, 2, 40, seed=0) for s in SPLITS}
    used = {s: set(pools[s].classes.flatten().tolist()) for s in SPLITS}
    assert used["train"].isdisjoint(used["val"]) and used["train"].isdisjoint(used["test"]) and used["val"].isdisjoint(used["test"])
    # rotations of one character never cross splits either
    chars = {s: {c // 4 for c in used[s]} for s in SPLITS}
    assert chars["train"].isdisjoint(chars["test"]) and chars["val"].isdisjoint(chars["test"])
    assert all(pools[s].split_kind == "class" for s in SPLITS)


def test_example_disjoint_splits_digits(digits):
    pools = {s: build_pool(digits, s, 5, 2, 3, 200, seed=0) for s in SPLITS}
    ex = {s: set(torch.cat([pools[s].support_ids.flatten(), pools[s].query_ids.flatten()]).tolist()) for s in SPLITS}
    assert ex["train"].isdisjoint(ex["val"]) and ex["train"].isdisjoint(ex["test"]) and ex["val"].isdisjoint(ex["test"])
    assert set(pools["val"].classes.flatten().tolist()) == set(range(10))  # all classes in every split
    assert "example-disjoint" in pools["train"].disjointness


def test_tensors(omni):
    p = build_pool(omni, "test", 4, 2, 1, 6, seed=2)
    tt = p.tensors(omni)
    assert isinstance(tt, TaskTensors)
    assert tt.support_x.shape == (6, 8, 1, 10, 10) and tt.query_x.shape == (6, 4, 1, 10, 10)
    assert tt.support_x.dtype == torch.float32 and tt.support_y.dtype == torch.int64
    assert torch.equal(tt.support_x[3, 5], omni.load(p.support_ids[3, 5 : 6])[0])
    assert torch.equal(tt.query_x[5], omni.load(p.query_ids[5]))
    assert torch.equal(tt.support_y, p.support_y) and torch.equal(tt.query_y, p.query_y)


def test_build_errors(omni, digits):
    cases = [
        (dict(dataset=omni, split="val", n_way=5, k_shot=1, q_query=1, n_tasks=2), r"n_way=5 is larger than the 4 classes in the 'val' split"),
        (dict(dataset=omni, split="train", n_way=5, k_shot=4, q_query=3, n_tasks=2), r"k_shot \+ q_query = 7 is larger than the 6 examples"),
        (dict(dataset=digits, split="train", n_way=11, k_shot=1, q_query=1, n_tasks=2), "n_way=11 is larger than the 10 classes"),
        (dict(dataset=digits, split="test", n_way=5, k_shot=30, q_query=10, n_tasks=2), r"k_shot \+ q_query = 40"),
        (dict(dataset=digits, split="train", n_way=5, k_shot=1, q_query=1, n_tasks=0), "n_tasks=0 is invalid"),
        (dict(dataset=digits, split="dev", n_way=5, k_shot=1, q_query=1, n_tasks=2), "unknown split 'dev'"),
        (dict(dataset=digits, split="train", n_way=5, k_shot=0, q_query=1, n_tasks=2), "k_shot=0 is invalid"),
        (dict(dataset=digits, split="train", n_way=1, k_shot=1, q_query=1, n_tasks=2), "n_way=1 is invalid"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(PoolError, match=msg) as e:
            build_pool(**kwargs)
        assert "\n" not in str(e.value)


# =========================================================================== files
def test_save_load_round_trip(omni, tmp_path):
    p = build_pool(omni, "train", 5, 1, 2, 12, seed=3)
    path = p.save(tmp_path / "pool")
    assert path == tmp_path / "pool.json" and (tmp_path / "pool.safetensors").is_file()
    doc = json.loads(path.read_text())
    assert doc["dataset"] == "omniglot" and doc["fingerprint"] == omni.fingerprint and doc["split"] == "train"
    assert (doc["n_way"], doc["k_shot"], doc["q_query"], doc["n_tasks"], doc["seed"]) == (5, 1, 2, 12, 3)
    assert doc["split_kind"] == "class" and "class-disjoint" in doc["disjointness"] and doc["corruption"] is None
    q = TaskPool.load(tmp_path / "pool", dataset=omni)
    assert _same(p, q) and q.summary() == p.summary()
    a, b = p.tensors(omni), q.tensors(omni)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("support_x", "support_y", "query_x", "query_y"))
    assert _same(load_pool(tmp_path / "pool.json"), p)


def test_load_refuses_mismatch(omni, digits, tmp_path):
    p = build_pool(digits, "train", 5, 1, 2, 8, seed=0)
    p.save(tmp_path / "d")
    with pytest.raises(PoolError, match="built from dataset 'digits', not 'omniglot'"):
        TaskPool.load(tmp_path / "d", dataset=omni)
    with pytest.raises(PoolError, match="fingerprint"):
        TaskPool.load(tmp_path / "d", dataset=load_digits(split_seed=7))
    with pytest.raises(PoolError, match="fingerprint"):
        p.tensors(load_digits(split_seed=7))
    # an edited definition (seed changed by hand)
    doc = json.loads((tmp_path / "d.json").read_text())
    doc["seed"] = 1
    (tmp_path / "d.json").write_text(json.dumps(doc))
    with pytest.raises(PoolError, match="does not match its tensor file") as e:
        TaskPool.load(tmp_path / "d", dataset=digits)
    assert "\n" not in str(e.value)
    # a tensor file from another pool
    p.save(tmp_path / "d")
    build_pool(digits, "train", 5, 1, 2, 8, seed=1).save(tmp_path / "other")
    (tmp_path / "d.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(PoolError, match="does not match its tensor file"):
        TaskPool.load(tmp_path / "d")
    # truncated tensor file, missing files, not a pool file
    p.save(tmp_path / "d")
    (tmp_path / "d.safetensors").write_bytes((tmp_path / "d.safetensors").read_bytes()[:50])
    with pytest.raises(PoolError, match="not a readable safetensors"):
        TaskPool.load(tmp_path / "d")
    with pytest.raises(PoolError, match="does not exist"):
        TaskPool.load(tmp_path / "nothing")
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(PoolError, match="not a metainfluence task-pool file"):
        TaskPool.load(tmp_path / "x")
    sinusoid_pool(3).save(tmp_path / "s")
    with pytest.raises(PoolError, match="'sinusoid-pool' pool"):
        TaskPool.load(tmp_path / "s")


def test_load_checks_pool_content_against_dataset(omni, tmp_path):
    """A consistent file (valid checksum) whose tasks do not fit the dataset is still refused."""
    p = build_pool(omni, "train", 3, 1, 1, 4, seed=0)
    wrong_class = p.classes.clone()
    wrong_class[0, 0] = omni.classes("test")[0]
    bad = dataclasses.replace(p, classes=wrong_class)
    bad.save(tmp_path / "b1")
    with pytest.raises(PoolError, match="not in the 'train' split"):
        TaskPool.load(tmp_path / "b1", dataset=omni)
    TaskPool.load(tmp_path / "b1")  # without a dataset only the file itself is checked
    ids = p.support_ids.clone()
    ids[1, 0] = p.query_ids[1, -1]  # an example of another class of the task
    dataclasses.replace(p, support_ids=ids).save(tmp_path / "b2")
    with pytest.raises(PoolError, match="not of their task's claimed classes"):
        TaskPool.load(tmp_path / "b2", dataset=omni)
    ids = p.support_ids.clone()
    ids[2, 0] = omni.num_examples + 5
    dataclasses.replace(p, support_ids=ids).save(tmp_path / "b3")
    with pytest.raises(PoolError, match="outside 0.."):
        TaskPool.load(tmp_path / "b3", dataset=omni)
    y = p.support_y.clone()
    y[0, 0] = 7
    dataclasses.replace(p, support_y=y).save(tmp_path / "b4")
    with pytest.raises(PoolError, match="outside 0..2|disagree"):
        TaskPool.load(tmp_path / "b4")


def test_example_split_checked_on_load(digits, tmp_path):
    p = build_pool(digits, "val", 3, 1, 1, 4, seed=0)
    ids = p.support_ids.clone()
    c = int(p.classes[0, 0])
    ids[0, 0] = digits.examples_of(c, "train")[0]  # right class, wrong split
    dataclasses.replace(p, support_ids=ids).save(tmp_path / "p")
    with pytest.raises(PoolError, match="outside the 'val' split"):
        TaskPool.load(tmp_path / "p", dataset=digits)


def test_failed_save_leaves_no_partial_file(digits, tmp_path, monkeypatch):
    p = build_pool(digits, "train", 5, 1, 2, 8, seed=0)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage_mod, "write_json", fail)
    with pytest.raises(OSError):
        p.save(tmp_path / "out" / "pool")
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MetaInfluenceError, match="cannot create output folder"):
        p.save(tmp_path / "afile" / "pool")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["afile", "out"]


# =========================================================================== subsets and summary
def test_subset_keeps_ids(omni, tmp_path):
    p = build_pool(omni, "train", 3, 1, 2, 10, seed=0)
    s = p.subset([7, 2, 5])
    assert s.task_ids.tolist() == [7, 2, 5] and len(s) == 3
    assert torch.equal(s.support_ids[0], p.support_ids[7])
    ss = s.subset([5])  # ids, not positions
    assert ss.task_ids.tolist() == [5] and torch.equal(ss.query_ids[0], p.query_ids[5])
    w = p.without([0, 9])
    assert w.task_ids.tolist() == list(range(1, 9))
    tt = s.tensors(omni)
    assert torch.equal(tt.query_x[1], p.tensors(omni).query_x[2])
    s.save(tmp_path / "sub")
    r = TaskPool.load(tmp_path / "sub", dataset=omni)
    assert r.task_ids.tolist() == [7, 2, 5] and json.loads((tmp_path / "sub.json").read_text())["is_subset"]
    with pytest.raises(PoolError, match="task id 10 is not in this pool"):
        p.subset([10])
    with pytest.raises(PoolError, match="task id 3 is not in this pool"):
        s.subset([3])
    with pytest.raises(PoolError, match="repeat"):
        p.subset([1, 1])


def test_summary(omni):
    p = build_pool(omni, "train", 5, 1, 4, 20, seed=0)
    text = p.summary()
    n_cls = len(set(p.classes.flatten().tolist()))
    for piece in ("omniglot", "split=train", "5-way 1-shot 4-query", "20 tasks", f"{n_cls} classes used", "no corruption"):
        assert piece in text
    c = corrupt_labels(p, 0.25, 0.5, seed=0)
    assert "5 corrupted" in c.summary()


# =========================================================================== corruption
@pytest.mark.parametrize("where", ["both", "support", "query"])
def test_corruption_bookkeeping(omni, where):
    p = build_pool(omni, "train", 5, 2, 3, 41, seed=0)
    c = corrupt_labels(p, rho_task=0.3, rho_label=0.4, where=where, seed=11)
    n_bad = round(0.3 * 41)  # 12.3 -> 12
    m = {"both": 25, "support": 10, "query": 15}[where]
    per = math.floor(0.4 * m + 0.5)
    assert int(c.corrupted_tasks.sum()) == n_bad
    changed = torch.cat([c.support_corrupted, c.query_corrupted], 1)
    assert changed.sum(1)[c.corrupted_tasks].eq(per).all() and changed.sum(1)[~c.corrupted_tasks].eq(0).all()
    if where == "support":
        assert not c.query_corrupted.any()
    if where == "query":
        assert not c.support_corrupted.any()
    y = torch.cat([c.support_y, c.query_y], 1)
    true = torch.cat([c.support_true_y, c.query_true_y], 1)
    assert torch.equal(true, torch.cat([p.support_y, p.query_y], 1))  # recorded truth = original labels
    assert (y[changed] != true[changed]).all()  # every corrupted label differs from the truth
    assert ((y >= 0) & (y < 5)).all()  # and is a class of the same task
    assert torch.equal(y[~changed], true[~changed])  # untouched labels unchanged
    assert torch.equal(c.support_ids, p.support_ids) and torch.equal(c.classes, p.classes)  # inputs untouched
    tt = c.tensors(omni)
    assert torch.equal(tt.support_y, c.support_y)
    assert c.corruption == {"rho_task": 0.3, "rho_label": 0.4, "where": where, "seed": 11, "labels_per_task": per}


def test_corruption_uniform_over_other_labels(digits):
    p = build_pool(digits, "train", 4, 5, 5, 200, seed=0)
    c = corrupt_labels(p, 1.0, 1.0, seed=0)
    shift = (torch.cat([c.support_y, c.query_y], 1) - torch.cat([c.support_true_y, c.query_true_y], 1)) % 4
    counts = torch.bincount(shift.flatten(), minlength=4)
    assert counts[0] == 0 and counts.sum() == 200 * 40
    assert (counts[1:].float() / counts.sum() - 1 / 3).abs().max() < 0.02


def test_corruption_determinism_and_round_trip(digits, tmp_path):
    p = build_pool(digits, "train", 5, 1, 3, 30, seed=0)
    a = corrupt_labels(p, 0.5, 0.5, seed=1)
    assert _same(a, corrupt_labels(p, 0.5, 0.5, seed=1))
    assert not torch.equal(a.corrupted_tasks, corrupt_labels(p, 0.5, 0.5, seed=2).corrupted_tasks)
    a.save(tmp_path / "c")
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["corrupted_task_ids"] == a.task_ids[a.corrupted_tasks].tolist() and doc["n_corrupted_tasks"] == 15
    assert doc["corruption"]["rho_label"] == 0.5
    b = TaskPool.load(tmp_path / "c", dataset=digits)
    assert _same(a, b) and b.corruption == a.corruption
    sub = a.subset(a.task_ids[a.corrupted_tasks][:3])
    assert sub.corrupted_tasks.all() and sub.corruption == a.corruption


def test_corruption_errors(digits):
    p = build_pool(digits, "train", 5, 1, 1, 10, seed=0)
    for kwargs, msg in [
        (dict(rho_task=1.5, rho_label=0.5), r"rho_task=1.5 is outside \[0, 1\]"),
        (dict(rho_task=0.5, rho_label=-0.1), r"rho_label=-0.1 is outside"),
        (dict(rho_task=0.5, rho_label=0.5, where="labels"), "where='labels' is invalid"),
        (dict(rho_task=0.01, rho_label=0.5), "rounds to 0 tasks"),
        (dict(rho_task=0.5, rho_label=0.04), "rounds to 0 labels"),
    ]:
        with pytest.raises(PoolError, match=msg) as e:
            corrupt_labels(p, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(PoolError, match="already corrupted"):
        corrupt_labels(corrupt_labels(p, 0.5, 0.5), 0.5, 0.5)
    with pytest.raises(PoolError, match="at least 2 classes"):
        corrupt_labels(dataclasses.replace(p, n_way=1), 0.5, 0.5)
    same = corrupt_labels(p, 0.0, 0.0)
    assert not same.corrupted_tasks.any() and torch.equal(same.support_y, p.support_y)


# =========================================================================== sinusoid
def test_sinusoid_pool(tmp_path):
    s = sinusoid_pool(50, k_shot=10, q_query=7, seed=3)
    tt = s.tensors()
    assert tt.support_x.shape == (50, 10, 1) and tt.support_y.shape == (50, 10, 1) and tt.query_y.shape == (50, 7, 1)
    assert tt.support_x.dtype == torch.float32
    assert (s.amplitudes >= 0.1).all() and (s.amplitudes <= 5).all() and (s.phases >= 0).all() and (s.phases <= math.pi).all()
    assert (s.support_x.abs() <= 5).all() and s.amplitudes.std() > 1
    t = 17
    want = s.amplitudes[t] * torch.sin(s.query_x[t, :, 0] - s.phases[t])
    assert torch.allclose(tt.query_y[t, :, 0], want.float())
    assert torch.equal(sinusoid_pool(50, 10, 7, seed=3).support_x, s.support_x)
    assert not torch.equal(sinusoid_pool(50, 10, 7, seed=4).support_x, s.support_x)
    assert torch.equal(sinusoid_pool(20, 10, 7, seed=3).amplitudes, s.amplitudes[:20])
    s.save(tmp_path / "sin")
    r = load_pool(tmp_path / "sin")
    assert isinstance(r, SinusoidPool) and all(torch.equal(getattr(r, k), getattr(s, k)) for k in ("amplitudes", "phases", "support_x", "query_x", "task_ids"))
    doc = json.loads((tmp_path / "sin.json").read_text())
    doc["k_shot"] = 5
    (tmp_path / "sin.json").write_text(json.dumps(doc))
    with pytest.raises(PoolError, match="does not match"):
        SinusoidPool.load(tmp_path / "sin")
    sub = s.without([0, 1])
    assert sub.task_ids.tolist() == list(range(2, 50)) and torch.equal(sub.tensors().support_y, tt.support_y[2:])
    with pytest.raises(PoolError, match="n_tasks=0"):
        sinusoid_pool(0)


# =========================================================================== real data
@pytest.mark.realdata
def test_real_mnist_pools_example_disjoint(shared_data, tmp_path):
    ds = load_dataset("mnist", root=shared_data)
    pools = {s: build_pool(ds, s, 5, 5, 15, 300, seed=0) for s in SPLITS}
    ex = {s: set(torch.cat([pools[s].support_ids.flatten(), pools[s].query_ids.flatten()]).tolist()) for s in SPLITS}
    assert ex["train"].isdisjoint(ex["val"]) and ex["train"].isdisjoint(ex["test"]) and ex["val"].isdisjoint(ex["test"])
    assert min(ex["test"]) >= 60000 and max(ex["train"] | ex["val"]) < 60000
    c = corrupt_labels(pools["train"], 0.2, 0.8, where="both", seed=0)
    assert int(c.corrupted_tasks.sum()) == 60
    c.save(tmp_path / "m")
    back = TaskPool.load(tmp_path / "m", dataset=ds)
    assert torch.equal(back.tensors(ds).query_x, c.tensors(ds).query_x)


@pytest.mark.realdata
def test_real_omniglot_pools_class_disjoint(shared_data, tmp_path_factory):
    ds = load_omniglot(shared_data / "omniglot", cache_dir=tmp_path_factory.getbasetemp() / "omniglot-cache")  # shared with test_datasets
    pools = {s: build_pool(ds, s, 20, 1, 5, 200, seed=0) for s in SPLITS}
    chars = {s: set((pools[s].classes // 4).flatten().tolist()) for s in SPLITS}
    assert chars["train"].isdisjoint(chars["val"]) and chars["train"].isdisjoint(chars["test"]) and chars["val"].isdisjoint(chars["test"])
    tt = pools["test"].tensors(ds)
    assert tt.support_x.shape == (200, 20, 1, 28, 28)
