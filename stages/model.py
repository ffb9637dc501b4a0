"""Stage `model`: materialise the base model (the embedded default is converted once to safetensors)."""
from pgprune.models import prepare_model
from stages._common import BASE_DIR, parse, run


def main(argv=None):
    params, _ = parse(__doc__, argv=argv)
    prepare_model(params.model.source, BASE_DIR, dtype="bfloat16")


if __name__ == "__main__":
    run(main)
