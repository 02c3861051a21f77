"""Command line: python3 -m blockd <command> ...

    python3 -m blockd import-hf /models/Qwen3-0.6B --target gpu-host:50051 --token-file ~/.blockd-token
    python3 -m blockd export-hf Qwen3-0.6B/layer{0..27} -o /out/tuned --base /models/Qwen3-0.6B
    python3 -m blockd export-peft Qwen3-0.6B/layer{0..27} -o /out/adapter --base-model Qwen/Qwen3-0.6B
    python3 -m blockd info --target gpu-host:50051
    python3 -m blockd list
"""
import argparse
import os
import sys

from blockd.client import Client
from blockd.config import LORA_TARGETS, LoraConfig
from blockd.errors import BlockdError


def _client(args):
    token = args.token or os.environ.get("BLOCKD_TOKEN")
    if args.token_file:
        with open(os.path.expanduser(args.token_file)) as f:
            token = f.read().strip()
    return Client(args.target, token=token, tls=args.tls, root_certificates=args.ca, certificate_chain=args.cert,
                  private_key=args.key, timeout=args.timeout)


def _lora_of(args):
    """The LoraConfig of --lora-rank/--lora-alpha/--lora-targets, or None without --lora-rank."""
    if args.lora_rank is None:
        if args.lora_alpha is not None or args.lora_targets is not None:
            raise SystemExit("--lora-alpha and --lora-targets need --lora-rank")
        return None
    if args.lora_alpha is None:
        raise SystemExit("--lora-rank needs --lora-alpha (the adapters' scale is alpha / rank)")
    return LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                      target_modules=args.lora_targets if args.lora_targets is not None else LORA_TARGETS)


def _import_hf(args):
    from blockd.hf import import_hf
    lora = _lora_of(args)
    with _client(args) as c:
        ids = import_hf(c, args.dir, prefix=args.prefix, layers=args.layers, precision=args.precision,
                        device=args.device, max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size,
                        replace=args.replace, progress=args.progress, frozen=args.frozen, lora=lora)
    for block_id in ids:
        print(block_id)


def _export_hf(args):
    from blockd.hf_export import export_hf
    with _client(args) as c:
        r = export_hf(c, args.block_ids, args.output, base=args.base, dtype=args.dtype, first_layer=args.first_layer,
                      merge=args.merge, lora_alpha=args.lora_alpha, force=args.force,
                      max_shard_bytes=args.max_shard_bytes)
    what = "a complete model" if r["complete"] else "the layers only (no embedding, norm or head: pass --base)"
    print(f"exported layers {r['layers'][0]}..{r['layers'][-1]} to {args.output}: {what}", file=sys.stderr)


def _export_peft(args):
    from blockd.hf_export import export_peft
    with _client(args) as c:
        r = export_peft(c, args.block_ids, args.output, base_model_name_or_path=args.base_model,
                        first_layer=args.first_layer, dtype=args.dtype, lora_alpha=args.lora_alpha, force=args.force)
    print(f"exported a rank-{r['r']} adapter of {', '.join(r['target_modules'])} to {args.output}", file=sys.stderr)


def _info(args):
    with _client(args) as c:
        print(c.server_info(), end="")


def _list(args):
    with _client(args) as c:
        for b in c.list_blocks():
            cfg = b.config
            print(f"{b.block_id}\tlayer {b.layer_index}\thidden {cfg.hidden_size}\theads {cfg.num_attention_heads}/"
                  f"{cfg.num_kv_heads}\tstep {b.step}\t{'loaded' if b.weights_loaded else 'weights missing'}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m blockd", description="blockd command-line client")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=os.environ.get("BLOCKD_TARGET", "localhost:50051"),
                        help="blockd address HOST:PORT (default $BLOCKD_TARGET or localhost:50051)")
    common.add_argument("--token", help="bearer token (default $BLOCKD_TOKEN)")
    common.add_argument("--token-file", help="file holding the bearer token")
    common.add_argument("--tls", action="store_true", help="connect with TLS")
    common.add_argument("--ca", help="PEM file of the CA that signed the server's certificate (implies --tls)")
    common.add_argument("--cert", help="PEM client certificate chain for mutual TLS")
    common.add_argument("--key", help="PEM private key of --cert")
    common.add_argument("--timeout", type=float, default=600.0, help="deadline of each call in seconds")
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import-hf", parents=[common],
                         help="create one block per layer of a Hugging Face checkpoint and load its weights")
    imp.add_argument("dir", help="checkpoint directory: config.json and *.safetensors (+ model.safetensors.index.json)")
    imp.add_argument("--prefix", help="block ids are PREFIX<layer> (default: '<dir name>/layer')")
    imp.add_argument("--layers", help="layers to import: A:B (half-open) or a comma list (default: all)")
    imp.add_argument("--precision", choices=["fp32", "tf32", "bf16"], help="block precision (default: the backend's)")
    imp.add_argument("--device", type=int, default=0)
    imp.add_argument("--max-seq-len", type=int, default=0, help="0: the server's default")
    imp.add_argument("--max-batch-size", type=int, default=0, help="0: the server's default")
    imp.add_argument("--replace", action="store_true", help="delete blocks that already hold the ids")
    imp.add_argument("--frozen", action="store_true", help="weights only: no gradients or AdamW state")
    imp.add_argument("--lora-rank", type=int, help="add LoRA adapters of this rank to every block")
    imp.add_argument("--lora-alpha", type=float, help="LoRA alpha, with --lora-rank (the scale is alpha / rank)")
    imp.add_argument("--lora-targets", help="comma list of " + " ".join(LORA_TARGETS) + " (default: all seven)")
    imp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")
    imp.set_defaults(run=_import_hf)
    exp = sub.add_parser("export-hf", parents=[common],
                         help="write blocks as a Hugging Face checkpoint (config.json, safetensors shards, index)")
    exp.add_argument("block_ids", nargs="+", help="the blocks, in layer order")
    exp.add_argument("-o", "--output", required=True, help="output directory (new or empty, else --force)")
    exp.add_argument("--base", help="the checkpoint the blocks came from: its config and other tensors are copied")
    exp.add_argument("--dtype", choices=["bf16", "fp32"], help="default: the blocks' (bf16 for BF16 blocks)")
    exp.add_argument("--first-layer", type=int, default=0, help="layer index of the first block")
    exp.add_argument("--merge", action="store_true", help="fold LoRA adapters into the weights")
    exp.add_argument("--lora-alpha", type=float, help="LoRA alpha when the blocks do not say it")
    exp.add_argument("--force", action="store_true", help="write into a non-empty directory")
    exp.add_argument("--max-shard-bytes", type=int, default=5 * 1000 ** 3, help="largest shard (default 5 GB)")
    exp.set_defaults(run=_export_hf)
    peft = sub.add_parser("export-peft", parents=[common],
                          help="write the blocks' LoRA adapters as a PEFT adapter (adapter_model.safetensors)")
    peft.add_argument("block_ids", nargs="+", help="the blocks, in layer order")
    peft.add_argument("-o", "--output", required=True, help="output directory (new or empty, else --force)")
    peft.add_argument("--base-model", default="", help="adapter_config.json's base_model_name_or_path")
    peft.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    peft.add_argument("--first-layer", type=int, default=0, help="layer index of the first block")
    peft.add_argument("--lora-alpha", type=float, help="LoRA alpha when the blocks do not say it")
    peft.add_argument("--force", action="store_true", help="write into a non-empty directory")
    peft.set_defaults(run=_export_peft)
    sub.add_parser("info", parents=[common], help="print GetServerInfo").set_defaults(run=_info)
    sub.add_parser("list", parents=[common], help="list the server's blocks").set_defaults(run=_list)

    args = p.parse_args(argv)
    try:
        args.run(args)
    except BlockdError as e:
        print(f"blockd {args.command}: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"blockd {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
