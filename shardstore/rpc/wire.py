"""What client and server agree on besides the proto: message sizes and the credentials header.

Both sides import these from here, so the client never imports the server
(which pulls in the HTTP listener, metrics and the store) just to size a message.
"""

from __future__ import annotations

# Object bytes travel in chunks of 1 MiB: big enough that per-message cost is noise, small
# enough that a shard of any size never makes a large message and a slow peer never pins much memory.
CHUNK_BYTES = 1 << 20
# Fits the largest manifest accepted over the wire; every other message is about one chunk.
MAX_MESSAGE_BYTES = 64 << 20
# Slack above the payload limit for the message framing around it.
MESSAGE_LIMIT = MAX_MESSAGE_BYTES + (1 << 16)
MAX_OBJECT_BYTES = 2 << 30
MAX_IDS_PER_REQUEST = 100_000

# Credentials: ``authorization: Bearer <token>`` metadata on every call.
AUTHORIZATION_KEY = "authorization"
BEARER = "Bearer "
CLIENT_TOKEN_ENV = "SHARDSTORE_TOKEN"
