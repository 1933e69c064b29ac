"""A real nginx on 127.0.0.1 with ``proxy_cache`` in front of a server's HTTP endpoint (tests and bench_fanout).

nginx runs in the foreground as a child process with every path (config, pid, temp files,
logs, the cache itself) under one folder, so it needs no root and leaves nothing behind.
The config is the one docs/operations.md shows, less what only production needs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_port

CONFIG = """\
{user}daemon off;
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    proxy_cache_path {root}/cache levels=2:2 keys_zone=shards:16m max_size=16g inactive=365d use_temp_path=off;
    upstream shardstore {{ server {upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location /v1/ {{
            proxy_pass http://shardstore;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache shards;
            proxy_cache_key $uri;            # objects are named by content: one entry per id, whoever asks
            proxy_cache_lock on;             # 16 clients missing the same shard make one upstream request
            proxy_cache_lock_timeout 120s;
            proxy_cache_valid 200 365d;      # the origin says immutable; this keeps it if a header is lost
            proxy_buffering on;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
}}
"""


class NginxCache:
    """``with NginxCache(root, "127.0.0.1:8080") as cache:`` then GET ``cache.url + "/v1/shards/<id>"``."""

    def __init__(self, root: Path, upstream: str, workers: int = 1) -> None:
        self.root = root
        self.upstream = upstream
        self.workers = workers
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def cache_files(self) -> list[Path]:
        return [p for p in self.cache_dir.rglob("*") if p.is_file()]

    def start(self) -> NginxCache:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        # As root, nginx would hand its workers to "nobody", who cannot enter a private temp folder.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        config = self.root / "nginx.conf"
        config.write_text(CONFIG.format(user=user, workers=self.workers, root=self.root, upstream=self.upstream,
                                        port=self.port))
        self.process = subprocess.Popen([binary, "-p", str(self.root), "-c", str(config), "-e",
                                         str(self.root / "error.log")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"nginx exited: {stderr}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start listening within 15 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def __enter__(self) -> NginxCache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
