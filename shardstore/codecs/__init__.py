"""Codecs: one module per codec, one registry, a pipeline.

Importing this package registers every built-in codec.
"""

from shardstore.codecs.base import Codec, PieceInfo
from shardstore.codecs.byteplanes import BytePlanesZstdCodec
from shardstore.codecs.delta import XorDeltaCodec
from shardstore.codecs.entropy import FloatEntropyCodec
from shardstore.codecs.fp8 import Fp8ChannelCodec
from shardstore.codecs.int8 import Int8ChannelCodec
from shardstore.codecs.intn import IntGroupCodec
from shardstore.codecs.pipeline import Pipeline
from shardstore.codecs.prune import MagnitudePruneCodec
from shardstore.codecs.raw import RawCodec
from shardstore.codecs.registry import codec_from_name, codec_names, get_codec, register_codec
from shardstore.codecs.sparse import SparseBitmapCodec

register_codec(RawCodec, "raw")
register_codec(BytePlanesZstdCodec, "zstd", "byteplanes-zstd")
register_codec(FloatEntropyCodec, "lossless", "float-entropy")
# Quantizers (lossy): named in a push policy (``--lossy 'PATTERN=int8'``), never alone as ``--codec``.
register_codec(Int8ChannelCodec, "int8")
register_codec(IntGroupCodec, "intn")
for _bits in range(2, 8):
    register_codec(IntGroupCodec, f"int{_bits}", config={"bits": _bits})
register_codec(Fp8ChannelCodec, "fp8", "fp8-e4m3")
register_codec(Fp8ChannelCodec, "fp8-e5m2", config={"format": "e5m2"})
register_codec(SparseBitmapCodec, "sparse", "sparse-bitmap")
# Magnitude pruning (lossy, opt-in like the quantizers): ``--lossy 'PATTERN=prune:0.9'`` zeroes 90 %.
register_codec(MagnitudePruneCodec, "prune")
# No name: a delta stream comes from ``push --base``, never from a codec choice.
register_codec(XorDeltaCodec)

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
