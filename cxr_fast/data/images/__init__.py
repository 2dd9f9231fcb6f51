"""Reading a source image (PNG, JPEG, DICOM): its size from the header before decoding, the decoders' limits, and the
8-bit gray picture the rest of the project works on."""

from cxr_fast.data.images.source import IMAGE_SUFFIXES, image_files, read_gray

__all__ = ["IMAGE_SUFFIXES", "image_files", "read_gray"]
