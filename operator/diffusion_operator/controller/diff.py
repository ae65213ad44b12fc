"""Is the desired object already in place? (desired is a subset of observed, quantities compared by value)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

_SUFFIX = {
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|)$")


def parse_quantity(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    if not isinstance(value, str):
        return None
    match = _QUANTITY.match(value)
    if not match:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIX[match.group(2)]
    except InvalidOperation:
        return None


def _same_scalar(desired: Any, observed: Any, quantity: bool) -> bool:
    if desired == observed and type(desired) is type(observed):
        return True
    if quantity:
        a, b = parse_quantity(desired), parse_quantity(observed)
        return a is not None and a == b
    return False


QUANTITY_PARENTS = {"limits", "requests", "sizeLimit", "averageValue", "capacity"}


def is_subset(desired: Any, observed: Any, key: str = "") -> bool:
    """True when every field of `desired` has the same value in `observed` (lists: same length, element-wise)."""
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return False
        quantity_map = key in ("limits", "requests")
        for k, v in desired.items():
            if k not in observed:
                return False
            if quantity_map and not isinstance(v, dict):
                if not _same_scalar(v, observed[k], quantity=True):
                    return False
            elif not is_subset(v, observed[k], k):
                return False
        return True
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(desired) != len(observed):
            return False
        return all(is_subset(d, o, key) for d, o in zip(desired, observed, strict=True))
    return _same_scalar(desired, observed, quantity=key in QUANTITY_PARENTS)
