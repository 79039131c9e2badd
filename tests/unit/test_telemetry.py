"""Structured logs carry the job's ids from context; metrics render in the Prometheus format."""

from __future__ import annotations

import json
import logging

from adapters.telemetry import ANALYSES, JsonFormatter, StoreCollector, log_context, metrics_text


def test_json_log_lines_carry_task_and_study_ids() -> None:
    record = logging.LogRecord("interval.test", logging.INFO, __file__, 1, "step %s done", ("segment",), None)
    with log_context(task_id="t-1", study_uid="1.2.3"):
        line = JsonFormatter().format(record)
    out = json.loads(line)
    assert out["msg"] == "step segment done" and out["task_id"] == "t-1" and out["study_uid"] == "1.2.3"
    assert "task_id" not in json.loads(JsonFormatter().format(record))  # context is gone after the block


def test_metrics_text_includes_the_store_gauges_and_survives_a_dead_broker() -> None:
    ANALYSES.labels("completed", "").inc()

    def dead() -> dict[str, int]:
        raise ConnectionError("broker down")

    text = metrics_text(StoreCollector(lambda: {"failed": 2, "completed": 5}, dead)).decode()
    assert 'interval_tasks{status="failed"} 2.0' in text
    assert 'interval_analyses_total{outcome="completed",reason=""}' in text
    assert "interval_queue_depth" in text  # the family is there, without samples
