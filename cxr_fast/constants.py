"""Fixed facts about ChestX-ray14 and the defaults derived from them.

Everything here is a constant with a reason; anything a user may change lives in `config.py`.
"""

# The 14 findings in the order of the NIH release (Wang et al. 2017, Table 1). Every multi-hot vector, every
# model output and every per-class table in this project uses this order.
CLASS_NAMES = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_CLASSES = len(CLASS_NAMES)

# "No Finding" is not a class: it is the all-zero label vector.
NO_FINDING = "No Finding"

# Gray-level normalisation. The model's stem is ImageNet-pretrained; timm folds a 3-channel stem into one channel by
# summing its weights, which matches feeding the same gray value to R, G and B. The matching statistics are the
# means of ImageNet's per-channel mean and std (0.485/0.456/0.406 and 0.229/0.224/0.225), on the 0-255 scale.
GRAY_MEAN = 0.449 * 255.0
GRAY_STD = 0.226 * 255.0

# The seed's input size: 512 keeps small findings (nodules of a few mm) visible where 224 loses them, and
# ConvNeXt-Large at 512 with batch 4 still fits a 40 GB card.
IMAGE_SIZE = 512

# CLAHE as commonly used for chest radiographs: clip 2.0 lifts local contrast in the lung fields without
# amplifying noise in the flat background; 8x8 tiles are OpenCV's default and DALI's.
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = 8

# Real ChestX-ray14 prevalence per class (images with the finding / 112,120), from Data_Entry_2017.csv. The
# synthetic data set draws its labels from these numbers.
REAL_PREVALENCE = {
    "Atelectasis": 0.1031,
    "Cardiomegaly": 0.0248,
    "Effusion": 0.1188,
    "Infiltration": 0.1774,
    "Mass": 0.0516,
    "Nodule": 0.0565,
    "Pneumonia": 0.0128,
    "Pneumothorax": 0.0473,
    "Consolidation": 0.0416,
    "Edema": 0.0205,
    "Emphysema": 0.0224,
    "Fibrosis": 0.0150,
    "Pleural_Thickening": 0.0302,
    "Hernia": 0.0020,
}

SPLITS = ("train", "val", "test")

# Columns of Data_Entry_2017.csv that the pipeline needs; the others are only used by the EDA report.
COL_IMAGE = "Image Index"
COL_LABELS = "Finding Labels"
COL_PATIENT = "Patient ID"
COL_AGE = "Patient Age"
COL_SEX = "Patient Gender"
COL_VIEW = "View Position"
COL_FOLLOWUP = "Follow-up #"
REQUIRED_COLUMNS = (COL_IMAGE, COL_LABELS, COL_PATIENT)

# The subgroups of the audit (CheXclusion's attributes): sex, age band and view position as the table records them.
SEXES = ("M", "F")
AGE_BANDS = ("0-19", "20-39", "40-59", "60-79", "80+")
VIEWS = ("PA", "AP")
MAX_AGE = 120  # the NIH table holds a few impossible ages (e.g. 414): those count as unknown

