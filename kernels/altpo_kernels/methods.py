"""The unlearning methods: one record each, in one registry that every layer reads.

A method of the log-prob family is a function of per-sequence answer log-probs (summed over the
answer tokens), so each token carries one coefficient ``c_t = dL/d logp_t`` and one fused kernel
serves every method (docs/design.md section 2). A :class:`Method` says everything the kernel, the
trainer, the flags, the demo and the docs need to know:

- ``defaults``: every setting it takes (beta, alpha, gamma, delta, or a user's own names) with
  its default value; a setting it does not take is refused;
- ``uses_reference``: whether its forget term reads the frozen starting model's log-probs;
- ``chosen``: where its chosen sequences come from: ``"alternates"`` (a file of alternate
  answers), ``"idk"`` ("I don't know" answers) or ``None`` (no chosen side);
- ``normaliser``: ``"terms"`` (the forget loss is the mean of the per-term losses over the
  step's forget terms) or ``"forget_tokens"`` (their sum over the step's forget answer tokens);
- ``forget_term(x, hp)``: the per-term losses and scores from :class:`SequenceLogprobs` ``x``;
- ``reference(x, hp)``: optional, the same in float64 written independently (the tests' spec,
  and the self-check of a user's method, :func:`altpo_kernels.check_method`).

``L = gamma * L_forget + alpha * L_retain`` for every method, with ``L_retain`` the token-mean
NLL of the retain answers. Adding a built-in method is one :func:`register_method` call below; a
user's own method is a :class:`Method` in the user's file, named as ``path/to/file.py:NAME`` or
``package.module:NAME`` wherever a method name is taken.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    import torch


class _TorchFunctional:
    """torch.nn.functional, imported on first use: the registry's names, defaults and titles load
    without torch (``altpo-fast --help`` stays fast)."""

    def __getattr__(self, name):
        import torch.nn.functional

        return getattr(torch.nn.functional, name)


F = _TorchFunctional()

#: the settings the loss itself reads around every forget term
WEIGHTS = ("alpha", "gamma")
#: the largest |beta|-like scale the checks accept: the per-term epilogue runs in float64, and
#: beta * margin stays finite for any margin a sequence of log-probs can have
MAX_SCALE = 1e6
CHOSEN_SOURCES = ("alternates", "idk", None)
# AltPO's registry name: the default method everywhere, and the one ``altpo_loss`` wraps. Other
# layers name it through these two, so a method's name is written in its registry entry.
ALTPO = "altpo"
DEFAULT_METHOD = ALTPO
NORMALISERS = ("terms", "forget_tokens")


@dataclass
class SequenceLogprobs:
    """What a forget term sees, one entry per forget term (fp32 in the fused path, float64 in the
    reference). ``chosen``/``ref_chosen`` are None for a method without a chosen side and
    ``ref_forget``/``ref_chosen`` None for one that uses no reference. ``lengths`` are the forget
    answers' token counts (float, at least 1 where the answer was cut away entirely)."""

    forget: torch.Tensor
    lengths: torch.Tensor
    chosen: torch.Tensor | None = None
    ref_forget: torch.Tensor | None = None
    ref_chosen: torch.Tensor | None = None


ForgetTerm = Callable[[SequenceLogprobs, Mapping[str, float]], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Method:
    """One unlearning method. ``title`` is how tables and figures name it; ``doc`` says what it
    does in a line. ``forget_term`` returns ``(terms, score)``: per forget term, its loss
    contribution before the normaliser, and the number the method pushes on (logged)."""

    name: str
    title: str
    defaults: Mapping[str, float]
    forget_term: ForgetTerm
    uses_reference: bool = False
    chosen: str | None = None
    normaliser: str = "terms"
    reference: ForgetTerm | None = None
    doc: str = ""
    scales: tuple[str, ...] = field(default=("beta",))

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str) or ":" in self.name:
            raise ValueError(f"a method's name must be a non-empty string without ':', got {self.name!r}")
        for weight in WEIGHTS:
            if weight not in self.defaults:
                raise ValueError(f"method {self.name!r}: defaults must include {weight!r} "
                                 f"(L = gamma * L_forget + alpha * L_retain)")
        if self.chosen not in CHOSEN_SOURCES:
            raise ValueError(f"method {self.name!r}: chosen must be one of {CHOSEN_SOURCES}, got {self.chosen!r}")
        if self.normaliser not in NORMALISERS:
            raise ValueError(f"method {self.name!r}: normaliser must be one of {NORMALISERS}, "
                             f"got {self.normaliser!r}")
        if not callable(self.forget_term):
            raise ValueError(f"method {self.name!r}: forget_term must be a function (x, hp) -> (terms, score)")

    @property
    def settings(self) -> tuple[str, ...]:
        """The names of the settings it takes, in a stable order."""
        return tuple(self.defaults)

    @property
    def pairs(self) -> bool:
        """Does each forget term compare a chosen answer with the forget answer?"""
        return self.chosen is not None

    def hparams(self, **given) -> dict[str, float]:
        """Its settings: defaults filled in; an unknown setting or a bad value refused (ValueError)."""
        values = {k: float(v) for k, v in self.defaults.items()}
        for name, value in given.items():
            if value is None:
                continue
            if name not in values:
                users = [m.name for m in REGISTRY.values() if name in m.defaults]
                used_by = f" (it is used by {', '.join(users)})" if users else ""
                raise ValueError(f"method {self.name!r} has no setting {name}{used_by}; leave {name} unset")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            values[name] = float(value)
        for name in self.scales:
            if name in values and not 0 < values[name] <= MAX_SCALE:
                raise ValueError(f"{name} must lie in (0, {MAX_SCALE:g}] for method {self.name!r}, "
                                 f"got {values[name]:g}")
        for name in WEIGHTS:
            if not 0 <= values[name] <= MAX_SCALE:
                raise ValueError(f"{name} must lie in [0, {MAX_SCALE:g}], got {values[name]:g}")
        return values


REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (a user's method need not be registered: pass it directly)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a Method, got {type(method).__name__}")
    if method.name in REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is registered already")
    REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def _load_user_method(spec: str) -> Method:
    """``path/to/file.py:NAME`` or ``package.module:NAME``: the Method object named NAME there."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"method {spec!r}: write a registered name ({', '.join(REGISTRY)}), "
                         "path/to/file.py:NAME or package.module:NAME")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise ValueError(f"method {spec!r}: file {path} not found")
        name = f"altpo_user_method_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception:
                del sys.modules[name]
                raise
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            raise ValueError(f"method {spec!r}: module {where!r} not found ({err})") from None
    found = getattr(module, attr, None)
    if not isinstance(found, Method):
        what = "nothing" if found is None else f"a {type(found).__name__}"
        raise ValueError(f"method {spec!r}: {attr} in {where} is {what}, not an altpo_kernels.Method")
    return found


def get_method(method: "str | Method") -> Method:
    """The record for a registered name, a ``file.py:NAME`` / ``module:NAME`` spec, or a Method."""
    if isinstance(method, Method):
        return method
    if not isinstance(method, str):
        raise ValueError(f"method must be a name or an altpo_kernels.Method, got {type(method).__name__}")
    if method in REGISTRY:
        return REGISTRY[method]
    if ":" in method:
        return _load_user_method(method)
    close = difflib.get_close_matches(method.lower(), list(REGISTRY), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"method must be one of {', '.join(REGISTRY)}, or path/to/file.py:NAME for "
                     f"your own; got {method!r}{hint}")


# ------------------------------------------------------------------------------------------------
# The built-in methods. Their formulas are in docs/design.md section 2.3 and docs/methods.md. Each
# fused forget term uses torch's logsigmoid; each float64 reference writes log sigmoid(z) as
# -softplus(-z), so the two are computed differently.


def _log_sigmoid_ref(z: torch.Tensor) -> torch.Tensor:
    return -F.softplus(-z.double())


def _preference_term(x: SequenceLogprobs, hp):
    margin = (x.chosen - x.ref_chosen) - (x.forget - x.ref_forget)
    return -(2.0 / hp["beta"]) * F.logsigmoid(hp["beta"] * margin), margin


def _preference_reference(x: SequenceLogprobs, hp):
    chosen_ratio = x.chosen.double() - x.ref_chosen.double()
    forget_ratio = x.forget.double() - x.ref_forget.double()
    margin = chosen_ratio - forget_ratio
    return -2.0 * _log_sigmoid_ref(hp["beta"] * margin) / hp["beta"], margin


def _npo_term(x: SequenceLogprobs, hp):
    ratio = x.forget - x.ref_forget
    return -(2.0 / hp["beta"]) * F.logsigmoid(-hp["beta"] * ratio), ratio


def _npo_reference(x: SequenceLogprobs, hp):
    ratio = x.forget.double() - x.ref_forget.double()
    return -2.0 * _log_sigmoid_ref(-hp["beta"] * ratio) / hp["beta"], ratio


def _simnpo_term(x: SequenceLogprobs, hp):
    per_token = x.forget / x.lengths
    arg = -hp["beta"] * per_token - hp["beta"] * hp["delta"]
    return -(2.0 / hp["beta"]) * F.logsigmoid(arg), per_token


def _simnpo_reference(x: SequenceLogprobs, hp):
    per_token = x.forget.double() / x.lengths.double()
    return -2.0 * _log_sigmoid_ref(-hp["beta"] * (per_token + hp["delta"])) / hp["beta"], per_token


def _forget_logprob_term(x: SequenceLogprobs, hp):
    # minus the forget answers' NLL; the "forget_tokens" normaliser makes it a token mean
    return x.forget, x.forget / x.lengths


def _forget_logprob_reference(x: SequenceLogprobs, hp):
    return x.forget.double().clone(), x.forget.double() / x.lengths.double()


_PREFERENCE = "-(2/beta) mean log sigmoid(beta D), D = [lp(chosen) - lp_ref(chosen)] - [lp(forget) - lp_ref(forget)]"

register_method(Method(
    ALTPO, "AltPO",
    dict(beta=0.5, alpha=2.0, gamma=1.0), _preference_term, uses_reference=True,
    chosen="alternates", reference=_preference_reference,
    doc="the model's own fact-changed alternates preferred over the forget answers: " + _PREFERENCE))
register_method(Method(
    "dpo", "DPO", dict(beta=0.1, alpha=1.0, gamma=1.0),
    _preference_term, uses_reference=True, chosen="alternates", reference=_preference_reference,
    doc="chosen answers from an alternates file: " + _PREFERENCE))
register_method(Method(
    "idkdpo", "IdkDPO",
    dict(beta=0.1, alpha=1.0, gamma=1.0), _preference_term, uses_reference=True, chosen="idk",
    reference=_preference_reference,
    doc="DPO whose chosen answers are \"I don't know\" variants: " + _PREFERENCE))
register_method(Method(
    "npo", "NPO",
    dict(beta=0.1, alpha=1.0, gamma=1.0), _npo_term, uses_reference=True,
    reference=_npo_reference, doc="forget answers pushed below the reference, fading once they are: "
        "-(2/beta) mean log sigmoid(-beta (lp(forget) - lp_ref(forget)))"))
register_method(Method(
    "simnpo", "SimNPO",
    dict(beta=4.5, delta=0.0, alpha=1.0, gamma=0.125), _simnpo_term, reference=_simnpo_reference,
    doc="NPO without a reference, on length-normalised log-probs: "
        "-(2/beta) mean log sigmoid(-beta lp(forget)/n - beta delta)"))
register_method(Method(
    "graddiff", "GradDiff",
    dict(alpha=1.0, gamma=1.0), _forget_logprob_term, normaliser="forget_tokens",
    reference=_forget_logprob_reference, doc="ascent on the forget answers, descent on the retain answers: sum lp(forget) / forget tokens"))
register_method(Method(
    "gradascent", "GradAscent",
    dict(alpha=0.0, gamma=1.0), _forget_logprob_term, normaliser="forget_tokens",
    reference=_forget_logprob_reference, doc="ascent on the forget answers only (alpha 0): sum lp(forget) / forget tokens"))
