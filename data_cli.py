"""
`python data.py COMMAND ...`: data.py's command line (prepare, builtin, verify, compact, synthetic), one
error line per fault, and verify (every shard of a folder against its manifest). It builds on data.py,
compact_vocabulary.py and synthetic.py; data.main runs it.
"""

import argparse
import hashlib
import signal
import sys
from pathlib import Path

import compact_vocabulary
import data
import synthetic


def verify(data_dir):
    """Check every shard of a prepared folder against its manifest: present, the listed size, a valid
    header, the listed SHA-256 (a full read) and token ids inside the vocabulary. Returns the problems found,
    each naming the file; [] means the folder is intact. (The loader checks sizes, headers and ids, not
    hashes: it must start fast.)"""
    data_dir = Path(data_dir)
    manifest = data.read_manifest(data_dir)
    problems = []
    for split, record in manifest["splits"].items():
        for shard in record["shards"]:
            path = data_dir / shard["file"]
            if not path.is_file():
                problems.append(f"{path} is missing ({split} shard listed in {data.MANIFEST}): copy it back from where "
                                f"the folder came from, or {data.PREPARE_FIX}")
                continue
            try:
                shard_tokens = data.read_shard(path, check_vocab=False, vocab_size=manifest["tokenizer"]["vocab_size"]).tokens
            except data.DataError as error:
                problems.append(str(error))
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            if digest.hexdigest() != shard["sha256"]:
                problems.append(f"{path} has SHA-256 {digest.hexdigest()}, but {data.MANIFEST} lists {shard['sha256']}: "
                                f"the file changed after prepare (disk or copy damage, or an edit); copy it again "
                                f"or {data.PREPARE_FIX}")
                continue
            try:  # a hash that matches can still have been updated with the file: the ids, as the loaders check them
                data.check_token_ids(path, shard_tokens, manifest["tokenizer"]["vocab_size"])
            except data.DataError as error:
                problems.append(str(error))
    return problems


def build_parser():
    parser = argparse.ArgumentParser(prog="data.py", description=data.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prep = commands.add_parser("prepare", help="tokenize text files, folders, globs or JSONL into train/val shards",
                               description="Tokenize INPUTs into DIR/train_*.bin, DIR/val_*.bin and DIR/manifest.json.")
    prep.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="a text file (one document), a .jsonl file (one document per line, in its \"text\" field), "
                           f"a folder (its {' '.join(data.TEXT_SUFFIXES)} files, recursively), or a quoted glob like 'books/**/*.txt'")
    prep.add_argument("--out", required=True, metavar="DIR", help="output folder; shards of an earlier prepare there are replaced")
    prep.add_argument("--val_fraction", type=float, default=0.005,
                      help="share of documents for the val split, chosen by a hash of each document's text (default: 0.005)")
    prep.add_argument("--shard_tokens", type=int, default=data.DEFAULT_SHARD_TOKENS,
                      help=f"tokens per shard file, at document boundaries (default: {data.DEFAULT_SHARD_TOKENS:,})")
    prep.add_argument("--quiet", action="store_true", help="no progress (tokens/s, ETA) or summary on stderr; warnings still print")
    compact_help = ("write the shards in a compact vocabulary of N ids: bytes, specials and the most frequent dolma2 "
                    "tokens of the train split; lossless, and ~10x faster at the tiny size (default: 0, dolma2)")
    prep.add_argument("--compact_vocab", type=int, default=0, metavar="N", help=compact_help)
    builtin = commands.add_parser("builtin", help="prepare the built-in corpus (text that ships with Python)",
                                  description="Prepare the built-in corpus, or reuse it if already prepared the same way.")
    builtin.add_argument("--out", default=str(data.DEFAULT_BUILTIN_DIR), metavar="DIR", help="output folder (default: %(default)s)")
    builtin.add_argument("--max_tokens", type=int, default=data.BUILTIN_MAX_TOKENS, help="stop after this many tokens (default: %(default)s)")
    builtin.add_argument("--compact_vocab", type=int, default=0, metavar="N",
                         help="also write its compact-vocabulary copy into OUT_vN (what `python train.py` trains on: 8192)")
    check = commands.add_parser("verify", help="check every shard of a prepared folder against its manifest's SHA-256s",
                                description="Read every shard of DIR and compare it with manifest.json: presence, "
                                            "size, header and SHA-256. Exit status 0 if all match, 1 otherwise.")
    check.add_argument("folder", metavar="DIR", help="a folder made by `python data.py prepare`")
    compact = commands.add_parser("compact", help="copy a dolma2 folder into a compact vocabulary built from its train split",
                                  description=f"Build SOURCE's compact vocabulary ({data.COMPACT_VOCAB_FILE}) and rewrite its "
                                              "shards in it, into --out (default SOURCE_vN); reused if already built.")
    compact.add_argument("source", metavar="SOURCE", help="a folder made by `python data.py prepare` (dolma2)")
    compact.add_argument("--vocab_size", type=int, default=8192, metavar="N",
                         help="ids in the compact vocabulary, bytes and specials included (default: %(default)s)")
    compact.add_argument("--out", metavar="DIR", help="output folder (default: SOURCE_vN)")
    compact.add_argument("--quiet", action="store_true", help="no summary on stderr")
    add_synthetic_command(commands)
    parser.epilog = "\n".join(f"--- python data.py {name} ---\n{sub.format_help()}" for name, sub in commands.choices.items())
    return parser


def add_synthetic_command(commands):
    mix = commands.add_parser("synthetic", help="mix synthetic retrieval documents (copy, MQAR, needle) into a corpus's train split",
                              description="Write OUT: CORPUS with --share of its train tokens synthetic retrieval documents, "
                                          "each filling one TokenLoader window of --seq_len (or, with --long, of lengths "
                                          "between seq_len/8 and seq_len, for extend.py); val unchanged; the recipe in "
                                          "manifest.json under \"synthetic\". docs/data.md, \"Synthetic retrieval documents\".")
    mix.add_argument("corpus", metavar="CORPUS", help="a prepared folder to mix with, e.g. data/builtin_v8192")
    mix.add_argument("--out", required=True, metavar="DIR", help="output folder, new or an earlier mix (replaced whole), e.g. data/regime_L256")
    mix.add_argument("--seq_len", type=int, required=True, help="the training length the mix is laid out for (train.py's, or extend.py's with --long)")
    mix.add_argument("--share", type=float, default=0.5, help="fraction of the train tokens that are synthetic, in (0, 1) (default: %(default)s)")
    mix.add_argument("--kinds", default=",".join(synthetic.DEFAULT_KINDS), help=f"comma-separated document kinds, in rotation, of {', '.join(synthetic.KINDS)} (default: %(default)s)")
    mix.add_argument("--ids_first", type=int, default=None, help="first id of the synthetic id block (default: the vocabulary's last --ids_size ids below its end-of-text and pad ids, a compact vocabulary's rarest tokens)")
    mix.add_argument("--ids_size", type=int, default=synthetic.DEFAULT_IDS_SIZE, help="ids in the block: 3 markers, then keys, values and filler in thirds (default: %(default)s)")
    mix.add_argument("--seed", type=int, default=0, help="seed of the synthetic documents; the same arguments give the same bytes (default: %(default)s)")
    mix.add_argument("--long", action="store_true", help="documents of uniform lengths in [seq_len/8, seq_len] between whole corpus documents, for extend.py (default: one window each)")
    mix.add_argument("--packed", type=int, default=None, metavar="N", help="pack each synthetic window with documents of log-uniform lengths from N tokens to seq_len, each ending with EOS; train with --mask_documents (default: one document per window)")
    mix.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")


def build_synthetic_mix(corpus, out, seq_len, share, kinds, ids_first, ids_size, seed, long, quiet, packed=None):
    """The synthetic command: its flags, typed, to synthetic.build_mix."""
    try:
        if ids_first is None:  # the vocabulary's rarest ids (synthetic.default_ids)
            ids = synthetic.default_ids(data.read_manifest(corpus)["tokenizer"], ids_size)
        else:
            ids = synthetic.SyntheticIds(ids_first, ids_size)
    except ValueError as error:
        given = f"--ids_size {ids_size}" if ids_first is None else f"--ids_first {ids_first} --ids_size {ids_size}"
        raise data.DataError(f"{given}: {error}; e.g. --ids_size {synthetic.DEFAULT_IDS_SIZE}") from None
    kinds = tuple(kind.strip() for kind in kinds.split(",") if kind.strip())
    if long and packed is not None:
        raise data.DataError("--long and --packed are two layouts; give one (--long for extension data, "
                             "--packed N for pretraining)")
    layout = "long" if long else "packed" if packed is not None else "window"
    return synthetic.build_mix(corpus, out, seq_len, share, kinds, ids, seed, progress=not quiet, lengths=layout,
                               **({"shortest": packed} if packed is not None else {}))


def stop_on_sigterm(signum, frame):
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so a prepare removes what it built aside.
    raise SystemExit(128 + signum)


def main(argv=None):
    """One command; a DataError (or a problem verify finds) ends the process with one line each, exit 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        if args.command == "prepare":
            compact_vocabulary.prepare(args.inputs, args.out, args.val_fraction, args.shard_tokens,
                                       progress=not args.quiet, compact_vocab=args.compact_vocab)
        elif args.command == "verify":
            problems = verify(args.folder)
            if problems:
                parser.exit(1, "".join(f"error: {problem}\n" for problem in problems))
            shards = sum(len(split["shards"]) for split in data.read_manifest(args.folder)["splits"].values())
            print(f"{args.folder}: all {shards} shard(s) match {data.MANIFEST} (size, header, token ids, SHA-256)")
        elif args.command == "synthetic":
            build_synthetic_mix(args.corpus, args.out, args.seq_len, args.share, args.kinds, args.ids_first,
                                args.ids_size, args.seed, args.long, args.quiet, args.packed)
        elif args.command == "compact":
            out = compact_vocabulary.compact_folder(args.source, args.vocab_size, args.out, progress=not args.quiet)
            print(f"compact copy ready in {out}", file=sys.stderr)
        else:
            out = compact_vocabulary.prepare_builtin_corpus(args.out, args.max_tokens, compact_vocab=args.compact_vocab)
            print(f"built-in corpus ready in {out}", file=sys.stderr)
    except data.DataError as error:
        parser.exit(1, f"error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"error: interrupted; {args.command} changed no folder (what it built aside is removed): "
                         f"run it again\n")
    finally:
        signal.signal(signal.SIGTERM, previous)
