"""Shards: a sample's components, tar members and DALI's index, the manifest, the writer and its inputs, the output
folder's claims, and `verify`."""

from cxr_fast.data.shards.inputs import ShardInput
from cxr_fast.data.shards.manifest import MANIFEST, load_manifest, split_shards
from cxr_fast.data.shards.tars import walk_tar
from cxr_fast.data.shards.verify import verify
from cxr_fast.data.shards.writer import write_shards

__all__ = ["MANIFEST", "ShardInput", "load_manifest", "split_shards", "verify", "walk_tar", "write_shards"]
