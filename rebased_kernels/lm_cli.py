"""The language-model commands: ``data prepare``, ``train lm``, ``eval lm``."""

from __future__ import annotations

import argparse
import json


def add_lm_commands(sub, train_tasks) -> None:
    data = sub.add_parser("data", help="prepare a tokenised corpus (LM)")
    prep = data.add_subparsers(dest="task", required=True).add_parser(
        "prepare", help="tokenise local text files into train.bin / val.bin / meta.json"
    )
    prep.add_argument("files", nargs="*", help="text files (or --stdlib)")
    prep.add_argument("--stdlib", action="store_true",
                      help="the Python standard library's sources on this machine")  # fmt: skip
    prep.add_argument("--tokenizer", default="byte", choices=("byte", "gpt2"))
    prep.add_argument("--encoder-json", default=None, help="GPT-2 encoder.json (local)")
    prep.add_argument("--vocab-bpe", default=None, help="GPT-2 vocab.bpe (local)")
    prep.add_argument("--val-fraction", type=float, default=0.05)
    prep.add_argument("--workers", type=int, default=None)
    prep.add_argument("--out", required=True)
    prep.set_defaults(fn=_prepare)

    lm = train_tasks.add_parser("lm", help="a language model on a tokenised corpus")
    lm.add_argument("--data", required=True, help="a `data prepare` folder or a token file")
    lm.add_argument("--preset", default="tiny", choices=("tiny", "lm-30m", "paper-150m"))
    lm.add_argument("--mixer", default="rebased", help="a feature-map preset or 'attention'")
    lm.add_argument("--seq-len", type=int, default=256)
    lm.add_argument("--batch-size", type=int, default=8, help="global, per optimiser step")
    lm.add_argument("--grad-accum", type=int, default=1)
    lm.add_argument("--lr", type=float, default=3e-3)
    lm.add_argument("--steps", type=int, default=200)
    lm.add_argument("--warmup", type=int, default=20)
    lm.add_argument("--eval-every", type=int, default=50)
    lm.add_argument("--checkpoint-every", type=int, default=None)
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--backend", default="auto")
    lm.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    lm.add_argument("--resume", default=None, help="a checkpoint.pt to continue from")
    lm.add_argument("--fsdp", action="store_true",
                    help="shard parameters, gradients and optimizer state (FSDP2) instead of "
                         "DDP; under torchrun with >= 2 processes")  # fmt: skip
    lm.add_argument("--out", default=None)
    lm.set_defaults(fn=_train_lm)

    ev = sub.add_parser("eval", help="evaluate a trained model (LM)")
    ev_lm = ev.add_subparsers(dest="task", required=True).add_parser(
        "lm", help="held-out perplexity overall, on AR and on non-AR tokens"
    )
    ev_lm.add_argument("checkpoint")
    ev_lm.add_argument("--data", default=None, help="another corpus (default: the training one)")
    ev_lm.add_argument("--batches", type=int, default=8)
    ev_lm.set_defaults(fn=_eval_lm)


def _prepare(args: argparse.Namespace) -> int:
    from .train import lm_data

    files = [*args.files, *(lm_data.stdlib_corpus() if args.stdlib else [])]
    if not files:
        raise SystemExit("data prepare: give text files or --stdlib")
    meta = lm_data.prepare(files, args.out, args.tokenizer, args.encoder_json, args.vocab_bpe,
                           args.val_fraction, args.workers)  # fmt: skip
    print(json.dumps(meta))
    return 0


def _train_lm(args: argparse.Namespace) -> int:
    import torch

    from .train.lm_loop import LMTrainConfig, train_lm

    cfg = LMTrainConfig(
        data=args.data, preset=args.preset, mixer=args.mixer, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        max_steps=args.steps, warmup_steps=args.warmup, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, seed=args.seed, backend=args.backend,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), out_dir=args.out,
        fsdp=args.fsdp,
    )  # fmt: skip
    final = train_lm(cfg, resume_from=args.resume)["final"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()}))
    return 0


def _eval_lm(args: argparse.Namespace) -> int:
    from .train.lm_loop import eval_checkpoint

    print(json.dumps(eval_checkpoint(args.checkpoint, args.data, args.batches)))
    return 0
