"""Stage `data`: calibration blocks, held-out evaluation blocks and offline zero-shot tasks."""
from transformers import AutoTokenizer

from pgprune.models import resolve
from pgprune.workflow import prepare_data
from stages._common import BASE_DIR, DATA_DIR, parse, run


def main(argv=None):
    params, _ = parse(__doc__, argv=argv)
    tokenizer = AutoTokenizer.from_pretrained(resolve(BASE_DIR))
    stats = prepare_data(params, tokenizer, DATA_DIR)
    print(stats)


if __name__ == "__main__":
    run(main)
