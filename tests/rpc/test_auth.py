"""Access control: bearer tokens with scopes and model prefixes, on every RPC, in-process and through the CLI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import shardstore
from rpc.access_helpers import (
    DELETE_TOKEN,
    READ_TOKEN,
    TEAM_TOKEN,
    TOKENS,
    UNKNOWN_TOKEN,
    WRITE_TOKEN,
    cli,
    env_with,
    one_line_error,
    serve_process,
)
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model
from shardstore.errors import InvalidInputError, NotFoundError
from shardstore.format.digest import digest
from shardstore.repo.refs import parse_ref
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc
from shardstore.rpc.auth import (
    REGISTRY_RULES,
    AuthenticationError,
    Grant,
    PermissionDeniedError,
    Scope,
    TokenTable,
    load_token_table,
    parse_entries,
)
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.client import GrpcClient
from shardstore.rpc.server import SERVICE_NAME
from shardstore.store import LocalStore


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_model(tmp_path_factory.mktemp("auth") / "small")


@pytest.fixture
def store(small_model: Path, tmp_path: Path) -> LocalStore:
    """A store holding ``small:v1`` and ``team/small:v1``."""
    store = LocalStore(tmp_path / "store")
    for ref in ("small:v1", "team/small:v1"):
        shardstore.push(small_model, ref, store=store, chunk_bytes=SMALL_CHUNK)
    return store


@pytest.fixture
def guarded(store: LocalStore) -> Iterator[BackgroundServer]:
    tokens = TokenTable(parse_entries(TOKENS, "test", separator=","))
    with BackgroundServer(store, tokens=tokens) as server:
        yield server


# -- the token table -----------------------------------------------------------------------------------------


def test_entries_parse_with_scopes_prefixes_and_comments(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# ops tokens\n\n{READ_TOKEN}:read   # CI\n{TEAM_TOKEN}:write:team/\n")
    table = load_token_table(tokens_file, {"SHARDSTORE_TOKENS": f"{WRITE_TOKEN}:write, {READ_TOKEN}:write:x/"})
    assert len(table) == 3  # READ_TOKEN appears twice: one token, two grants
    assert table.grants(READ_TOKEN) == (Grant(Scope.READ), Grant(Scope.WRITE, "x/"))
    assert table.authorize(TEAM_TOKEN, Scope.READ, "team/a")  # write implies read
    with pytest.raises(PermissionDeniedError, match="may not write model 'other'"):
        table.authorize(TEAM_TOKEN, Scope.WRITE, "other")
    with pytest.raises(PermissionDeniedError, match="may not write"):
        table.authorize(READ_TOKEN, Scope.WRITE, "y/model")
    table.authorize(READ_TOKEN, Scope.WRITE, "x/model")  # the second grant
    with pytest.raises(AuthenticationError, match="unknown token"):
        table.grants(UNKNOWN_TOKEN)
    with pytest.raises(AuthenticationError, match="requires a token"):
        table.grants(None)


@pytest.mark.parametrize(("entry", "message"), [
    (f"{READ_TOKEN}", "without a scope"),
    (f"{READ_TOKEN}:admin", "unknown scope 'admin'"),
    ("short:read", "at least 16 characters"),
    ("bad token with spaces:read", "at least 16 characters"),
    (f"{READ_TOKEN}:read:a b", "bad model prefix"),
])
def test_bad_entries_are_one_line_errors_that_never_echo_the_token(entry: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as caught:
        parse_entries(f"# comment\n{entry}\n", "tokens file t")
    assert "tokens file t:2" in str(caught.value)
    token = entry.split(":")[0]
    assert token not in str(caught.value)


def test_tokens_are_kept_only_as_digests() -> None:
    table = TokenTable(parse_entries(TOKENS, "test", separator=","))
    held = repr(vars(table))
    for token in (READ_TOKEN, WRITE_TOKEN, TEAM_TOKEN):
        assert token not in held


def test_every_rpc_of_the_service_has_a_rule() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Registry"].methods}
    assert set(REGISTRY_RULES) == methods


# -- every RPC, in-process ----------------------------------------------------------------------------------


def _stub(server: BackgroundServer) -> tuple[grpc.Channel, pb_grpc.RegistryStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.RegistryStub(channel)  # type: ignore[no-untyped-call]


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _calls(stub: pb_grpc.RegistryStub, shard_id: str, manifest_id: str) -> dict[str, object]:
    """One call of every RPC, each a function of the metadata; streams are drained."""
    upload = [pb.UploadChunk(kind=pb.OBJECT_KIND_BLOB, id=digest(b"x"), offset=0, total_size=1, data=b"x")]
    return {
        "ResolveRef": lambda md: stub.ResolveRef(pb.ResolveRefRequest(name="small", tag="v1"), metadata=md),
        "GetManifest": lambda md: stub.GetManifest(pb.GetManifestRequest(manifest_id=manifest_id), metadata=md),
        "GetBlob": lambda md: list(stub.GetBlob(pb.GetBlobRequest(blob_id=digest(b"x")), metadata=md)),
        "StreamShards": lambda md: list(stub.StreamShards(pb.StreamShardsRequest(shard_ids=[shard_id]), metadata=md)),
        "SignObjectUrls": lambda md: stub.SignObjectUrls(
            pb.SignObjectUrlsRequest(kind=pb.OBJECT_KIND_SHARD, ids=[shard_id]), metadata=md),
        "ListRefs": lambda md: stub.ListRefs(pb.ListRefsRequest(), metadata=md),
        "FindMissing": lambda md: stub.FindMissing(pb.FindMissingRequest(shard_ids=[shard_id]), metadata=md),
        "UploadObjects": lambda md: stub.UploadObjects(iter(upload), metadata=md),
        "PutManifest": lambda md: stub.PutManifest(pb.PutManifestRequest(manifest=b"{}"), metadata=md),
        "PutIndex": lambda md: stub.PutIndex(pb.PutIndexRequest(entries=[b"{}"]), metadata=md),
        "SetRef": lambda md: stub.SetRef(pb.SetRefRequest(name="small", tag="v2", manifest_id=manifest_id),
                                         metadata=md),
        "DeleteRef": lambda md: stub.DeleteRef(pb.DeleteRefRequest(name="small", tag="absent"), metadata=md),
    }


def _code(call: object, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    try:
        call(metadata)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_checks_the_token_and_its_scope(guarded: BackgroundServer, store: LocalStore) -> None:
    from shardstore.repo.repository import Repository

    repo = Repository(store)
    manifest_id = repo.resolve(parse_ref("small:v1"))
    shard_id = next(iter(repo.get_manifest(manifest_id).shards))
    channel, stub = _stub(guarded)
    with channel:
        calls = _calls(stub, shard_id, manifest_id)
        assert set(calls) == set(REGISTRY_RULES)  # the test covers every RPC
        for name, call in calls.items():
            assert _code(call, ()) is grpc.StatusCode.UNAUTHENTICATED, name
            assert _code(call, _bearer(UNKNOWN_TOKEN)) is grpc.StatusCode.UNAUTHENTICATED, name
            assert _code(call, (("authorization", f"Basic {READ_TOKEN}"),)) is grpc.StatusCode.UNAUTHENTICATED, name
            with_read = _code(call, _bearer(READ_TOKEN))
            if REGISTRY_RULES[name].scope > Scope.READ:
                assert with_read is grpc.StatusCode.PERMISSION_DENIED, name
            else:
                assert with_read is not grpc.StatusCode.PERMISSION_DENIED, name
            with_write = _code(call, _bearer(WRITE_TOKEN))
            if REGISTRY_RULES[name].scope is Scope.DELETE:  # pushing tokens cannot remove models
                assert with_write is grpc.StatusCode.PERMISSION_DENIED, name
                # A delete token gets past the gate: NOT_FOUND is the handler's answer (no such tag).
                assert _code(call, _bearer(DELETE_TOKEN)) is grpc.StatusCode.NOT_FOUND, name
            else:
                # A write token gets past the gate: whatever comes back is the handler's answer, not a refusal.
                assert with_write not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), name
    assert guarded.registry is not None and guarded.registry.guard is not None
    guard = guarded.registry.guard
    # The status reaches the client before the server's task has unwound: give it a moment to count down.
    deadline = time.monotonic() + 5
    while guard.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert guard.in_flight == 0


def test_read_token_pulls_and_cannot_push(guarded: BackgroundServer, small_model: Path, tmp_path: Path) -> None:
    url = f"grpc://{guarded.address}"
    report = shardstore.pull(f"{url}/small:v1", tmp_path / "out", token=READ_TOKEN)
    assert report.tensors == 5
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (small_model / "model.safetensors").read_bytes()
    with pytest.raises(PermissionDeniedError, match="may not write"):
        shardstore.push(small_model, f"{url}/small:v2", token=READ_TOKEN, chunk_bytes=SMALL_CHUNK)
    with pytest.raises(AuthenticationError, match="requires a token"):
        shardstore.pull(f"{url}/small:v1", tmp_path / "out2")
    assert not (tmp_path / "out2" / "model.safetensors").exists()


def test_prefix_token_writes_and_sees_only_its_models(guarded: BackgroundServer, small_model: Path,
                                                      store: LocalStore) -> None:
    url = f"grpc://{guarded.address}"
    shardstore.push(small_model, f"{url}/team/small:v2", token=TEAM_TOKEN, chunk_bytes=SMALL_CHUNK)
    with pytest.raises(PermissionDeniedError, match="may not write model 'small'"):
        shardstore.push(small_model, f"{url}/small:v2", token=TEAM_TOKEN, chunk_bytes=SMALL_CHUNK)
    from shardstore.repo.repository import Repository

    refs = {str(ref) for ref, _id in Repository(store).list_refs()}
    assert refs == {"small:v1", "team/small:v1", "team/small:v2"}  # the refused push set no ref
    with GrpcClient(guarded.address, token=TEAM_TOKEN, use_cache=False) as client:
        assert {str(ref) for ref, _id in client.list_refs()} == {"team/small:v1", "team/small:v2"}
        with pytest.raises(PermissionDeniedError, match="may not read model 'small'"):
            client.resolve(parse_ref("small:v1"))
        with pytest.raises(NotFoundError):  # past the gate, the handler's own answer
            client.resolve(parse_ref("team/none:v1"))
    with GrpcClient(guarded.address, token=READ_TOKEN, use_cache=False) as client:
        assert len(client.list_refs()) == 3


def test_health_is_open_and_reflection_needs_a_token(guarded: BackgroundServer) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        replies = list(reflection.ServerReflectionInfo(iter([request]), timeout=10, metadata=_bearer(READ_TOKEN)))
        assert SERVICE_NAME in {s.name for s in replies[0].list_services_response.service}


def test_client_refuses_to_send_a_token_in_plaintext_off_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInputError, match=r"refusing to send a token in plaintext to 10\.1\.2\.3:50051"):
        GrpcClient("10.1.2.3:50051", token=READ_TOKEN)
    monkeypatch.setenv("SHARDSTORE_TOKEN", READ_TOKEN)
    with pytest.raises(InvalidInputError, match="plaintext"):
        GrpcClient("registry.example:50051")
    monkeypatch.setenv("SHARDSTORE_ALLOW_PLAINTEXT_TOKEN", "1")
    GrpcClient("registry.example:50051").close()  # only builds a channel; nothing is sent


def test_a_token_with_a_control_character_is_refused_before_any_call(guarded: BackgroundServer) -> None:
    # grpc would only fail at the first call, with lines from its C core: the client says it at once.
    for bad in (f"{READ_TOKEN}\x01", f"tok en{READ_TOKEN}", f"{READ_TOKEN}\u00e9"):
        with pytest.raises(InvalidInputError, match="printable ASCII without spaces"):
            GrpcClient(guarded.address, token=bad)
    # A token file saved with CRLF line ends: the line end is not part of the token.
    with GrpcClient(guarded.address, token=f"{READ_TOKEN}\r\n", use_cache=False) as client:
        assert sorted(str(ref) for ref, _manifest in client.list_refs()) == ["small:v1", "team/small:v1"]


# -- the real command, in processes ----------------------------------------------------------------------------


def test_serve_require_token_refuses_to_start_without_tokens(store: LocalStore) -> None:
    result = cli("serve", "--store", str(store.root), "--port", "0", "--require-token", env=env_with())
    assert "no tokens" in one_line_error(result, "serve")


def test_serve_refuses_a_bad_tokens_file(store: LocalStore, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{READ_TOKEN}:sudo\n")
    result = cli("serve", "--store", str(store.root), "--port", "0", "--tokens-file", str(tokens), env=env_with())
    line = one_line_error(result, "serve")
    assert f"tokens file {tokens}:1" in line and "unknown scope 'sudo'" in line and READ_TOKEN not in line


def test_cli_with_tokens_from_env_and_file(store: LocalStore, small_model: Path, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# the team's writer\n{TEAM_TOKEN}:write:team/\n")
    env = env_with(SHARDSTORE_TOKENS=f"{READ_TOKEN}:read")
    with serve_process(store.root, "--require-token", "--tokens-file", str(tokens_file), env=env) as served:
        assert served.ready["tokens"] == 2
        url = f"grpc://{served.address}"
        # No token: one line naming the refusal, exit 1, nothing written.
        line = one_line_error(cli("pull", f"{url}/small:v1", str(tmp_path / "a"), "-q", env=env), "pull")
        assert "requires a token" in line
        assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
        # A read token from the environment: the pull works, byte for byte.
        reader = {**env, "SHARDSTORE_TOKEN": READ_TOKEN}
        pulled = cli("pull", f"{url}/small:v1", str(tmp_path / "b"), "--json", env=reader)
        assert pulled.returncode == 0, pulled.stderr
        assert (tmp_path / "b" / "model.safetensors").read_bytes() == (small_model / "model.safetensors").read_bytes()
        # ... and may not push.
        refused = cli("push", str(small_model), f"{url}/small:v9", "-q", "--token", READ_TOKEN, env=env)
        line = one_line_error(refused, "push")
        assert "may not write" in line
        # The team token (from the file) pushes under team/ only, and ls shows it only those.
        pushed = cli("push", str(small_model), f"{url}/team/small:v9", "--token", TEAM_TOKEN, "--json", env=env)
        assert pushed.returncode == 0, pushed.stderr
        listed = cli("ls", "--store", url, "--token", TEAM_TOKEN, "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        import json

        assert {m["ref"] for m in json.loads(listed.stdout)["models"]} == {"team/small:v1", "team/small:v9"}
        inspected = cli("inspect", f"{url}/team/small:v9", "--token", TEAM_TOKEN, "--json", env=env)
        assert inspected.returncode == 0 and json.loads(inspected.stdout)["ref"] == "team/small:v9"
        line = one_line_error(cli("inspect", f"{url}/small:v1", "--token", TEAM_TOKEN, env=env), "inspect")
        assert "may not read model 'small'" in line
        line = one_line_error(cli("ls", "--store", url, "--token", UNKNOWN_TOKEN, env=env), "ls")
        assert "unknown token" in line and UNKNOWN_TOKEN not in line
