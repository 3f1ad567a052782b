"""``studies.sweep_profile``: a sweep's stage seconds summed per task and estimator."""

from __future__ import annotations

import json

import pytest

from studies.sweep_profile import job_rows, main, span_seconds


def _job(folder, name, task, estimator, end, **seconds):
    (folder / name).mkdir(parents=True)
    record = {"task": task, "estimator": estimator, "seed": 0, "date": end,
              **{f"{k}_seconds": v for k, v in seconds.items()}}
    (folder / name / "metrics.json").write_text(json.dumps(record))


def test_stage_sums_and_the_wall_span_of_parallel_jobs(tmp_path, capsys):
    # two jobs side by side (00:00:00-00:01:40 and 00:00:20-00:01:00), one from before the clock
    _job(tmp_path, "0", "a", "ekfac", "2026-01-01T00:01:40+00:00", model=10, ground_truth=60,
         fit=20, score=5, evaluate=1, job=100)
    _job(tmp_path, "1", "a", "lissa", "2026-01-01T00:01:00+00:00", model=1, fit=30, score=8,
         job=40)
    _job(tmp_path, "2", "b", "ekfac", None, fit=2, score=1)
    rows = job_rows([tmp_path])
    assert rows["job"].tolist() == [100, 40, 3]
    assert rows["other"].tolist() == pytest.approx([4, 1, 0])
    assert span_seconds(rows) == 100
    main([str(tmp_path)])
    text = capsys.readouterr().out
    assert "jobs' sum: 143 s" in text and "wall span: 100 s" in text
    assert "| a | 2 | 11 | 60 | 50 | 13 | 1 | 5 | 140 | 97.9 % |" in text


def test_a_folder_without_records_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.json under"):
        job_rows([tmp_path])
