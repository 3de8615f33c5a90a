"""`make demo` end to end at a tiny size: the first command a new user runs must not break unnoticed (every
stage, the table listing before the nightly has created its outputs, the evaluation and the nights)."""

from __future__ import annotations


def test_the_demo_runs_every_stage_end_to_end(spark, tmp_path, capsys):
    from ebbtide.demo import main

    sets = ["generate.users=150", "generate.items=60", "generate.days=4", "generate.users_per_chunk=150",
            "train.models=[decay_pool]", "train.epochs=2", "train.patience=1", "train.dim=16", "train.max_len=20",
            "train.reader_workers=1", "nightly.batch_size=64", "spark.master=local[2]"]
    assert main(["--out", str(tmp_path / "demo"), *(a for s in sets for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    assert "== tables" in out and "user_sequences" in out
    assert "best model on validation: decay_pool" in out
    assert out.count("as of 2026-11-0") == 4, "one line per night: the full night and three idle ones"
