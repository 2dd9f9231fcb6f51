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
# test carved out of it; "": left out); finding_labels: the table's own text of the labels, kept in each sample;
# source: the name of the table file the row comes from (CheXpert: train.csv or valid.csv).
COLUMNS = ("image", "path", "patient", "age", "sex", "view", "follow_up", "split", "finding_labels", "source")
SPLIT_MARKS = ("train", "val", "test", "train_val", "pool", "")

# What an uncertain label (CheXpert's -1) becomes (Irvin et al. 2019, section 3.2): ignore (U-Ignore: masked, no
# loss and no metric for that image and class), zeros (U-Zeros: negative), ones (U-Ones: positive).
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
# What a blank label (not mentioned in the report) becomes: negative (as CheXpert's paper trains); masked, except
# where the image's "No Finding" is 1, whose blanks are negative (torchxrayvision's rule: a report that says
# "normal" mentions no finding); masked-all: every blank masked.
BLANK_POLICIES = ("negative", "masked", "masked-all")
NOT_APPLICABLE = "none: every label is stated"  # the policies applied to a table without uncertain or blank labels
# View names tables use (DICOM's ViewPosition, CheXpert's AP/PA, PadChest's Projection): a --views name outside
# these and the table's own values is a typo, an error rather than a filter that silently keeps nothing.
KNOWN_VIEWS = ("PA", "AP", "FRONTAL", "LATERAL", "LL", "AP_HORIZONTAL", "AP AXIAL", "PA LLD", "AP LLD", "PA RLD",
               "AP RLD", "XTABLE LATERAL", "LAO", "RAO", "LPO", "SWIMMERS", "COSTAL")


@dataclass
class SampleTable:
    """A data set in the common form: `frame` (COLUMNS, one row per image), `labels` (rows, classes) float32 with
    NaN for not stated, the class names, the data set's name and the given values that became unknown; `raw` the
    table's own values before any policy (1, 0, -1 uncertain, NaN blank; default: `labels`), `dropped` the rows
    left out so far by reason ({reason: {count, examples}}: with the rows kept they add up to the table's rows),
    `applied` what was applied (uncertain and blank policies, views, split lists, class map)."""

    frame: pd.DataFrame
    labels: np.ndarray
    classes: tuple[str, ...]
    dataset: str
    unknown_values: dict = field(default_factory=dict)
    raw: np.ndarray | None = None
    dropped: dict = field(default_factory=dict)
    applied: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [c for c in COLUMNS if c not in self.frame]
        if missing or self.labels.shape != (len(self.frame), len(self.classes)):
            raise ValueError(f"{self.dataset}: a sample table needs columns {missing} and labels of shape "
                             f"{(len(self.frame), len(self.classes))}, got {self.labels.shape}")
        if self.raw is None:
            self.raw = self.labels.copy()

    def subset(self, rows: np.ndarray) -> SampleTable:
        """The rows selected by a boolean mask or an index array, renumbered from 0."""
        frame = self.frame[rows] if np.asarray(rows).dtype == bool else self.frame.iloc[rows]
        return SampleTable(frame.reset_index(drop=True), self.labels[rows], self.classes, self.dataset,
                           self.unknown_values, self.raw[rows], dict(self.dropped), dict(self.applied))

    def keep(self, rows: np.ndarray, reason: str) -> SampleTable:
        """The rows a boolean mask keeps; the others counted as dropped for `reason`, with a few image names."""
        rows = np.asarray(rows, dtype=bool)
        kept = self.subset(rows)
        kept.dropped = count_dropped(self.dropped, reason, self.frame.loc[~rows, "image"])
        return kept

    @property
    def table_rows(self) -> int:
        """The rows the table(s) listed: those kept and those dropped."""
        return len(self.frame) + sum(entry["count"] for entry in self.dropped.values())

    def totals(self) -> pd.DataFrame:
        """Per class: positive, negative, uncertain and blank in the table's own values, and positive, negative and
        stated after the policies (what the model trains on)."""
        raw, labels = self.raw, self.labels
        return pd.DataFrame({"positive": (raw == 1).sum(0), "negative": (raw == 0).sum(0),
                             "uncertain": (raw == -1).sum(0), "blank": np.isnan(raw).sum(0),
                             "trained_positive": (labels == 1).sum(0), "trained_negative": (labels == 0).sum(0),
                             "stated": np.isfinite(labels).sum(0)}, index=pd.Index(self.classes, name="class"))


def count_dropped(dropped: dict, reason: str, images: pd.Series) -> dict:
    """`dropped` with `images` added under `reason` (a count and the first few names)."""
    if not len(images):
        return dict(dropped)
    entry = dropped.get(reason, {"count": 0, "examples": []})
    examples = (entry["examples"] + [str(i) for i in images.iloc[:5]])[:5]
    return dropped | {reason: {"count": entry["count"] + len(images), "examples": examples}}


@dataclass(frozen=True)
class Request:
    """What `shard` asks of a description: the folders and table, the uncertain and blank policies (None: the data
    set's default), the views to keep (None: its default; "all"), a table spec, the official split lists, and a
    relabel map (`vocabulary.read_relabel`; None: the descriptions' synonyms)."""

    images: Path
    labels: Path
    uncertain: str | None = None
    blank: str = "negative"
    views: str | None = None
    spec: Path | None = None
    split_lists: tuple = (None, None)
    relabel: dict | None = None

    def policies(self, default_uncertain: str) -> dict:
        """What the manifest records as applied: the uncertain policy (the data set's default when not given) and
        the blank rule."""
        return {"uncertain": self.uncertain if self.uncertain is not None else default_uncertain, "blank": self.blank}


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
    """The policies of `"ones:Atelectasis,Pleural Effusion zeros:*"` (a policy, a colon, class names — spaces
    allowed — or * for every class not named; a group ends where the next POLICY: begins, or at a semicolon; None:
    the data set's `default`): class -> policy, and the policy of every other class."""
    policy: dict[str, str] = {}
    rest = None
    groups = [g.strip() for g in re.split(rf"[;\s]+(?=(?:{'|'.join(UNCERTAIN_POLICIES)}):)|;",
                                          (text if text is not None else default).strip()) if g.strip()]
    if not groups:
        raise CxrFastError("--uncertain is empty: give POLICY:CLASS,... or POLICY:*, or leave it out for the data "
                           "set's default")
    for group in groups:
        name, _, names = group.partition(":")
        if name not in UNCERTAIN_POLICIES or not names:
            raise CxrFastError(f"--uncertain: {group[:80]!r} is not POLICY:CLASS,CLASS or POLICY:* with POLICY one "
                               f"of {', '.join(UNCERTAIN_POLICIES)}")
        for item in (n.strip() for n in names.split(",")):
            if item in policy or item == "*" and rest is not None:
                raise CxrFastError(f"--uncertain gives {item[:80]!r} two policies")
            if item == "*":
                rest = name
            else:
                policy[item] = name
    return policy, rest or "zeros"


def check_uncertain_names(text: str | None, classes) -> None:
    """Every class `--uncertain` names is one of `classes` (the source names of the data sets read): a typo would
    otherwise be silently ignored."""
    if text is None:
        return
    named, _rest = parse_uncertain(text, "")
    unknown = sorted(set(named) - set(classes))
    if unknown:
        raise CxrFastError(f"--uncertain names {', '.join(repr(n[:80]) for n in unknown[:5])}, not a class of the "
                           f"data set(s) read: {', '.join(classes)}")


def apply_policies(values: np.ndarray, classes: tuple[str, ...], request: Request, default: str,
                   no_finding: str | None = None) -> np.ndarray:
    """Labels (1, 0, NaN not stated) from a table's raw values (1, 0, -1 uncertain, NaN blank), under the request's
    `--uncertain` text (None: `default`) and blank policy; `no_finding` the class saying "no finding" (for the rule
    of `masked`)."""
    named, rest = parse_uncertain(request.uncertain, default)
    if request.blank not in BLANK_POLICIES:
        raise CxrFastError(f"blank labels: use {', '.join(BLANK_POLICIES)}, got {request.blank!r}")
    labels = values.astype(np.float32)
    blank = np.isnan(values)
    labels[blank] = 0.0 if request.blank == "negative" else np.nan
    if request.blank == "masked" and no_finding in classes:
        normal = values[:, classes.index(no_finding)] == 1
        labels[blank & normal[:, None]] = 0.0
    for c, name in enumerate(classes):
        column = labels[:, c]
        column[values[:, c] == -1] = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[named.get(name, rest)]
    return labels


def label_values(table: pd.DataFrame, classes: tuple[str, ...], path: Path) -> np.ndarray:
    """The (rows, classes) raw values of CheXpert-style label columns: 1, 0, -1 or blank (NaN); anything else is an
    error naming the row."""
    values = table[list(classes)].apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce")).to_numpy(float)
    given = table[list(classes)].notna().to_numpy()
    bad = given & ~np.isin(values, (1.0, 0.0, -1.0))
    if bad.any():
        row, column = (int(i[0]) for i in np.nonzero(bad))
        raise CxrFastError(f"{path}: label values must be 1, 0, -1 or blank; row(s) {row_numbers(bad.any(axis=1))} "
                           f"hold others (first: column {classes[column]!r}, value "
                           f"{str(table[classes[column]].iloc[row])[:40]!r})")
    return values


def wanted_views(views: str | None, default: tuple[str, ...] | None, frame: pd.DataFrame) -> tuple[str, ...] | None:
    """The views to keep ("PA,AP"; "all" or a data set without a default: None, every row); a name neither known
    (KNOWN_VIEWS) nor in the table is an error."""
    if views is None and default is None or views is not None and views.strip().lower() == "all":
        return None
    if views is None:
        return default
    wanted = tuple(v.strip().upper() for v in views.split(",") if v.strip())
    unknown = [v for v in wanted if v not in KNOWN_VIEWS and not frame["view"].eq(v).any()]
    if not wanted or unknown:
        raise CxrFastError(f"--views {views[:80]!r}: unknown view name(s) {', '.join(map(repr, unknown))}; known: "
                           f"{', '.join(KNOWN_VIEWS)} and those the table holds, or 'all'")
    return wanted


def check_unique_images(frame: pd.DataFrame, path: Path) -> None:
    duplicated = frame["image"].duplicated(keep=False)
    if duplicated.any():
        names = sorted(set(frame.loc[duplicated, "image"]))
        raise CxrFastError(f"{path}: duplicate image name(s) {', '.join(names[:5])}{' …' if len(names) > 5 else ''}")
