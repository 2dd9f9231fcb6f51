"""What every data-set description produces, and the rules they share: the common sample table, uncertain-label
policies, view filters and the reading of a CSV table with errors that name the file.

A description reads its own table(s) into a `SampleTable`: one row per image with the columns in `COLUMNS` and a
label matrix in which 1 is positive, 0 negative and NaN "not stated" (masked: neither positive nor negative). The
pipeline after it (split, shards, training, evaluation) reads only this form, and takes the class names from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.errors import CxrFastError

# image: the data set's name of the image (unique; the shard key derives from it); path: the file relative to
# --images, or None when the image is found by its file name below --images (NIH); patient; age (years, NaN when
# unknown); sex (M, F or None); view (PA, AP, LATERAL, ... or None); follow_up (NIH's, NaN elsewhere);
# split: the official assignment (train, val, test; train_val: validation carved out of it; pool: validation and
# test carved out of it; "": left out); finding_labels: the table's own text of the labels, kept in each sample.
COLUMNS = ("image", "path", "patient", "age", "sex", "view", "follow_up", "split", "finding_labels")
SPLIT_MARKS = ("train", "val", "test", "train_val", "pool", "")

# What an uncertain label (CheXpert's -1) becomes (Irvin et al. 2019, section 3.2): ignore (U-Ignore: masked, no
# loss and no metric for that image and class), zeros (U-Zeros: negative), ones (U-Ones: positive).
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("negative", "masked")


@dataclass
class SampleTable:
    """A data set in the common form: `frame` (COLUMNS, one row per image), `labels` (rows, classes) float32 with
    NaN for not stated, the class names, the data set's name and the given values that became unknown."""

    frame: pd.DataFrame
    labels: np.ndarray
    classes: tuple[str, ...]
    dataset: str
    unknown_values: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [c for c in COLUMNS if c not in self.frame]
        if missing or self.labels.shape != (len(self.frame), len(self.classes)):
            raise ValueError(f"{self.dataset}: a sample table needs columns {missing} and labels of shape "
                             f"{(len(self.frame), len(self.classes))}, got {self.labels.shape}")

    def subset(self, rows: np.ndarray) -> SampleTable:
        """The rows selected by a boolean mask or an index array, renumbered from 0."""
        frame = self.frame[rows] if np.asarray(rows).dtype == bool else self.frame.iloc[rows]
        return SampleTable(frame.reset_index(drop=True), self.labels[rows], self.classes, self.dataset,
                           self.unknown_values)


@dataclass(frozen=True)
class Request:
    """What `shard` asks of a description: the folders and table, the uncertain and blank policies (None: the data
    set's default), the views to keep (None: its default; "all"), a table spec, the official split lists."""

    images: Path
    labels: Path
    uncertain: str | None = None
    blank: str = "negative"
    views: str | None = None
    spec: Path | None = None
    split_lists: tuple = (None, None)


def read_table(path: Path, columns: tuple[str, ...], what: str, **options) -> pd.DataFrame:
    """A CSV (or .csv.gz) table with trimmed column names; an error naming the file and the columns it lacks. Cells
    are text, and only an empty one is missing, unless `options` (pandas.read_csv's) say otherwise."""
    try:
        table = pd.read_csv(path, **({"dtype": str, "keep_default_na": False, "na_values": [""]} | options))
    except FileNotFoundError:
        raise CxrFastError(f"{what} not found: {path}") from None
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as error:
        raise CxrFastError(f"cannot read {what} {path}: {error}") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CxrFastError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; found "
                           f"{', '.join(map(repr, table.columns[:20]))}. Expected the {what} layout.")
    return table


def row_numbers(mask: np.ndarray | pd.Series, limit: int = 5) -> str:
    """File line numbers of the rows a mask selects (+2: the header line, and lines counted from 1)."""
    rows = [str(i + 2) for i in np.flatnonzero(np.asarray(mask))[:limit]]
    return ", ".join(rows) + (" …" if int(np.asarray(mask).sum()) > limit else "")


def parse_uncertain(text: str | None, default: str) -> tuple[dict[str, str], str]:
    """The policies of `"ones:Atelectasis,Edema zeros:*"` (a policy, a colon, class names or * for every class not
    named; groups separated by spaces or semicolons; None: the data set's `default`): class -> policy, and the
    policy of every other class."""
    policy: dict[str, str] = {}
    rest = "zeros"
    for group in filter(None, re.split(r"[\s;]+", (text if text is not None else default).strip())):
        name, _, names = group.partition(":")
        if name not in UNCERTAIN_POLICIES or not names:
            raise CxrFastError(f"--uncertain: {group!r} is not POLICY:CLASS,CLASS or POLICY:* with POLICY one of "
                               f"{', '.join(UNCERTAIN_POLICIES)}")
        for item in (n.strip() for n in names.split(",")):
            if item == "*":
                rest = name
            elif item in policy:
                raise CxrFastError(f"--uncertain names {item!r} twice")
            else:
                policy[item] = name
    return policy, rest


def apply_policies(values: np.ndarray, classes: tuple[str, ...], uncertain: str | None, default: str,
                   blank: str) -> np.ndarray:
    """Labels (1, 0, NaN not stated) from a table's raw values (1, 0, -1 uncertain, NaN blank), under the
    `--uncertain` text (None: `default`) and the blank policy."""
    named, rest = parse_uncertain(uncertain, default)
    if blank not in BLANK_POLICIES:
        raise CxrFastError(f"blank labels: use {' or '.join(BLANK_POLICIES)}, got {blank!r}")
    labels = values.astype(np.float32)
    labels[np.isnan(values)] = 0.0 if blank == "negative" else np.nan
    for c, name in enumerate(classes):
        column = labels[:, c]
        column[values[:, c] == -1] = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[named.get(name, rest)]
    return labels


def label_values(table: pd.DataFrame, classes: tuple[str, ...], path: Path) -> np.ndarray:
    """The (rows, classes) raw values of CheXpert-style label columns: 1, 0, -1 or blank (NaN); anything else is an
    error naming the row."""
    values = table[list(classes)].apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce")).to_numpy(float)
    given = table[list(classes)].notna().to_numpy()
    bad = (given & ~np.isin(values, (1.0, 0.0, -1.0))).any(axis=1)
    if bad.any():
        raise CxrFastError(f"{path}: label values must be 1, 0, -1 or blank; row(s) {row_numbers(bad)} hold others")
    return values


def keep_views(frame: pd.DataFrame, views: str | None, default: tuple[str, ...] | None) -> np.ndarray:
    """Rows whose view is among `views` ("PA,AP", "all"; None: the data set's `default`, None there: all)."""
    if views is None and default is None or views is not None and views.strip().lower() == "all":
        return np.ones(len(frame), dtype=bool)
    wanted = default if views is None else tuple(v.strip().upper() for v in views.split(",") if v.strip())
    return frame["view"].isin(wanted).to_numpy()


def check_unique_images(frame: pd.DataFrame, path: Path) -> None:
    duplicated = frame["image"].duplicated(keep=False)
    if duplicated.any():
        names = sorted(set(frame.loc[duplicated, "image"]))
        raise CxrFastError(f"{path}: duplicate image name(s) {', '.join(names[:5])}{' …' if len(names) > 5 else ''}")
