"""How the paper labels the values of its sweeps (figure columns, report captions).

    method (guidance / experiment / method)   SDS, VSD, ESD, HiFA, SDI (ours); CSD, NFSD (not in the paper)
    kappa (section 6.2, Fig. 6.3)              Random (SDS), Random fixed, Fixed-point, SGD, DDIM inversion (SDI)
    +ablation (Fig. 6.2, the improvements)     SDS 64 px -> + 512 px render -> + annealed t -> + DDIM inversion (SDI)
    cfg (Fig. 6.5)                             CFG fwd / inv, read from the run's config (e.g. CFG 7.5 / -7.5)
    inversion.n_steps (Fig. 6.6)               N inversion steps

Any other axis is labelled ``key=value``.
"""

from __future__ import annotations

from typing import Any

from eval.runs import cfg_get

METHOD_LABELS = {
    "sds": "SDS",
    "sdi": "SDI (ours)",
    "ddim_inversion": "SDI (ours)",
    "vsd": "VSD",
    "esd": "ESD",
    "hifa": "HiFA",
    "csd": "CSD",
    "nfsd": "NFSD",
}
KAPPA_LABELS = {
    "random_resampled": "Random (SDS)",
    "random_fixed": "Random fixed",
    "fixed_point": "Fixed-point",
    "sgd": "SGD",
    "ddim_inversion": "DDIM inversion (SDI)",
    "cached": "Cached eps (eq. 4.5)",
}
IMPROVEMENT_LABELS = {
    "sds_lowres": "SDS, 64 px render",
    "sds_highres": "+ 512 px render",
    "sds_anneal": "+ annealed t",
    "sdi": "+ DDIM inversion (SDI)",
}
_EXPERIMENT_PREFIXES = ("table61_",)


def method_label(method: str) -> str:
    """``sds`` -> SDS, ``ddim_inversion`` -> SDI (ours); labels the trainer made (``kappa=sgd``) stay as they are."""
    return METHOD_LABELS.get(str(method).lower(), str(method))


def _num(x: Any) -> str:
    try:
        return f"{float(x):g}"
    except (TypeError, ValueError):
        return str(x)


def axis_label(key: str, value: str, config: dict[str, Any] | None = None) -> str:
    """The paper's label of one swept value; ``config`` (a run of that value) fills in what the value only names."""
    key = key.lstrip("+~")
    if key in ("guidance", "method"):
        return method_label(value)
    if key == "experiment":
        v = value
        for p in _EXPERIMENT_PREFIXES:
            v = v.removeprefix(p)
        return method_label(v)
    if key == "kappa":
        return KAPPA_LABELS.get(value, value)
    if key == "ablation":
        return IMPROVEMENT_LABELS.get(value, value)
    if key == "cfg":
        fwd, inv = cfg_get(config or {}, "cfg.fwd"), cfg_get(config or {}, "cfg.inv")
        return f"CFG {_num(fwd)} / {_num(inv)}" if fwd is not None and inv is not None else f"cfg={value}"
    if key in ("cfg.fwd", "cfg.inv"):
        return f"{key} {_num(value)}"
    if key == "inversion.n_steps":
        return f"{value} inversion steps"
    return f"{key}={value}"
