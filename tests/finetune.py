"""A real fine-tune of all-MiniLM-L6-v2: a few AdamW steps of a contrastive loss on real sentence pairs.

Shared by the delta tests (``from finetune import make_finetune``) and
``bench/bench_delta_sparse.py``. It changes the weights the way fine-tuning
does (every trained weight moves a little, rows of unused token embeddings
not at all), which is what delta coding against the base has to exploit;
noise would not. Deterministic (fixed seed, one thread), about 10 s of CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

MODEL_FILE = "model.safetensors"

# Paraphrase pairs: each sentence should embed closer to its partner than to the others.
PAIRS: list[tuple[str, str]] = [
    ("A man is playing a guitar on stage.", "Someone performs music with a guitar in front of a crowd."),
    ("The cat sleeps on the warm windowsill.", "A cat is napping in the sun by the window."),
    ("Stock markets fell sharply after the announcement.", "Share prices dropped steeply following the news."),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti for the evening meal."),
    ("The train to Berlin was delayed by an hour.", "The Berlin train arrived sixty minutes late."),
    ("Children are building a sandcastle at the beach.", "Kids make a castle out of sand by the sea."),
    ("The server returned an error after the update.", "After upgrading, the machine responded with a failure."),
    ("He runs five kilometres every morning.", "Each morning he goes for a 5 km jog."),
]


def make_finetune(base_dir: Path, dest: Path, *, steps: int = 4, lr: float = 2e-5,
                  dtype: torch.dtype | None = None, seed: int = 0) -> Path:
    """Fine-tune the model in ``base_dir`` for ``steps`` AdamW steps; write it (same tensor names) to ``dest``.

    ``dtype`` converts the result (e.g. to ``torch.bfloat16``, to pair with a base
    converted the same way); by default the weights keep the base file's dtypes.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions, and fair to a shared machine
    try:
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        model = AutoModel.from_pretrained(str(base_dir), dtype=torch.float32)
        model.train()
        # No weight decay: it would nudge every weight, even those no gradient reaches.
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        left = tokenizer([a for a, _ in PAIRS], padding=True, return_tensors="pt")
        right = tokenizer([b for _, b in PAIRS], padding=True, return_tensors="pt")
        for _ in range(steps):
            scores = _embed(model, left) @ _embed(model, right).T * 20.0  # in-batch contrastive, scale 20
            loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(PAIRS)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained = model.state_dict()
    finally:
        torch.set_num_threads(threads)

    original = load_file(str(base_dir / MODEL_FILE))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in original.items():
        # Buffers the model does not save (position_ids) keep the file's own values.
        value = trained[name].detach().to(tensor.dtype) if name in trained else tensor
        out[name] = (value.to(dtype) if dtype is not None and value.is_floating_point() else value).contiguous()
    shutil.copytree(base_dir, dest, ignore=shutil.ignore_patterns(MODEL_FILE), dirs_exist_ok=True)
    save_file(out, str(dest / MODEL_FILE), metadata={"format": "pt"})
    return dest


def _embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (what sentence-transformers does for this model)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)
