"""Stage `model`: materialise the base model in model.dtype (the embedded default is converted once to
safetensors; a hub id or local folder is recorded, not copied) and its tokenizer."""
from pgprune.hf.loading import prepare_model, save_tokenizer
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--out", required=True, help="model folder")
        ap.add_argument("--tokenizer-out", required=True, help="tokenizer folder")

    params, a = parse(__doc__, args, argv)
    prepare_model(params.model.source, a.out, dtype=params.model.dtype)
    save_tokenizer(a.out, a.tokenizer_out)


if __name__ == "__main__":
    run(main)
