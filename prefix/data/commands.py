"""`prefix data`: turn text or token arrays into a training dataset, and train a tokenizer for it.

  prefix data prepare INPUT... --out DIR [--val INPUT...] [--tokenizer SPEC] [options]
  prefix data train-tokenizer INPUT... --vocab-size N --out DIR [--text-field NAME]

INPUT: files, folders (searched recursively) or quoted glob patterns of .txt .jsonl .json .csv
.parquet .arrow (text) or .bin .npy (token ids); a folder written by Hugging Face `save_to_disk`;
or hf:NAME[:CONFIG][@SPLIT], a dataset in the local Hugging Face cache (never downloaded). See
docs/prepare.md. A problem you can fix prints one line `error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from prefix.errors import UserError


def arguments(top: argparse.ArgumentParser) -> None:
    sub = top.add_subparsers(dest="data_command", required=True, metavar="COMMAND", parser_class=type(top))
    p = sub.add_parser("prepare", help="tokenize, pack and write train/ and val/ MDS splits with a manifest",
                       description="Prepare a dataset for `data.local` / `data.remote` (docs/prepare.md).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, folders (save_to_disk ones too), quoted glob patterns, or hf:NAME[:CONFIG][@SPLIT] "
                        "from the local Hugging Face cache")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    p.add_argument("--val", nargs="+", default=[], metavar="INPUT",
                   help="validation inputs (then nothing else is held out)")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="bytes (default), a tokenizer.json or its folder, tiktoken:NAME or tiktoken:FILE; "
                        "with token arrays, only recorded in the dataset")
    p.add_argument("--text-field", default="text", metavar="NAME", help="JSON/CSV/parquet/Arrow field with the text")
    p.add_argument("--seq-len", type=int, default=256, help="sequence length; samples hold seq_len + 1 ids")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share held out when --val is not given")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--bin-dtype", default="uint16", choices=("uint16", "uint32"), help="id type of .bin files")
    p.add_argument("--vocab-size", type=int, help="vocabulary to record (default: the tokenizer's, or "
                                                  "the largest id + 1 of token arrays)")
    p.add_argument("--shard-size", default="64mb", metavar="SIZE", help="MDS shard size limit (default 64mb)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new dataset is complete")
    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json on text inputs",
                       description="Train a byte-level BPE on the inputs and save DIR/tokenizer.json.")
    t.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text inputs, as for prepare: files, folders, quoted glob patterns or hf:NAME")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, at least 257")
    t.add_argument("--out", required=True, type=Path, help="folder for tokenizer.json")
    t.add_argument("--text-field", default="text", metavar="NAME", help="JSON/CSV/parquet/Arrow field with the text")


def run(args: argparse.Namespace) -> int:
    try:
        print(_prepare(args) if args.data_command == "prepare" else _train_tokenizer(args))
    except KeyboardInterrupt:
        print(f"{args.data_command}: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    return 0


def _prepare(args: argparse.Namespace) -> str:
    from prefix.data.prepare import prepare, summary

    start = time.monotonic()
    manifest = prepare(args.inputs, args.out, val=args.val, tokenizer=args.tokenizer, text_field=args.text_field,
                       seq_len=args.seq_len, val_fraction=args.val_fraction, workers=args.workers,
                       bin_dtype=args.bin_dtype, vocab_size=args.vocab_size, shard_size=args.shard_size,
                       overwrite=args.overwrite)
    return summary(manifest, args.out, time.monotonic() - start)


def _train_tokenizer(args: argparse.Namespace) -> str:
    """Read documents as prepare would, train, save; the folder is made first so a typo fails fast."""
    from prefix.data import tokenizers
    from prefix.data.sources import BadRecords, find_sources, read_documents

    sources = find_sources(args.inputs)
    arrays = [s for s in sources if s.tokens]
    if arrays:
        raise UserError(f"{arrays[0].path}: token ids cannot train a tokenizer; pass text inputs")
    created = not args.out.exists()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot create it ({e.strerror}); choose another folder") from None
    bad, count = BadRecords(), [0]

    def texts():
        for source in sources:
            for _, text in read_documents(source, args.text_field, bad):
                count[0] += 1
                yield text

    try:
        tok = tokenizers.train_bpe(texts(), args.vocab_size)
        if not count[0]:
            raise UserError(f"no documents to train on ({bad.total()} bad records); check the inputs")
        tok.save(args.out)
    except BaseException:
        if created:
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    path = args.out / tokenizers.HF_FILE
    return (f"wrote {path}: {tok.vocab_size} ids trained on {count[0]} documents ({bad.total()} bad records); "
            f"use it with: prefix data prepare INPUT... --tokenizer {path} --out DIR")
