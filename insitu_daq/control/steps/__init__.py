"""Protocol steps, one module per kind, executed through a registry (base.py).

Adding a kind: a module here with its pydantic model and its executor that registers a
`StepSpec`; it is found and imported below. The protocol's union, the runner and the
recording plan follow from the registry.
"""

import importlib
import pkgutil

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

# The shipped kinds in the order an operator reads them: the protocol's union and its "expected
# one of ..." follow it. Every other module of this package is a kind too, registered after
# them in name order, so a new kind is its module alone. Importing a module registers it.
OPERATOR_ORDER = ("approach", "retract", "bias", "hold", "acquire", "microscope", "wait", "mark")
_NOT_KINDS = frozenset({"base", "interleave"})  # the registry, and a setting of timed steps


def _kind_modules() -> list[str]:
    found = {module.name for module in pkgutil.iter_modules(__path__)} - _NOT_KINDS
    return [*OPERATOR_ORDER, *sorted(found - set(OPERATOR_ORDER))]


for _name in _kind_modules():
    importlib.import_module(f"{__name__}.{_name}")
# A kind's module may import another's (hold.py reads temperature.py's room temperature), which
# registers that kind early: the registry is put back in the order above.
_ORDER = {name: index for index, name in enumerate(_kind_modules())}
for _kind in sorted(STEPS, key=lambda kind: _ORDER.get(kind, len(_ORDER))):
    STEPS[_kind] = STEPS.pop(_kind)

__all__ = [
    "OPERATOR_ORDER",
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
