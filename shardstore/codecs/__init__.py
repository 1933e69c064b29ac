"""Codecs: one module per codec, one registry, a pipeline.

Importing this package registers every built-in codec.
"""

from shardstore.codecs.base import Codec, PieceInfo
from shardstore.codecs.byteplanes import BytePlanesZstdCodec
from shardstore.codecs.entropy import FloatEntropyCodec
from shardstore.codecs.pipeline import Pipeline
from shardstore.codecs.raw import RawCodec
from shardstore.codecs.registry import codec_from_name, codec_names, get_codec, register_codec

register_codec(RawCodec, "raw")
register_codec(BytePlanesZstdCodec, "zstd", "byteplanes-zstd")
register_codec(FloatEntropyCodec, "lossless", "float-entropy")

# The codec a push uses when none is named.
DEFAULT_CODEC_NAME = "lossless"

__all__ = [
    "DEFAULT_CODEC_NAME",
    "Codec",
    "PieceInfo",
    "Pipeline",
    "codec_from_name",
    "codec_names",
    "get_codec",
    "register_codec",
]
