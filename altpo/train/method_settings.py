"""The unlearning method's settings: names, defaults filled into the config, and presets.

``--method`` picks the method's record (:mod:`altpo_kernels.methods`: a registered name, or the
user's own ``path/to/file.py:NAME``); ``--beta``, ``--alpha``, ``--gamma``, ``--delta`` and
``--method-settings NAME=X,...`` left unset take its defaults (open-unlearning's values for the
built-in methods), and a setting the method does not take is refused.

The presets reproduce open-unlearning's published TOFU recipes for Llama-3.2-1B-Instruct, forget10
(locuslab/open-unlearning at commit d3d7cf9e, December 2025):

- method hyper-parameters: ``configs/trainer/NPO.yaml`` (beta 0.1, alpha 1, gamma 1),
  ``configs/trainer/SimNPO.yaml`` (beta 4.5, delta 0, alpha 1, gamma 0.125),
  ``configs/trainer/DPO.yaml`` (beta 0.1, alpha 1, gamma 1; IdkDPO is DPO with the
  ``TOFU_QA_forget_idk`` data of ``configs/experiment/unlearn/tofu/idk.yaml``),
  ``configs/trainer/GradDiff.yaml`` (alpha 1, gamma 1); all with the NLL retain loss;
- training: ``configs/experiment/unlearn/tofu/default.yaml`` and ``idk.yaml`` (lr 1e-5, weight
  decay 0.01, 10 epochs, 1 warm-up epoch, model ``open-unlearning/tofu_Llama-3.2-1B-Instruct_full``,
  forget10 / retain90), ``scripts/tofu_unlearn.sh`` (batch 4 per device x 2 GPUs x 4 accumulation
  steps = 32 forget rows per step), ``configs/trainer/finetune.yaml`` (bf16, seed 0) and the
  transformers Trainer defaults it keeps (AdamW betas 0.9 / 0.999, eps 1e-8, gradient clipping 1).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from altpo.errors import UserError

if TYPE_CHECKING:
    from altpo_kernels.methods import Method

#: the settings TrainConfig has a flag of its own for; a method's others go in --method-settings
NAMED_SETTINGS = ("beta", "alpha", "gamma", "delta")


def default_method() -> str:
    """The registry's default method (AltPO), read as :func:`builtin_methods` reads the records."""
    loaded = sys.modules.get("altpo_kernels.methods")
    return loaded.DEFAULT_METHOD if loaded is not None else _registry_file().DEFAULT_METHOD


@functools.lru_cache(maxsize=1)
def builtin_methods() -> Mapping[str, Any]:
    """The built-in method records, for help texts, without importing torch.

    Importing ``altpo_kernels.methods`` runs the package's ``__init__``, which loads the kernels and
    torch (seconds). When that has not happened yet, the registry's own file is loaded on its own:
    its records' names, titles and defaults need no torch (its forget terms import it when called).
    """
    loaded = sys.modules.get("altpo_kernels.methods")
    if loaded is not None:
        return dict(loaded.REGISTRY)
    return dict(_registry_file().REGISTRY)


@functools.lru_cache(maxsize=1)
def _registry_file():
    """``altpo_kernels/methods.py`` run on its own (no package ``__init__``, so no torch)."""
    package = importlib.util.find_spec("altpo_kernels")
    if package is None or not package.submodule_search_locations:
        import altpo_kernels.methods

        return altpo_kernels.methods
    name = "altpo.train._builtin_methods"
    spec = importlib.util.spec_from_file_location(
        name, Path(list(package.submodule_search_locations)[0]) / "methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def method_help() -> str:
    """--method's help text, from the registry."""
    return (f"Unlearning method: {', '.join(builtin_methods())} (docs/methods.md), or your own: "
            "path/to/file.py:NAME or package.module:NAME naming an altpo_kernels.Method (its own "
            "settings with --method-settings). All share the retain term with --alpha.")


def setting_help(name: str) -> str:
    """'Default: the method's (altpo 0.5, dpo 0.1, ...)' for one setting, from the registry."""
    by_value: dict[float, list[str]] = {}
    for m in builtin_methods().values():
        if name in m.defaults:
            by_value.setdefault(m.defaults[name], []).append(m.name)
    parts = [f"{'/'.join(names)} {value:g}" for value, names in by_value.items()]
    return f"Default: the method's ({', '.join(parts)})."


def _method(config: Any) -> Method:
    from altpo_kernels.methods import get_method

    try:
        return get_method(config.method)
    except ValueError as err:
        raise UserError(f"--method: {err}") from None


def _extra_settings(config: Any) -> dict[str, float]:
    """--method-settings NAME=X,NAME=X as a dict (the user's method's own settings)."""
    text = getattr(config, "method_settings", None)
    out: dict[str, float] = {}
    for item in str(text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise UserError(f"--method-settings {text!r}: write NAME=NUMBER[,NAME=NUMBER], e.g. tau=0.5")
        if name in NAMED_SETTINGS:
            raise UserError(f"--method-settings {text!r}: {name} has its own flag: use --{name}")
    return out


_OPEN_UNLEARNING_RUN: dict[str, Any] = dict(
    model="open-unlearning/tofu_Llama-3.2-1B-Instruct_full", data="locuslab/TOFU",
    forget_split="forget10", retain_split="retain90", max_length=512, batch_size=32, lr=1e-5,
    epochs=10.0, warmup_epochs=1.0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
    adam_eps=1e-8, max_grad_norm=1.0, seed=0, dtype="bf16", master_weights="fp32",
)

OPEN_UNLEARNING_PRESETS: dict[str, dict[str, Any]] = {
    "tofu-llama-3.2-1b-forget10-npo": dict(_OPEN_UNLEARNING_RUN, method="npo", beta=0.1,
                                           alpha=1.0, gamma=1.0),
    "tofu-llama-3.2-1b-forget10-simnpo": dict(_OPEN_UNLEARNING_RUN, method="simnpo", beta=4.5,
                                              delta=0.0, alpha=1.0, gamma=0.125),
    "tofu-llama-3.2-1b-forget10-idkdpo": dict(_OPEN_UNLEARNING_RUN, method="idkdpo", beta=0.1,
                                              alpha=1.0, gamma=1.0),
    "tofu-llama-3.2-1b-forget10-graddiff": dict(_OPEN_UNLEARNING_RUN, method="graddiff",
                                                alpha=1.0, gamma=1.0),
}


def fill_method_defaults(config: Any) -> None:
    """Unset beta/alpha/gamma/delta take the method's defaults (at construction: code that reads
    a config before validation sees numbers). An unknown method is left for validation to report."""
    try:
        from altpo_kernels.methods import get_method

        defaults = get_method(config.method).defaults
    except Exception:  # noqa: BLE001  (reported by validate(), with the fix)
        return
    for name in NAMED_SETTINGS:
        if getattr(config, name) is None and name in defaults:
            setattr(config, name, float(defaults[name]))


def resolve_method_settings(config: Any) -> None:
    """Fill the method's defaults into ``config`` and refuse settings the method does not use."""
    from altpo_kernels.methods import REGISTRY

    spec = _method(config)
    given = {name: getattr(config, name) for name in NAMED_SETTINGS}
    try:
        hp = spec.hparams(**given, **_extra_settings(config))
    except ValueError as err:
        text = re.sub(r"leave (\w+) unset", lambda m: f"drop --{m[1].replace('_', '-')}", str(err))
        raise UserError(f"--method {config.method}: {text}") from None
    for name in NAMED_SETTINGS:
        setattr(config, name, hp.get(name))
    if spec.chosen == "alternates" and not config.alternates:
        raise UserError(f"--alternates is required with --method {config.method}: JSON Lines with "
                        "question, answer and alternate (make them with `altpo-fast "
                        "generate-alternates`)")
    if spec.chosen != "alternates" and config.alternates:
        users = ", ".join(m.name for m in REGISTRY.values() if m.chosen == "alternates")
        raise UserError(f"--method {config.method} does not use --alternates; drop it ({users} do)")
    if spec.chosen != "idk" and config.idk_answers:
        users = ", ".join(m.name for m in REGISTRY.values() if m.chosen == "idk")
        raise UserError(f"--idk-answers is for --method {users} only; drop it with --method {config.method}")


def loss_hparams(config: Any) -> dict[str, float]:
    """The resolved settings the loss takes (only those the method has)."""
    spec = _method(config)
    given = {name: getattr(config, name) for name in NAMED_SETTINGS}
    return spec.hparams(**{k: v for k, v in given.items() if k in spec.defaults},
                        **_extra_settings(config))
