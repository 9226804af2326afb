"""report_to's trackers from a real run on the tiny model, offline: trackio (its local SQLite store) and
Weights & Biases (offline mode) get every logged step's metrics, as metrics.jsonl holds them."""

from __future__ import annotations

import json

import pytest
from tiny_run import train_tiny_run

from grpo.config.loading import load_config
from grpo.errors import ConfigError
from grpo.runs import trackers
from grpo.runs.trackers import run_name, trackers_open


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # grpo's default then: offline
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def logged(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_trackio_and_wandb_get_every_logged_step_beside_tensorboard(tiny_model, tmp_path, monkeypatch):
    from trackio.sqlite_storage import SQLiteStorage
    from wandb.sdk.wandb_run import Run

    sent_to_wandb = []
    log = Run.log

    def log_and_keep(run, data, step=None, **options):
        sent_to_wandb.append((step, dict(data)))
        return log(run, data, step=step, **options)

    monkeypatch.setattr(Run, "log", log_and_keep)
    output, _ = train_tiny_run(tiny_model, tmp_path, "--report-to", "tensorboard,trackio,wandb")
    metrics = logged(output)
    expected = [(m["step"], {k: v for k, v in m.items() if k != "step"}) for m in metrics]

    trackio_rows = SQLiteStorage.get_logs("grpo", run_name(output))
    got = [(row["step"], {k: row[k] for k in expected[0][1]}) for row in trackio_rows]
    assert got == expected
    config = SQLiteStorage.get_run_config("grpo", run_name(output))
    assert config["learning_rate"] == 1e-2 and config["max_steps"] == 3

    assert sent_to_wandb == expected
    (offline_run,) = (output / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb")), "the run's records, for `wandb sync`"
    assert (output / "tensorboard").is_dir()


def test_a_tracker_that_is_unknown_or_not_installed_is_refused_before_the_run(monkeypatch):
    with pytest.raises(ConfigError, match="report_to must be none or some of tensorboard, trackio, wandb"):
        load_config(overrides={"report_to": "tensorboard,mlflow"})
    with pytest.raises(ConfigError, match="report_to must be"):
        load_config(overrides={"report_to": "none,wandb"})
    monkeypatch.setattr("grpo.config.grpo.module_available", lambda name: name != "wandb")
    with pytest.raises(ConfigError, match=r"report_to wandb: the wandb package is not installed"):
        load_config(overrides={"report_to": "trackio,wandb"})
    assert load_config(overrides={"report_to": "trackio"}).report_to == "trackio"


def test_trackers_close_marked_failed_when_the_run_fails_and_a_bad_close_hides_nothing(monkeypatch, tmp_path):
    closed, said = [], []

    class Fine:
        def __init__(self, *args):
            pass

        def log(self, metrics, step):
            pass

        def close(self, failed):
            closed.append(("fine", failed))

    class BadClose(Fine):
        def close(self, failed):
            raise OSError("disk full")

    monkeypatch.setitem(trackers.TRACKERS, "trackio", BadClose)
    monkeypatch.setitem(trackers.TRACKERS, "wandb", Fine)
    opening = trackers_open("trackio,wandb,wandb", tmp_path, 0, {}, said.append)
    with pytest.raises(KeyError, match="the run's own error"), opening as opened:
        assert [type(t) for t in opened] == [BadClose, Fine]  # each once
        raise KeyError("the run's own error")
    assert closed == [("fine", True)]
    assert said == ["warning: BadClose did not close cleanly: disk full"]
    with trackers_open("wandb", tmp_path, 0, {}, said.append):
        pass
    assert closed[-1] == ("fine", False)
