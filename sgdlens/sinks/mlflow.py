"""MLflowSink: records into an MLflow run (extra: ``pip install "sgdlens[mlflow]"``).

This module imports mlflow only when a sink is built.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sgdlens.records import Value
from sgdlens.sinks import event_text, flat_header, numeric

__all__ = ["MLflowSink"]

_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class MLflowSink:
    """Send records to an MLflow run through ``MlflowClient`` (no global active run touched).

    * the run's header record becomes run parameters under ``sgdlens.`` (``sgdlens.run``,
      ``sgdlens.optimizer``, ``sgdlens.param_groups.0.lr``, …);
    * each metric record's numbers are logged as metrics at ``step`` = the optimizer step,
      with ``/`` in keys written as ``.`` (``grad_snr/fc1`` becomes ``grad_snr.fc1``: MLflow's
      file store keeps a file per key, and a file ``grad_snr`` cannot sit beside a folder
      ``grad_snr/``), under ``prefix``; ``nan`` and ``inf`` as MLflow stores them;
    * each event record (phase change, loss spike) updates the tags ``sgdlens.phase`` (the
      whole model's phase) or ``sgdlens.phase.<layer>``, ``sgdlens.last_event`` and
      ``sgdlens.events`` (a count), and is appended as one line to the text artifact
      ``sgdlens/events.txt``.

    Args:
        tracking_uri: where the runs live, e.g. ``"file:///tmp/mlruns"``,
            ``"sqlite:///mlflow.db"`` or a server URL; default: MLflow's own default
            (``MLFLOW_TRACKING_URI``).
        experiment: the experiment name for a new run (created if missing; default:
            ``"sgdlens"``).
        run_id: log into this existing run instead of creating one (the sink then does not
            end it).
        prefix: prepended to every metric key.

    Raises:
        ImportError: mlflow is not installed (``pip install "sgdlens[mlflow]"``).

    Example:
        >>> from sgdlens.sinks import MLflowSink
        >>> sink = MLflowSink("file:///tmp/mlruns", experiment="digits")  # doctest: +SKIP
        >>> monitor = PhaseMonitor(opt, model=model, sinks=[sink])  # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_id: str | None = None,
        *,
        prefix: str = "",
    ) -> None:
        for name, value in (
            ("tracking_uri", tracking_uri),
            ("experiment", experiment),
            ("run_id", run_id),
        ):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"MLflowSink({name}=...) must be a str, got {value!r}")
        if run_id is not None and experiment is not None:
            raise ValueError(
                "MLflowSink(run_id=...) logs into an existing run, which has its experiment; "
                "drop experiment=, or drop run_id= to start a new run in that experiment"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"MLflowSink(prefix=...) must be a str, got {prefix!r}")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError('MLflowSink needs mlflow: pip install "sgdlens[mlflow]"') from e
        self.client: Any = MlflowClient(tracking_uri=tracking_uri)
        self._owns = run_id is None
        if run_id is None:
            name = experiment or "sgdlens"
            found = self.client.get_experiment_by_name(name)
            exp_id = found.experiment_id if found else self.client.create_experiment(name)
            run_id = self.client.create_run(exp_id).info.run_id
        else:
            self.client.get_run(run_id)  # raises at once for an unknown run id
        self.run_id: str = run_id
        self.prefix = prefix
        self.events: list[str] = []
        self._closed = False

    def __call__(self, record: Mapping[str, Value]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if self._closed:
            raise ValueError("MLflowSink is closed")
        if "header" in record:
            params = [Param(k, str(v)[:500]) for k, v in flat_header(record, "sgdlens.").items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            return
        raw = record.get("step")
        step = int(raw) if isinstance(raw, (int, float)) else 0
        if "event" in record:
            text = event_text(record)
            self.events.append(text)
            layer = record.get("layer") or ""
            key = f"sgdlens.phase.{layer}" if layer else "sgdlens.phase"
            tags = [
                RunTag("sgdlens.last_event", text),
                RunTag("sgdlens.events", str(len(self.events))),
            ]
            if record.get("event") != "spike":
                tags.append(RunTag(key, str(record.get("event"))))
            self.client.log_batch(self.run_id, tags=tags)
            self.client.log_text(self.run_id, "\n".join(self.events) + "\n", "sgdlens/events.txt")
            return
        wall = record.get("time")
        ms = int(1000 * (wall if isinstance(wall, (int, float)) else time.time()))
        values = numeric(record, self.prefix).items()
        metrics = [Metric(k.replace("/", "."), v, ms, step) for k, v in values]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH])

    def close(self) -> None:
        """End the run if the sink created it. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._owns:
                self.client.set_terminated(self.run_id)

    def __repr__(self) -> str:
        return f"MLflowSink(run_id={self.run_id!r})"
