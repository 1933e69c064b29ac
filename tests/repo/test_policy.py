"""Per-tensor policy: rule grammar, what stays lossless, policy files, auto mode, and lossy pushes end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tree_snapshot

import shardstore
from shardstore.codecs.fp8 import Fp8ChannelCodec
from shardstore.codecs.int8 import Int8ChannelCodec
from shardstore.codecs.intn import IntGroupCodec
from shardstore.errors import FormatError, InvalidInputError
from shardstore.format.manifest import parse_manifest
from shardstore.repo.chunking import TensorSpec
from shardstore.repo.inspect import describe
from shardstore.repo.policy import DEFAULT_MIN_ELEMENTS, Policy, build_policy, parse_rule
from shardstore.repo.repository import Repository
from shardstore.store import LocalStore

# ------------------------------------------------------------------------------------------ grammar


def test_rules_parse() -> None:
    rule = parse_rule("*.weight=int8")
    assert (rule.pattern, rule.codec) == ("*.weight", Int8ChannelCodec())
    rule = parse_rule("int4:group=128,clip_steps=1")
    assert (rule.pattern, rule.codec) == ("*", IntGroupCodec(bits=4, group=128, clip_steps=1))
    assert parse_rule("encoder.*=intn:5").codec == IntGroupCodec(bits=5)  # a bare value: the first field
    assert parse_rule("*=fp8-e5m2").codec == Fp8ChannelCodec("e5m2")
    assert parse_rule("*=fp8:format=e5m2").codec == Fp8ChannelCodec("e5m2")
    assert parse_rule("auto").codec is None
    assert parse_rule("*.bias=lossless").codec is not None and parse_rule("*.bias=lossless").codec.lossless


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("=int8", "expected PATTERN=CODEC"),
        ("*.weight=", "expected PATTERN=CODEC"),
        ("*.weight=int9", "unknown codec 'int9'"),
        ("*=int4:group=-1", "group must be an integer"),
        ("*=int4:bogus=1", "unknown config keys"),
        ("*=int4:group", "bits must be an integer"),
        ("*=int4:,", "not KEY=VALUE"),
        ("*=int4:id=raw.v1", "not KEY=VALUE"),
        ("layer.[0-3.*=int8", "unbalanced"),
        ("*=auto:30", "'auto' takes no options"),
    ],
)
def test_bad_rules_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        parse_rule(text)
    assert "\n" not in str(info.value) and text in str(info.value)


# ------------------------------------------------------------------------------------------ what stays lossless


def test_defaults_keep_norms_biases_vectors_small_and_int_tensors_lossless() -> None:
    policy = build_policy(["*=int8"])
    lossy = TensorSpec("layer.0.attn.weight", "F32", (256, 256))
    assert policy.rule_for(lossy) is not None
    for spec in (
        TensorSpec("layer.0.attn.bias", "F32", (256,)),  # 1-D
        TensorSpec("layer.0.LayerNorm.weight", "F32", (256, 256)),  # a norm, by name
        TensorSpec("layer.0.proj_norm.weight", "F32", (256, 256)),
        TensorSpec("layer.0.bias_matrix.bias", "F32", (256, 256)),
        TensorSpec("tiny.weight", "F32", (8, 8)),  # fewer than min_elements
        TensorSpec("ids", "I64", (512, 512)),  # not a float
    ):
        assert policy.rule_for(spec) is None, spec.name
    assert 8 * 8 < DEFAULT_MIN_ELEMENTS <= 256 * 256


def test_first_matching_rule_wins() -> None:
    policy = build_policy(["embed.*=int4", "*.weight=int8", "*=fp8"])
    rule = policy.rule_for(TensorSpec("embed.weight", "F32", (500, 128)))
    assert rule is not None and rule.codec == IntGroupCodec(bits=4)
    rule = policy.rule_for(TensorSpec("head.weight", "BF16", (128, 128)))
    assert rule is not None and rule.codec == Int8ChannelCodec()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lossy": ["auto"]}, "needs a budget"),
        ({"lossy": ["*=int8"], "min_snr_db": 30.0}, "apply to --lossy auto only"),
        ({"lossy": ["auto"], "max_ratio": -1.0}, "must be positive"),
        ({"lossy": ["*=int8"], "codec": "int8"}, "--codec takes a lossless codec"),
    ],
)
def test_policy_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        build_policy(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ policy files


def test_policy_files_json_and_yaml(tmp_path: Path) -> None:
    settings = {"rules": ["embed.*=int4:group=128", {"pattern": "*.weight", "codec": "int8"}],
                "keep_lossless": ["head.*"], "min_elements": 10}
    as_json = tmp_path / "policy.json"
    as_json.write_text(json.dumps(settings))
    as_yaml = tmp_path / "policy.yaml"
    as_yaml.write_text("rules:\n  - embed.*=int4:group=128\n  - {pattern: '*.weight', codec: int8}\n"
                       "keep_lossless: ['head.*']\nmin_elements: 10\n")
    for path in (as_json, as_yaml):
        policy = build_policy([], path)
        assert [r.codec for r in policy.rules] == [IntGroupCodec(bits=4, group=128), Int8ChannelCodec()]
        assert policy.rule_for(TensorSpec("head.weight", "F32", (64, 64))) is None
        assert policy.rule_for(TensorSpec("small.weight", "F32", (4, 4))) is not None
    # --lossy rules come first and the flags override the file's budget.
    as_json.write_text(json.dumps({"rules": ["auto"], "min_snr_db": 20, "candidates": ["int4", "int8"]}))
    policy = build_policy(["head.*=int8"], as_json, min_snr_db=35.0)
    assert policy.rules[0].pattern == "head.*" and policy.min_snr_db == 35.0
    assert policy.auto_candidates() == (IntGroupCodec(bits=4), Int8ChannelCodec())


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.json", '{"rulez": []}', "unknown key 'rulez'"),
        ("p.json", "{nope", "not valid JSON"),
        ("p.yaml", "rules: [a, b\n", "not valid YAML"),
        ("p.json", "[1, 2]", "expected an object"),
        ("p.json", '{"rules": "*=int8"}', "rules must be a list"),
        ("p.json", '{"rules": [{"pattern": "*"}]}', "a rule is"),
        ("p.json", '{"rules": ["*=int9"]}', "unknown codec"),
        ("p.json", '{"min_elements": "many"}', "must be a number"),
        ("p.json", '{"rules": ["auto"], "min_snr_db": 20, "candidates": ["lossless"]}', "lossy codecs"),
    ],
)
def test_bad_policy_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message) as info:
        build_policy([], path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="No such file"):
        build_policy([], tmp_path / "absent.json")


# ------------------------------------------------------------------------------------------ pushes


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few layers of every kind a policy tells apart, with weight-like values."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(11)

    def weights(*shape: int) -> torch.Tensor:
        return torch.from_numpy((rng.standard_t(4, size=shape) * 0.03).astype(np.float32))

    tensors = {
        "embed.weight": weights(700, 128),
        "layer.0.attn.weight": weights(256, 256),
        "layer.0.attn.bias": weights(256),
        "layer.0.norm.weight": weights(256),
        "layer.0.mlp.weight": weights(512, 256),
        "head.weight": weights(300, 256).to(torch.bfloat16),
        "tiny.weight": weights(8, 8),
        "ids": torch.arange(256, dtype=torch.int64).reshape(2, 128),
    }
    folder = tmp_path_factory.mktemp("policy") / "model"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")
    return folder


def _originals(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_int8_push_records_quality_and_reads_back_dequantized(small_model: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    report = shardstore.push(small_model, "m:int8", store=store, policy=build_policy(["*.weight=int8"]),
                             chunk_bytes=64 << 10)
    repo = Repository(store)
    manifest = repo.get_manifest(report.manifest_id)
    lossy = {"embed.weight", "layer.0.attn.weight", "layer.0.mlp.weight", "head.weight"}
    for name, record in manifest.tensors.items():
        ids = [c["id"] for c in record.codec]
        if name in lossy:
            assert ids == ["int8-channel.v1", "float-entropy.v1"], name
            assert record.quality is not None and record.quality["snr_db"] is not None
            assert record.quality["snr_db"] > 35 and record.quality["rel_rmse"] is not None
            assert report.per_tensor[name]["quality"] == record.quality
            assert report.per_tensor[name]["codec"] == "int8-channel.v1+float-entropy.v1"
        else:
            assert record.quality is None and all(i != "int8-channel.v1" for i in ids), name
    assert len(manifest.tensors["embed.weight"].pieces) > 1  # the figures sum over pieces
    originals = _originals(small_model)
    with shardstore.open("m:int8", store=store) as view:
        for name in lossy:
            decoded = view.get_tensor(name)
            assert decoded.dtype == originals[name].dtype and decoded.shape == originals[name].shape
            error = (decoded.float() - originals[name].float()).abs().max().item()
            recorded = manifest.tensors[name].quality
            assert recorded is not None and error == pytest.approx(recorded["max_abs_error"], rel=1e-5)
            form = view.get_quantized(name)
            assert form.codes.dtype == np.int8 and form.codes.shape[0] == originals[name].shape[0]
            assert torch.equal(torch.from_numpy(form.dequantize()).to(decoded.dtype).reshape(decoded.shape), decoded)
        assert torch.equal(view.get_tensor("ids"), originals["ids"])
        with pytest.raises(InvalidInputError, match="not quantized"):
            view.get_quantized("layer.0.attn.bias")
    info = describe(manifest, "m:int8", report.manifest_id)
    assert info["tensors"]["head.weight"]["quality"] == manifest.tensors["head.weight"].quality
    assert "quality" not in info["tensors"]["tiny.weight"]


def test_lossless_manifests_have_no_quality_field(small_model: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    report = shardstore.push(small_model, "m:exact", store=store)
    data = Repository(store).store.get(f"manifests/{report.manifest_id}.json")
    assert b'"quality"' not in data


def test_manifest_quality_is_validated(small_model: Path, tmp_path: Path) -> None:
    from shardstore.format import canonical_json

    store = LocalStore(tmp_path / "store")
    report = shardstore.push(small_model, "m:q", store=store, policy=build_policy(["*.weight=int5"]))
    doc = json.loads(Repository(store).store.get(f"manifests/{report.manifest_id}.json"))
    assert parse_manifest(canonical_json.dumps(doc)).tensors["embed.weight"].quality is not None
    for broken in ({"snr_db": "x", "rel_rmse": 0.1, "max_abs_error": 0.2}, {"snr_db": 30.0}, [30.0]):
        doc["tensors"]["embed.weight"]["quality"] = broken
        with pytest.raises(FormatError, match=r"embed\.weight.*quality"):
            parse_manifest(canonical_json.dumps(doc))


def test_auto_min_snr_picks_the_smallest_codec_meeting_it(small_model: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    floor = 25.0
    policy = build_policy(["auto"], codec="lossless", min_snr_db=floor)
    report = shardstore.push(small_model, "m:auto", store=store, policy=policy)
    manifest = Repository(store).get_manifest(report.manifest_id)
    chosen = {n: r for n, r in manifest.tensors.items() if r.quality is not None}
    assert chosen, "auto quantized nothing"
    for name, record in chosen.items():
        assert record.quality is not None and record.quality["snr_db"] is not None
        assert record.quality["snr_db"] >= floor, name
        # One bit fewer in the same group layout would have missed the floor (or is not a candidate).
        codec = record.codec[0]
        if codec["id"] == "intn-group.v1" and codec["bits"] > 3:
            smaller = build_policy([f"{name}=intn:bits={codec['bits'] - 1},group={codec['group']}"])
            trial = shardstore.push(small_model, "m:trial", store=store, policy=smaller)
            quality = Repository(store).get_manifest(trial.manifest_id).tensors[name].quality
            assert quality is not None and quality["snr_db"] is not None and quality["snr_db"] < floor, name
    int8 = shardstore.push(small_model, "m:int8", store=store, policy=build_policy(["*=int8"]))
    assert report.stored_bytes < int8.stored_bytes


def test_auto_max_ratio_meets_the_size_or_says_why(small_model: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    report = shardstore.push(small_model, "m:r", store=store, policy=build_policy(["auto"], max_ratio=0.2))
    assert report.stored_bytes <= 0.2 * report.raw_bytes
    looser = shardstore.push(small_model, "m:r2", store=store, policy=build_policy(["auto"], max_ratio=0.3))
    worst = lambda r: min(t["quality"]["snr_db"] for t in r.per_tensor.values() if "quality" in t)  # noqa: E731
    assert worst(looser) > worst(report)  # more room, a higher floor
    with pytest.raises(InvalidInputError, match=r"--max-ratio 0.01: the smallest choice stores 0\.\d+"):
        shardstore.push(small_model, "m:r3", store=store, policy=build_policy(["auto"], max_ratio=0.01))


# ------------------------------------------------------------------------------------------ the CLI


def _cli(*args: str | Path, store: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHARDSTORE_STORE": str(store)}
    return subprocess.run([sys.executable, "-m", "shardstore", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_lossy_push_and_inspect(small_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    pushed = _cli("push", small_model, "m:cli", "--lossy", "embed.*=int4:group=128", "--lossy", "*.weight=int8",
                  "--json", store=store)
    assert pushed.returncode == 0, pushed.stderr
    figures = json.loads(pushed.stdout)
    assert figures["per_tensor"]["embed.weight"]["codec"] == "intn-group.v1+float-entropy.v1"
    assert figures["per_tensor"]["head.weight"]["codec"] == "int8-channel.v1+float-entropy.v1"
    assert set(figures["per_tensor"]["head.weight"]["quality"]) == {"max_abs_error", "rel_rmse", "snr_db"}
    human = _cli("push", small_model, "m:cli2", "--lossy", "*.weight=int8", store=store)
    assert "lossy: 4 tensors (int8-channel.v1), lowest SNR" in human.stdout
    inspected = _cli("inspect", "m:cli", store=store)
    assert inspected.returncode == 0, inspected.stderr
    row = next(line for line in inspected.stdout.splitlines() if line.startswith("head.weight"))
    snr = figures["per_tensor"]["head.weight"]["quality"]["snr_db"]
    assert "int8-channel.v1+float-entropy.v1" in row and f"{snr:.1f}" in row
    as_json = json.loads(_cli("inspect", "m:cli", "--json", store=store).stdout)
    assert as_json["tensors"]["embed.weight"]["quality"] == figures["per_tensor"]["embed.weight"]["quality"]
    verified = _cli("verify", "--read-data", "--json", store=store)
    assert verified.returncode == 0 and json.loads(verified.stdout)["healthy"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lossy", "nothing.*=int8"], "matches no tensor"),
        (["--lossy", "*=int9"], "unknown codec 'int9'"),
        (["--lossy", "auto"], "needs a budget"),
        (["--lossy", "*=int8", "--codec", "int8"], "--codec takes a lossless codec"),
        (["--policy", "/nonexistent/policy.yaml"], "policy file /nonexistent/policy.yaml"),
    ],
)
def test_cli_bad_policy_is_one_line_and_writes_nothing(small_model: Path, tmp_path: Path, args: list[str],
                                                        message: str) -> None:
    store = tmp_path / "store"
    assert _cli("push", small_model, "m:ok", store=store).returncode == 0
    before = tree_snapshot(store)
    result = _cli("push", small_model, "m:bad", *args, store=store)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert tree_snapshot(store) == before


def test_nan_in_a_quantized_tensor_is_named(small_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = _originals(small_model)
    tensors["layer.0.mlp.weight"][3, 4] = float("nan")
    folder = tmp_path / "nan"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(InvalidInputError, match=r"tensor 'layer.0.mlp.weight': .*NaN"):
        shardstore.push(folder, "m:nan", store=LocalStore(tmp_path / "store"), policy=build_policy(["*=int8"]))
    # Auto keeps such a tensor lossless instead.
    report = shardstore.push(folder, "m:nan", store=LocalStore(tmp_path / "store"),
                             policy=build_policy(["auto"], min_snr_db=20.0))
    assert report.per_tensor["layer.0.mlp.weight"]["codec"] == "float-entropy.v1"
    assert "quality" in report.per_tensor["layer.0.attn.weight"]


def test_policy_default_is_all_lossless() -> None:
    policy = Policy()
    assert policy.rule_for(TensorSpec("x.weight", "F32", (512, 512))) is None
