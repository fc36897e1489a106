"""Online drift/diffusion phase detection from log-point records (pure Python, no torch).

Shwartz-Ziv & Tishby (2017) describe two phases of SGD: *drift*, where the mean gradient
dominates its minibatch noise (gradient SNR ≫ 1), and *diffusion*, where noise dominates
(SNR < 1). Saxe et al. (2018) show the transition is generic (ReLU, linear nets) and not tied
to compression, so sgdlens reports the SNR regime only, not an information-theoretic claim.
A large learning rate near convergence knocks a run back out of its basin (Smith & Topin
2017), so the detector also goes back from diffusion to drift, and treats a loss spike as
evidence for that.

:class:`PhaseDetector` reads the flat records the monitor produces at log points and keeps a
small state machine per layer and for the whole model; its time constants are optimizer
steps. The package is split by job: ``_stats`` (pure functions), ``_channel`` (the state
machine), ``_spike`` (the loss-spike detector), ``_state`` (serialisation), ``_config``
(argument checks) and ``detector`` (the class that ties them together). ``docs/phases.md``
gives the science and the measured properties.
"""

from __future__ import annotations

from sgdlens.phase._event import PhaseEvent
from sgdlens.phase._stats import displacement_exponent, robust_z
from sgdlens.phase.detector import PhaseDetector

__all__ = ["PhaseDetector", "PhaseEvent", "displacement_exponent", "robust_z"]
