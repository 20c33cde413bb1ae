"""The paper's Table 6.1 as data, and the map from a run's method label to one of its rows.

Rows: SDS 10k, VSD 25k, ESD 25k, HiFA 25k, SDI 10k (SD 2.1, NeRF, 43 prompts x 50 views each);
each holds CLIP, quality, sharpness, real as (mean, std), Div.%, time in minutes and VRAM in GB.
"""

from __future__ import annotations

import re
from typing import Any

# The paper's Table 6.1 (43 prompts, 50 views each).
PAPER_ROWS: list[dict[str, Any]] = [
    {
        "key": "sds",
        "label": "SDS 10k",
        "clip": (29.81, 2.49),
        "quality": (76, 6.6),
        "sharpness": (99, 1.2),
        "real": (98, 2.4),
        "div_pct": 18.6,
        "time_min": 66,
        "vram_gb": 6.2,
    },
    {
        "key": "vsd",
        "label": "VSD 25k",
        "clip": (33.31, 2.39),
        "quality": (77, 6.7),
        "sharpness": (98, 1.3),
        "real": (96, 4.4),
        "div_pct": 23.2,
        "time_min": 334,
        "vram_gb": 47.9,
    },
    {
        "key": "esd",
        "label": "ESD 25k",
        "clip": (32.79, 2.15),
        "quality": (77, 7.2),
        "sharpness": (98, 1.2),
        "real": (97, 2.7),
        "div_pct": 14.0,
        "time_min": 331,
        "vram_gb": 46.8,
    },
    {
        "key": "hifa",
        "label": "HiFA 25k",
        "clip": (32.80, 2.35),
        "quality": (81, 6.5),
        "sharpness": (98, 1.5),
        "real": (97, 1.2),
        "div_pct": 4.7,
        "time_min": 235,
        "vram_gb": 46.4,
    },
    {
        "key": "sdi",
        "label": "SDI (ours) 10k",
        "clip": (33.47, 2.49),
        "quality": (82, 6.3),
        "sharpness": (98, 1.3),
        "real": (97, 1.2),
        "div_pct": 4.7,
        "time_min": 119,
        "vram_gb": 39.2,
    },
]
PAPER_ORDER = [r["key"] for r in PAPER_ROWS]
_METHOD_ALIASES = {
    "ddim_inversion": "sdi",
    "ddiminversion": "sdi",
    "sdi": "sdi",
    "sds": "sds",
    "vsd": "vsd",
    "prolificdreamer": "vsd",
    "esd": "esd",
    "hifa": "hifa",
    "csd": "csd",
    "nfsd": "nfsd",
    "ism": "ism",
    "luciddreamer": "ism",
}
# CSD, NFSD and ISM are not in the paper's table (related work only): their rows have no paper row beside them
_METHOD_LABELS = {
    "sds": "SDS",
    "sdi": "SDI",
    "vsd": "VSD",
    "esd": "ESD",
    "hifa": "HiFA",
    "csd": "CSD",
    "nfsd": "NFSD",
    "ism": "ISM",
}


def paper_key(method: str) -> str | None:
    """Map a run's method label to a row of the paper's table (sds, sdi, vsd, esd, hifa) or None."""
    m = method.lower().strip()
    if m in _METHOD_ALIASES:
        return _METHOD_ALIASES[m]
    squashed = re.sub(r"[^a-z0-9]", "", m)
    if squashed in _METHOD_ALIASES:
        return _METHOD_ALIASES[squashed]
    first = re.split(r"[^a-z0-9]+", m)[0] if m else ""
    return _METHOD_ALIASES.get(first)


def method_display(method: str) -> str:
    key = paper_key(method)
    if key and re.sub(r"[^a-z0-9]", "", method.lower()) in (key, "ddiminversion"):
        return _METHOD_LABELS[key]
    return method
