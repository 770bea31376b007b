"""Protocol steps, one module per kind, executed through a registry (base.py).

Adding a kind: a module here with its pydantic model and its executor that registers a
`StepSpec`, and its name in the import below. The protocol's union, the runner and the
recording plan follow from the registry.
"""

from insitu_daq.control.steps.base import (
    STEPS,
    PlanState,
    Step,
    StepContext,
    StepRefused,
    StepSpec,
    any_step,
    on_change,
    register,
    step_kind,
    unregister,
)

# Every kind, in the order an operator reads them: the protocol's union and its "expected one
# of ..." follow it. Importing a kind's module registers it.
# isort: off
from insitu_daq.control.steps import (  # noqa: F401
    approach,
    retract,
    bias,
    hold,
    acquire,
    microscope,
    wait,
    mark,
)
# isort: on

__all__ = [
    "STEPS",
    "PlanState",
    "Step",
    "StepContext",
    "StepRefused",
    "StepSpec",
    "any_step",
    "on_change",
    "register",
    "step_kind",
    "unregister",
]
