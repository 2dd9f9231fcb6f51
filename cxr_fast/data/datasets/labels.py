"""What every data set's table shares once read: the official split lists, and patients' ages, sexes and views as
the subgroup audit counts them (ages in years, M/F, upper-case view names; unusable values become unknown and are
reported)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast import constants as C
from cxr_fast.errors import CxrFastError


def read_split_list(path: str | Path) -> list[str]:
    """One image name per line (NIH's train_val_list.txt / test_list.txt); blank lines ignored."""
    try:
        lines = Path(path).read_text().split()
    except OSError as error:
        raise CxrFastError(f"cannot read split list {path}: {error}") from None
    if not lines:
        raise CxrFastError(f"split list {path} is empty")
    return lines


# DICOM's age string (PS3.5 AS): nnnD, nnnW, nnnM or nnnY; NIH's 2017 table uses nnnY, its 2020 revision integers.
AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}
SEX_SPELLINGS = {"M": "M", "MALE": "M", "MAN": "M", "F": "F", "FEMALE": "F", "WOMAN": "F"}


def parse_ages(values: pd.Series) -> pd.Series:
    """Years (float) from ages as tables and DICOM write them; NaN when missing, malformed, negative or past
    MAX_AGE (the NIH table holds a few such as 414)."""
    parts = values.astype("string").str.strip().str.upper().str.extract(r"^([+-]?\d+(?:\.\d+)?)\s*([DWMY]?)$")
    years = pd.to_numeric(parts[0], errors="coerce").astype(float) * parts[1].map(AGE_UNITS).astype(float)
    return years.where((years >= 0) & (years <= C.MAX_AGE))


def parse_sexes(values: pd.Series) -> pd.Series:
    """M or F from the common spellings (M, F, male, Female, MAN, woman, ...); None otherwise."""
    mapped = values.astype("string").str.strip().str.upper().map(SEX_SPELLINGS)
    return mapped.astype(object).where(mapped.notna(), None)


def parse_views(values: pd.Series) -> pd.Series:
    """Upper-case view names (PA, AP, LATERAL, ...); None when empty."""
    values = values.astype("string").str.strip().str.upper()
    return values.where((values.str.len() > 0).fillna(False)).astype(object).where(lambda v: v.notna(), None)


def demographics(ages: pd.Series | None, sexes: pd.Series | None, views: pd.Series | None, rows: int) -> pd.DataFrame:
    """Per row: age (years, NaN when missing or unusable), sex (M/F or None), view (or None), from a table's columns
    (None: the table has no such column)."""
    index = pd.RangeIndex(rows) if ages is None and sexes is None and views is None else \
        next(s.index for s in (ages, sexes, views) if s is not None)
    out = pd.DataFrame(index=index)
    out["age"] = parse_ages(ages) if ages is not None else np.nan
    out["sex"] = parse_sexes(sexes) if sexes is not None else None
    out["view"] = parse_views(views) if views is not None else None
    return out


def unusable_values(given: dict[str, pd.Series | None], parsed: pd.DataFrame) -> dict:
    """Per attribute, the values a table gives that became unknown (not the empty ones): their count and a few
    examples, for the manifest's report."""
    report = {}
    for name, values in given.items():
        if values is None:
            continue
        values = values.astype("string").str.strip()
        lost = values.notna() & (values.str.len() > 0) & parsed[name].isna()
        report[name] = {"count": int(lost.sum()), "examples": sorted(set(values[lost].tolist()))[:5]}
    return report


def age_band(age: float | None) -> str | None:
    """The audit's band of an age: 0-19, 20-39, 40-59, 60-79 or 80+; None when unknown."""
    if age is None or not np.isfinite(age):
        return None
    return C.AGE_BANDS[min(int(age) // 20, len(C.AGE_BANDS) - 1)]

