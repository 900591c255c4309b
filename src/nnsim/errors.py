"""Exceptions and warnings that say what is wrong and how to fix it."""


class InputError(ValueError):
    """Invalid data or arguments: shapes, dtypes, NaN/Inf, empty inputs, bad options."""


class ModelError(TypeError):
    """The model, its outputs or its parameters cannot be analysed as configured."""


class ResultTooLargeError(MemoryError):
    """A requested dense result would exceed the configured memory budget."""


class RankDeficiencyWarning(UserWarning):
    """Some K(x, x) are singular: normalised on their range, or undefined (NaN) for zero gradients."""


class FallbackWarning(UserWarning):
    """A layer rule raised or disagreed with autograd on a module: that module alone is computed by the exact
    per-module fallback (results stay exact; only the speed differs). The message names the module and why."""
