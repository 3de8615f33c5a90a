"""Nightly: incremental == full recompute, idempotence, out-of-order dates, refusals, consumed items excluded."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pytest
import torch
from ebbtide.config import load_config
from ebbtide.generate import generate
from ebbtide.nightly import Nightly, NightlyCheckError, VersionMismatchError
from ebbtide.sessionize import Sessionizer
from ebbtide.storage import open_storage
from ebbtide.tables import table_specs
from ebbtide.train import train_models

START = dt.date(2026, 11, 1)
D = [START + dt.timedelta(days=i) for i in range(6)]


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    overrides = {
        "generate.out": str(root / "raw"), "generate.users": 300, "generate.items": 120, "generate.days": 4,
        "generate.start_date": START.isoformat(), "generate.users_per_chunk": 150,
        "sessionize.input": str(root / "raw"), "storage.root": str(root / "base"), "storage.engine": "rs",
        "storage.user_buckets": 2, "train.output": str(root / "models"), "train.models": ["decay_pool"],
        "train.max_len": 30, "train.dim": 16, "train.epochs": 1, "train.batch_size": 64, "train.reader_workers": 1,
        "train.split": "leave_one_out", "nightly.top_k": 10, "nightly.batch_size": 64}
    cfg = load_config("local", overrides)
    generate(cfg.generate, progress=False)
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    for day in D[:3]:
        job.run(day)
    artifact = train_models(cfg, storage)["decay_pool"]
    return root, overrides, artifact


@pytest.fixture
def tables(trained, spark, tmp_path):
    """A private copy of the sessionized tables (day 4 not yet loaded) for each test."""
    root, overrides, artifact = trained
    shutil.copytree(root / "base", tmp_path / "tables")
    # Idle nights after the last loaded day: these tests score dates without sessionized data on purpose.
    cfg = load_config("local", {**overrides, "storage.root": str(tmp_path / "tables"),
                                "nightly.model_version": str(artifact), "nightly.require_fresh": False})
    storage = open_storage(spark, cfg.storage)
    return cfg, storage, Nightly(spark, cfg, storage)


def _interest(storage, cfg) -> dict[str, tuple]:
    rows = storage.read(table_specs(cfg)["user_interest"]).collect()
    return {r.user_id: (r.as_of, np.array(r.embedding), np.array(r.decay_state), np.array(r.decay_mass), r.n_events)
            for r in rows}


def _rows(storage, cfg, name):
    return sorted(tuple(r) for r in storage.read(table_specs(cfg)[name]).collect())


def _output_versions(storage, cfg) -> dict[str, int | None]:
    """Each nightly output table's version, None while it does not exist yet (a refused run must not create it)."""
    specs = table_specs(cfg)
    return {n: storage.version(specs[n]) if storage.exists(specs[n]) else None
            for n in ("user_interest", "user_recommendations", "item_embeddings")}


def test_incremental_equals_full_recompute(tables, spark, tmp_path):
    cfg, storage, nightly = tables
    nightly.run(D[2])
    Sessionizer(spark, cfg, storage).run(D[3])                  # some users get new events on day 4
    report = nightly.run(D[5])                                   # two idle days later
    assert report.rescaled > 0 and report.reencoded > 0
    incremental = _interest(storage, cfg)

    shutil.copytree(tmp_path / "tables", tmp_path / "full")
    full_cfg = cfg.model_copy(deep=True)
    full_cfg.storage.root = str(tmp_path / "full")
    full_storage = open_storage(spark, full_cfg.storage)
    full_storage.delete_where(table_specs(full_cfg)["user_interest"], "true")
    Nightly(spark, full_cfg, full_storage).run(D[5], full=True)
    full = _interest(full_storage, full_cfg)
    assert incremental.keys() == full.keys()
    for user, (as_of, emb, state, mass, n) in incremental.items():
        f_as_of, f_emb, f_state, f_mass, f_n = full[user]
        assert (as_of, n) == (f_as_of, f_n)
        np.testing.assert_allclose(emb, f_emb, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mass, f_mass, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(state, f_state, rtol=1e-5, atol=1e-6)


def test_decay_keeps_acting_on_idle_users(tables):
    cfg, storage, nightly = tables
    nightly.run(D[2])
    first = _interest(storage, cfg)
    nightly.run(D[4])
    later = _interest(storage, cfg)
    user = next(iter(first))
    # decay_mass = [long-term part, decaying parts...]: the decaying parts fade while the user is idle
    assert (later[user][3][1:] < first[user][3][1:]).all(), "every timescale's mass decays while the user is idle"
    assert later[user][3][0] == pytest.approx(first[user][3][0]), "the long-term part does not decay"
    assert not np.allclose(later[user][1], first[user][1])


def test_same_date_twice_is_identical(tables):
    cfg, storage, nightly = tables
    nightly.run(D[2])
    names = ("user_interest", "user_recommendations", "item_embeddings")
    before = {n: _rows(storage, cfg, n) for n in names}
    nightly.run(D[2])
    assert {n: _rows(storage, cfg, n) for n in names} == before


def test_an_earlier_date_never_overwrites_newer_state(tables):
    cfg, storage, nightly = tables
    nightly.run(D[4])
    newer = _rows(storage, cfg, "user_interest")
    report = nightly.run(D[3])
    assert report.kept_newer == report.active_users
    assert _rows(storage, cfg, "user_interest") == newer
    recs = storage.read(table_specs(cfg)["user_recommendations"])
    assert {r.as_of for r in recs.select("as_of").distinct().collect()} == {D[3], D[4]}


def test_consumed_items_are_never_recommended(tables):
    cfg, storage, nightly = tables
    nightly.run(D[2])
    specs = table_specs(cfg)
    vocab = {r.item_idx: r.item_id for r in storage.read(specs["item_vocab"]).collect()}
    consumed = {r.user_id: {vocab[i] for i in r.item_idx} for r in storage.read(specs["user_sequences"]).collect()}
    recs = storage.read(specs["user_recommendations"]).collect()
    assert recs
    assert all(r.item_id not in consumed[r.user_id] for r in recs)
    ranks = {}
    for r in recs:
        ranks.setdefault(r.user_id, []).append((r.rank, r.score))
    for user, ranked in ranks.items():
        scores = [s for _, s in sorted(ranked)]
        assert scores == sorted(scores, reverse=True)
        assert len(scores) == min(cfg.nightly.top_k, len(vocab) - len(consumed[user]))


def test_version_mismatch_is_refused_without_writing(tables, tmp_path):
    cfg, storage, nightly = tables
    src = nightly.resolve_model()
    bad = tmp_path / "models" / "decay_pool" / src.name
    shutil.copytree(src, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["data_snapshot_version"] = 999
    (bad / "meta.json").write_text(json.dumps(meta))
    cfg.nightly.model_version = str(bad)
    versions = _output_versions(storage, cfg)
    with pytest.raises(VersionMismatchError, match="user_sequences v999"):
        nightly.run(D[2])
    assert _output_versions(storage, cfg) == versions


def test_non_finite_embeddings_fail_without_writing(tables, tmp_path):
    from ebbtide.artifacts import load_artifact, write_artifact

    cfg, storage, nightly = tables
    model, conf, meta = load_artifact(nightly.resolve_model())
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    meta = {k: v for k, v in meta.items() if k != "content_hash"}
    cfg.nightly.model_version = str(write_artifact(tmp_path / "nan", model, conf, meta))
    versions = _output_versions(storage, cfg)
    with pytest.raises(NightlyCheckError, match="non-finite"):
        nightly.run(D[2])
    assert _output_versions(storage, cfg) == versions


def test_item_embeddings_round_trip_exactly(tables):
    from ebbtide.artifacts import load_artifact

    cfg, storage, nightly = tables
    nightly.run(D[2])
    model, _, _ = load_artifact(nightly.resolve_model())
    expected = model.item_embeddings().detach().numpy()
    specs = table_specs(cfg)
    vocab = {r.item_idx: r.item_id for r in storage.read(specs["item_vocab"]).collect()}
    rows = storage.read(specs["item_embeddings"]).collect()
    assert sorted(r.item_idx for r in rows) == list(range(len(expected)))
    for r in rows:
        assert r.item_id == vocab[r.item_idx]
        assert np.array_equal(np.array(r.embedding, np.float32), expected[r.item_idx])   # bit for bit


def test_ann_that_sees_every_item_equals_exact(tables, spark, tmp_path):
    """With every list probed and every item re-scored, the ANN path must give exactly the exact path's
    recommendations: same index build, over-fetch, exclusion and ranking code as at scale."""
    pytest.importorskip("faiss", reason="the `ann` extra (faiss-cpu) is not installed")
    cfg, storage, nightly = tables
    shutil.copytree(tmp_path / "tables", tmp_path / "ann")
    nightly.run(D[2])
    exact = _rows(storage, cfg, "user_recommendations")
    ann_cfg = cfg.model_copy(deep=True)
    ann_cfg.storage.root = str(tmp_path / "ann")
    ann_cfg.nightly.topk, ann_cfg.nightly.ann_nprobe, ann_cfg.nightly.ann_rerank = "ann", 64, 20   # 200 >= 120 items
    ann_storage = open_storage(spark, ann_cfg.storage)
    Nightly(spark, ann_cfg, ann_storage).run(D[2])
    assert list((nightly.resolve_model().parent / ".ann").glob("*.faiss")), "the index is kept beside the model"
    ann = _rows(ann_storage, ann_cfg, "user_recommendations")
    drop_score = lambda rows: [r[:3] + r[4:] for r in rows]   # noqa: E731  (user, rank, item, source, ...)
    assert drop_score(ann) == drop_score(exact)
    # float32 dot products of the same pairs, summed in another order (GEMM vs batched re-scoring)
    np.testing.assert_allclose([r[3] for r in ann], [r[3] for r in exact], rtol=1e-5, atol=1e-6)
