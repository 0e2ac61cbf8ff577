"""One registry of operator rules, asked by prune analysis, erase analysis and the drawings.

Where to add an operator: one small :class:`Rule` subclass in the module of its family
(:mod:`.pointwise`, :mod:`.arithmetic`, :mod:`.stems`, :mod:`.norms`, :mod:`.shapes`, :mod:`.splits`,
:mod:`.attention`), registered with :func:`~.registry.add`; users call
``lightning_oto.register_rule(op, rule)`` for their own operators.
"""
from .registry import (CONSERVATIVE, KINDS, MODULE_RULES, REGISTRY, Call, Conservative, Context, ModuleRule, Rule,
                       bind, canonical_op, kind_of, module_rule_for, names_where, register_rule, registered_ops,
                       rule_for, unregister_rule)
from . import arithmetic, attention, norms, pointwise, shapes, splits, stems  # noqa: F401,E402 - fill the registry
from .pointwise import NotZeroInvariantUnary, ZeroInvariantUnary  # noqa: E402

__all__ = ["Rule", "ModuleRule", "Call", "Context", "Conservative", "ZeroInvariantUnary", "NotZeroInvariantUnary",
           "register_rule", "unregister_rule", "rule_for", "module_rule_for", "kind_of", "canonical_op", "bind",
           "names_where", "registered_ops", "REGISTRY", "MODULE_RULES", "CONSERVATIVE", "KINDS"]
