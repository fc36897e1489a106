"""WandbSink: records into a Weights & Biases run (extra: ``pip install "sgdlens[wandb]"``).

This module imports wandb only when a sink is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sgdlens.records import Value
from sgdlens.sinks import event_text, flat_header, numeric

__all__ = ["WandbSink"]


class WandbSink:
    """Send records to a Weights & Biases run.

    * the run's header record becomes the run's config under ``sgdlens.`` (``sgdlens.run``,
      ``sgdlens.optimizer``, ``sgdlens.param_groups.0.lr``, …);
    * each metric record's numbers are logged under ``prefix`` together with
      ``<prefix>step``, the optimizer step, declared as their x axis
      (``define_metric(prefix + "*", step_metric=prefix + "step")``), so that your own
      ``wandb.log`` calls keep their own step counter;
    * each event record (phase change, loss spike) becomes a W&B alert (``run.alert``, level
      INFO; an email or Slack message where alerts are set up) and is counted in
      ``<prefix>events``.

    Args:
        project: the W&B project, for a run the sink starts with ``wandb.init``.
        run: an active run to log into instead (the sink then does not finish it).
        prefix: prepended to every key; ``"sgdlens/"`` by default, so W&B groups the keys
            in their own panel section.
        alerts: send event records as alerts (``False``: only count them).
        **init_kwargs: more ``wandb.init`` arguments (``name``, ``dir``, ``mode``, …).

    Raises:
        ImportError: wandb is not installed (``pip install "sgdlens[wandb]"``).

    Example:
        >>> from sgdlens.sinks import WandbSink
        >>> sink = WandbSink(project="my-project")  # doctest: +SKIP
        >>> monitor = PhaseMonitor(opt, model=model, sinks=[sink])  # doctest: +SKIP
        >>> # offline, without an account: WANDB_MODE=offline, then `wandb sync` later
    """

    def __init__(
        self,
        project: str | None = None,
        run: Any = None,
        *,
        prefix: str = "sgdlens/",
        alerts: bool = True,
        **init_kwargs: Any,
    ) -> None:
        if project is not None and not isinstance(project, str):
            raise TypeError(f"WandbSink(project=...) must be a str, got {project!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"WandbSink(prefix=...) must be a str, got {prefix!r}")
        if run is not None and init_kwargs:
            raise ValueError(
                f"WandbSink(run=...) logs into a run you started; drop the wandb.init "
                f"arguments {sorted(init_kwargs)}, or drop run= to let the sink start one"
            )
        try:
            import wandb
        except ImportError as e:
            raise ImportError('WandbSink needs wandb: pip install "sgdlens[wandb]"') from e
        if run is not None and not callable(getattr(run, "log", None)):
            raise TypeError(f"WandbSink(run=...) must be a wandb Run, got {type(run).__name__}")
        self._owns = run is None
        self.run: Any = wandb.init(project=project, **init_kwargs) if run is None else run
        self.prefix = prefix
        self.alerts = alerts
        self.events = 0
        self.run.define_metric(prefix + "*", step_metric=prefix + "step")
        self._closed = False

    def __call__(self, record: Mapping[str, Value]) -> None:
        if self._closed:
            raise ValueError("WandbSink is closed")
        step = record.get("step")
        if "header" in record:
            config = flat_header(record, "sgdlens.")
            self.run.config.update(config, allow_val_change=True)
        elif "event" in record:
            self.events += 1
            self.run.log({self.prefix + "step": step, self.prefix + "events": self.events})
            if self.alerts:
                text = event_text(record)
                self.run.alert(title=f"sgdlens: {text.split(': ', 1)[1]}", text=text, level="INFO")
        else:
            self.run.log({self.prefix + "step": step, **numeric(record, self.prefix)})

    def close(self) -> None:
        """Finish the run if the sink started it. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._owns:
                self.run.finish()

    def __repr__(self) -> str:
        return f"WandbSink({getattr(self.run, 'id', '?')!r})"
