"""The HTTP listener of ``shardstore serve --http-port``: plain GETs that any HTTP cache can front, and the web view."""
