"""Guards: opt-in responses to what the signals see, the same on every rank and visible in the telemetry.

* :mod:`otel_llm.guards.policy`: when the agreed gradient-norm decay rate asks
  for a learning-rate backoff or for clipping (pure host logic on sampled steps);
* :mod:`otel_llm.guards.nonfinite`: whether an update's gradients hold NaN/Inf,
  and how an update is withheld from the optimizer;
* :mod:`otel_llm.guards.runner`: the guards of one session, driven by its step clock.
"""

from otel_llm.guards.action import GuardAction, GuardListener
from otel_llm.guards.runner import Guards, make_guards

__all__ = ["GuardAction", "GuardListener", "Guards", "make_guards"]
