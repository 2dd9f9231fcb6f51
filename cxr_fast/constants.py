"""Fixed facts about chest radiographs and the model input, and the defaults derived from them (a data set's own
facts, its classes and columns, live in its description: `data/datasets/`).

Everything here is a constant with a reason; anything a user may change lives in `config.py`.
"""

# The seed's input size: 512 keeps small findings (nodules of a few mm) visible where 224 loses them, and
# ConvNeXt-Large at 512 with batch 4 still fits a 40 GB card.
IMAGE_SIZE = 512

# CLAHE as commonly used for chest radiographs: clip 2.0 lifts local contrast in the lung fields without
# amplifying noise in the flat background; 8x8 tiles are OpenCV's default and DALI's.
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = 8

SPLITS = ("train", "val", "test")

# The subgroups of the audit (CheXclusion's attributes): sex, age band and view position as the table records them.
SEXES = ("M", "F")
AGE_BANDS = ("0-19", "20-39", "40-59", "60-79", "80+")
VIEWS = ("PA", "AP")
MAX_AGE = 120  # tables hold a few impossible ages (NIH's 414): those count as unknown

