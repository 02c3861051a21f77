"""Command line: python3 -m blockd <command> ...

    python3 -m blockd import-hf /models/Qwen3-0.6B --target gpu-host:50051 --token-file ~/.blockd-token
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
