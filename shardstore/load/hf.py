"""transformers models straight from a ref: ``shardstore.from_pretrained``, and completing a model built on meta.

``from_pretrained(view, cls)`` does what ``transformers``' ``from_pretrained`` does,
with the stored model in place of a folder:

1. the config from the stored ``config.json`` blob (one small request, no tensor);
2. the model built on the meta device (no memory, no random initialisation);
3. the weights streamed in through the lazy view, straight onto their devices
   (device maps, tensor-parallel plans and every other ``load_into`` option);
4. what the checkpoint lacks (non-persistent buffers such as ``position_ids``,
   a new head) made by transformers' own initialisation, tied weights tied, the
   model in eval mode. Nothing is left on meta; no folder is written.

Step 4 relies on transformers 5: its initialisation functions skip every tensor
flagged ``_is_hf_initialized``, so flagging the loaded ones makes
``initialize_weights()`` touch only what is missing, exactly as its
``from_pretrained`` finalises a model. Older transformers would overwrite the
loaded weights, so they are refused with one line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

from shardstore.errors import InvalidInputError, MissingDependencyError, NotFoundError
from shardstore.load.tensors import torch_dtype

if TYPE_CHECKING:
    from shardstore.load.view import ModelView

__all__ = ["completer_for", "from_pretrained"]

log = logging.getLogger("shardstore")

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MIN_TRANSFORMERS = 5


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(
            "shardstore.from_pretrained needs transformers: pip install 'shardstore[transformers]'") from None
    major = int(transformers.__version__.split(".")[0])
    if major < MIN_TRANSFORMERS:
        raise MissingDependencyError(f"shardstore.from_pretrained needs transformers>={MIN_TRANSFORMERS} "
                                     f"(found {transformers.__version__})")
    return transformers


def completer_for(module: torch.nn.Module) -> Callable[[set[str], Callable[[str], str]], None] | None:
    """A function completing ``module`` after a load, if it is a transformers (>= 5) model; else None."""
    import transformers

    if not isinstance(module, transformers.PreTrainedModel) or int(transformers.__version__.split(".")[0]) < 5:
        return None

    def complete(loaded: set[str], device_for: Callable[[str], str]) -> None:
        _complete(module, loaded, device_for)

    return complete


def _complete(model: Any, loaded: set[str], device_for: Callable[[str], str]) -> None:
    """transformers' ``_finalize_model_loading``: make and initialise what is on meta and was not loaded, then tie."""
    tensors = dict(chain(model.named_parameters(), model.named_buffers()))
    for name in loaded:
        if name in tensors:
            tensors[name]._is_hf_initialized = True  # transformers' init functions leave flagged tensors alone
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for name in tied:
        if name in tensors:
            tensors[name]._is_hf_initialized = True  # tying replaces them: initialising them would be wasted work
    for name, tensor in tensors.items():
        if not tensor.is_meta or name in tied or name in loaded:  # loaded onto meta: on purpose (a device map)
            continue
        owner_name, _dot, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        value = torch.empty_like(tensor, device=device_for(name))
        if attr in owner._parameters:
            owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
        else:
            owner._buffers[attr] = value
    model.initialize_weights()
    model.tie_weights()


class _Holder(torch.nn.Module):
    """Puts a base model under its prefix, to read a checkpoint saved from a model with a head (``bert.``...)."""

    def __init__(self, prefix: str, model: torch.nn.Module) -> None:
        super().__init__()
        self.add_module(prefix, model)


def _load_target(model: Any, names: list[str]) -> tuple[torch.nn.Module, Callable[[str], str]]:
    """What to load into, and how its names map to the model's: transformers' base-model prefix rule.

    A head model (``BertForSequenceClassification``, its base under ``bert``) reads a base
    checkpoint into its base; a base model reads a head model's checkpoint from under the prefix.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return model, str
    has_prefix = any(n.startswith(prefix + ".") for n in names)
    base = getattr(model, prefix, None)
    if isinstance(base, torch.nn.Module) and base is not model and not has_prefix:
        return base, lambda name: f"{prefix}.{name}"
    if has_prefix and not isinstance(base, torch.nn.Module):
        return _Holder(prefix, model), lambda name: name[len(prefix) + 1:]
    return model, str


def _json(data: bytes, what: str) -> Any:
    """A config file as transformers reads it (plain ``json``: it accepts what transformers accepts)."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{what}: not valid JSON ({exc})") from None


def _config(view: ModelView, cls: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The config from the stored config.json, and the keyword arguments it did not take (for the model)."""
    transformers = _transformers()
    blob = view.manifest.blobs.get(CONFIG_FILE)
    if blob is None:
        raise NotFoundError(f"{view.ref}: no {CONFIG_FILE} among its files (pass config=)")
    doc = _json(view.source.get_blob(blob.id), f"{view.ref}: {CONFIG_FILE}")
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{view.ref}: {CONFIG_FILE} is not a JSON object")
    if hasattr(cls, "_model_mapping"):  # an Auto class: the config's model_type picks the classes
        model_type = doc.get("model_type")
        try:
            config_class = transformers.CONFIG_MAPPING[model_type]
        except KeyError:
            raise InvalidInputError(f"{view.ref}: {CONFIG_FILE} names model_type {model_type!r}, which this "
                                    f"transformers {transformers.__version__} does not know") from None
    else:
        config_class = cls.config_class
    config, unused = config_class.from_dict(doc, return_unused_kwargs=True, **kwargs)
    config.name_or_path = view.ref
    return config, unused


def _dtype(dtype: Any, config: Any, view: ModelView) -> torch.dtype:
    """transformers' ``dtype="auto"``: the config's dtype, else the first floating tensor's in the checkpoint."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        # transformers 5 names it ``dtype`` and warns on every read of ``torch_dtype``; older ones have only the latter.
        configured = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
        if isinstance(configured, torch.dtype):
            return configured
        if isinstance(configured, str) and isinstance(getattr(torch, configured, None), torch.dtype):
            return getattr(torch, configured)  # type: ignore[no-any-return]
        for record in view.manifest.tensors.values():
            found = torch_dtype(record.dtype)
            if found.is_floating_point:
                return found
        return torch.get_default_dtype()
    named = getattr(torch, str(dtype), None)
    if not isinstance(named, torch.dtype):
        raise InvalidInputError(f"dtype {dtype!r}: expected a torch.dtype, 'auto' or a name such as 'bfloat16'")
    return named


def from_pretrained(view: ModelView, cls: Any = None, *, config: Any = None, dtype: Any = "auto",
                    load_options: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """A ``cls`` model (default ``AutoModel``) with the weights of ``view``; see the module's docstring."""
    transformers = _transformers()
    cls = transformers.AutoModel if cls is None else cls
    model_kwargs = dict(kwargs)
    if config is None:
        config, model_kwargs = _config(view, cls, model_kwargs)
    target = _dtype(dtype, config, view)
    with torch.device("meta"):
        if hasattr(cls, "_model_mapping"):
            model = cls.from_config(config, dtype=target, **model_kwargs)
        else:
            model = cls._from_config(config, dtype=target, **model_kwargs)
    options = dict(load_options or {})
    options.setdefault("strict", False)  # transformers' semantics: what is missing is initialised, and said
    into, to_model = _load_target(model, view.keys())
    result = view.load_into(into, cast=True, **options)
    loaded = {to_model(name) for name in result.tensors}
    home = next((str(t.device) for t in chain(model.parameters(), model.buffers()) if not t.is_meta), "cpu")
    _complete(model, loaded, lambda _name: home)  # a head the checkpoint lacks, beside what load_into made
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    missing = [n for n in model.state_dict() if n not in loaded and n not in tied]
    if missing:
        log.warning("%s: not in the checkpoint, newly initialised: %s", view.ref, ", ".join(missing))
    if result.unexpected:
        log.warning("%s: not used by %s: %s", view.ref, type(model).__name__, ", ".join(result.unexpected))
    model.eval()
    generation = view.manifest.blobs.get(GENERATION_CONFIG_FILE)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        doc = _json(view.source.get_blob(generation.id), f"{view.ref}: {GENERATION_CONFIG_FILE}")
        model.generation_config = transformers.GenerationConfig.from_dict(doc)
    return model
