"""The reward-function contract, the errors, and the mask reasons. Pure python, no torch.

Writing a reward function
=========================

A reward function scores a *batch* of completions::

    def my_reward(completions: list[str], rows: list[dict[str, Any]], **kwargs) -> list[float | None]:
        ...

* ``completions[i]`` is the generated text of sample ``i`` (no prompt, special tokens already stripped).
* ``rows[i]`` holds the fields of the dataset row sample ``i`` was generated from. It always has
  ``"gold"``: the gold answer string the task loader extracted (e.g. the text after ``####`` in GSM8K).
* ``**kwargs`` are the term's ``kwargs`` from the config (``rewards.terms[k].kwargs``), passed as is.
* Return a list (or tuple) with exactly one entry per completion: a ``float`` (``int`` and ``bool``
  are accepted and converted) or ``None``.

"Cannot score" is a first-class answer: ``None``, NaN, +-inf, a non-number, raising an exception or
running past the time limit all MASK that sample — the learner drops it from the step; it is never
turned into a 0 reward, which would silently teach the policy something wrong. Masks are counted per
term and reason in the step metrics, and a term that masks more than ``rewards.max_masked_fraction`` of
a batch stops the run with a :class:`RewardFailure` that shows one failing input.

Returning the wrong number of values, a non-list, or having a signature that cannot take
``(completions, rows, **kwargs)`` is a bug in the configuration, not in one sample, so it raises
:class:`RewardError` on the first call.

How it runs
-----------
Functions run in separate worker processes (``rewards.num_workers``), never in the trainer process:
first on the whole batch with a limit of ``rewards.timeout_s × len(batch)``; if that call raises or
times out, once per sample with ``rewards.timeout_s`` each, so a bad sample masks only itself. A worker
that runs past its limit is killed and replaced, so a hanging reward cannot hang training. The worker
runs your function in its main thread, so libraries that time themselves out with ``signal.alarm``
(such as ``math_verify``) work.

Referencing a function
----------------------
In the config, ``function`` is a built-in name (see ``rewards.builtin.BUILTINS``) or an import path
``"package.module:function"``. The module must be importable from the working directory or installed;
the workers get the trainer's ``sys.path``. If the function has a ``setup`` attribute (a callable
without arguments), each worker calls it once at start, outside the time limit — use it for slow imports.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, get_args

SIGNATURE = "fn(completions: list[str], rows: list[dict[str, Any]], **kwargs) -> list[float | None]"

MaskReason = Literal["exception", "timeout", "memory", "none", "nan", "inf", "non_numeric"]
MASK_REASONS: tuple[MaskReason, ...] = get_args(MaskReason)


class RewardFn(Protocol):
    """What a reward function looks like; see the module docstring."""

    def __call__(
        self, completions: list[str], rows: list[dict[str, Any]], **kwargs: Any
    ) -> list[float | None]: ...


class RewardError(RuntimeError):
    """A reward function is misconfigured or broken in a way that must stop the run."""


class RewardConfigError(RewardError, ValueError):
    """A reward term cannot be set up: unknown built-in, malformed or unimportable ``module:function``."""


class RewardFailure(RewardError):
    """One term masked more than ``rewards.max_masked_fraction`` of a batch; the message shows an example."""
