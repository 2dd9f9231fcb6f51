"""Reading the NIH label table (Data_Entry_2017.csv) and the official split lists; label strings to multi-hot.

The table is normalised and checked where it enters, once, for every command: image names, patient IDs and finding
names are trimmed (`" 3"` and `"3"` are one patient; `"Effusion | Mass"` is Effusion and Mass), and missing columns,
empty cells, unknown or empty finding names, "No Finding" beside a finding, and duplicate image names are reported
with the file and the offending row, as a `CxrFastError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast import constants as C
from cxr_fast.errors import CxrFastError

_CLASS_INDEX = {name: i for i, name in enumerate(C.CLASS_NAMES)}


def parse_finding_labels(text: str) -> np.ndarray:
    """'Effusion|Mass' -> multi-hot uint8 vector in canonical order; 'No Finding' -> all zeros."""
    vector = np.zeros(C.NUM_CLASSES, dtype=np.uint8)
    for name in str(text).split("|"):
        name = name.strip()
        if name == C.NO_FINDING:
            continue
        if name not in _CLASS_INDEX:
            raise CxrFastError(f"unknown finding {name!r}; known: {', '.join(C.CLASS_NAMES)} and {C.NO_FINDING!r}")
        vector[_CLASS_INDEX[name]] = 1
    return vector


def format_finding_labels(vector: np.ndarray) -> str:
    """Inverse of `parse_finding_labels`."""
    names = [C.CLASS_NAMES[i] for i in np.flatnonzero(vector)]
    return "|".join(names) if names else C.NO_FINDING


def read_label_table(path: str | Path) -> pd.DataFrame:
    """Read and validate the NIH table (.csv or .csv.gz). Adds no columns; see `multi_hot` for the labels."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={C.COL_IMAGE: str, C.COL_LABELS: str, C.COL_PATIENT: str})
    except FileNotFoundError:
        raise CxrFastError(f"label table not found: {path}") from None
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise CxrFastError(f"cannot read label table {path}: {error}") from None
    table.columns = [str(c).strip() for c in table.columns]
    table = table.loc[:, [c for c in table.columns if not c.startswith("Unnamed")]]
    missing = [c for c in C.REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise CxrFastError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {', '.join(map(repr, table.columns))}. "
            "Expected the NIH Data_Entry_2017.csv layout."
        )
    for column in C.REQUIRED_COLUMNS:
        table[column] = table[column].str.strip().replace("", np.nan)
    empty = table[list(C.REQUIRED_COLUMNS)].isna().any(axis=1)
    if empty.any():
        rows = _row_numbers(empty)
        raise CxrFastError(f"{path}: empty {'/'.join(C.REQUIRED_COLUMNS)} in row(s) {rows}")
    duplicated = table[C.COL_IMAGE].duplicated(keep=False)
    if duplicated.any():
        names = sorted(set(table.loc[duplicated, C.COL_IMAGE]))
        raise CxrFastError(f"{path}: duplicate image name(s) {', '.join(names[:5])}{' …' if len(names) > 5 else ''}")
    table[C.COL_LABELS] = _canonical_labels(table, path)
    return table.reset_index(drop=True)


def _row_numbers(mask: pd.Series, limit: int = 5) -> str:
    # +2: one for the header line, one because people count file lines from 1.
    rows = [str(i + 2) for i in np.flatnonzero(mask.to_numpy())[:limit]]
    return ", ".join(rows) + (" …" if int(mask.sum()) > limit else "")


def _canonical_labels(table: pd.DataFrame, path: Path) -> pd.Series:
    """`Finding Labels` with every name trimmed, after checking each name is known and "No Finding" stands alone."""
    names = table[C.COL_LABELS].str.split("|").map(lambda parts: [part.strip() for part in parts])
    known = set(C.CLASS_NAMES) | {C.NO_FINDING}
    exploded = names.explode()
    bad = ~exploded.isin(known)
    if bad.any():
        first = exploded[bad].index[0]
        shown = sorted(set(exploded[bad]))
        raise CxrFastError(
            f"{path}: unknown finding name(s) {', '.join(map(repr, shown[:5]))} (first in row {first + 2}, "
            f"image {table.at[first, C.COL_IMAGE]}); known: {', '.join(C.CLASS_NAMES)} and {C.NO_FINDING!r}"
        )
    mixed = names.map(lambda parts: C.NO_FINDING in parts and len(parts) > 1)
    if mixed.any():
        first = int(np.flatnonzero(mixed.to_numpy())[0])
        raise CxrFastError(f"{path}: row {first + 2} (image {table.at[first, C.COL_IMAGE]}) says {C.NO_FINDING!r} "
                           "beside a finding")
    return names.map("|".join)


def multi_hot(table: pd.DataFrame) -> np.ndarray:
    """(rows, 14) uint8 multi-hot matrix for a validated table, vectorised (the full table takes well under 1 s)."""
    strings = table[C.COL_LABELS].astype(str)
    return np.stack([strings.str.contains(rf"(?:^|\|){name}(?:\||$)", regex=True) for name in C.CLASS_NAMES], axis=1
                    ).astype(np.uint8)


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


def demographics(table: pd.DataFrame) -> pd.DataFrame:
    """Per row: age (years, NaN when missing or unusable), sex (M/F or None), view (PA/AP/... or None),
    follow_up (int or None)."""
    out = pd.DataFrame(index=table.index)
    out["age"] = parse_ages(table[C.COL_AGE]) if C.COL_AGE in table else np.nan
    out["sex"] = parse_sexes(table[C.COL_SEX]) if C.COL_SEX in table else None
    if C.COL_VIEW in table:
        values = table[C.COL_VIEW].astype("string").str.strip().str.upper()
        out["view"] = values.where((values.str.len() > 0).fillna(False)).astype(object).where(lambda v: v.notna(),
                                                                                               None)
    else:
        out["view"] = None
    out["follow_up"] = pd.to_numeric(table[C.COL_FOLLOWUP], errors="coerce") if C.COL_FOLLOWUP in table else np.nan
    return out


def unusable_demographics(table: pd.DataFrame, people: pd.DataFrame) -> dict:
    """Per attribute, the values the table gives that became unknown (not the empty ones): their count and a few
    examples, for the manifest's report."""
    report = {}
    for column, name in ((C.COL_AGE, "age"), (C.COL_SEX, "sex")):
        if column not in table:
            continue
        given = table[column].astype("string").str.strip()
        lost = given.notna() & (given.str.len() > 0) & people[name].isna()
        report[name] = {"count": int(lost.sum()), "examples": sorted(set(given[lost].tolist()))[:5]}
    return report


def age_band(age: float | None) -> str | None:
    """The audit's band of an age: 0-19, 20-39, 40-59, 60-79 or 80+; None when unknown."""
    if age is None or not np.isfinite(age):
        return None
    return C.AGE_BANDS[min(int(age) // 20, len(C.AGE_BANDS) - 1)]

